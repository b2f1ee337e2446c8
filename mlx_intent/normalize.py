"""Fold text so that the ways travellers type a word all compare equal.

Kadıköy, Kadikoy and KADIKÖY; أين and اين; ещё and еще: users drop diacritics,
dots and harakat at will, so the keyword tier and the data checks compare folded
text only.  The folding is lossy on purpose and idempotent for any string.
"""

from __future__ import annotations

import unicodedata

# The longest query any tier is given, in characters: the server refuses longer texts, the CLI cuts them
# here before any tier tokenizes them (a 5 MB line took 43 s and 1.5 GB and held its whole batch up).
MAX_TEXT_CHARS = 4000
SEPARATOR = " </s> "  # between turns, as the encoder reads a conversation (context.pair_text)

# Letters that case folding and decomposition leave apart but travellers mix up.
_SPECIAL: dict[int, str | None] = {
    ord("ı"): "i",  # Turkish dotless i: Kadıköy == Kadikoy (İ/I fold to i on their own)
    ord("ٱ"): "ا",  # alef wasla; أ إ آ lose their hamza/madda as combining marks
    ord("ى"): "ي",  # alef maqsura written for final ya
    ord("ة"): "ه",  # ta marbuta written as ha
    ord("ـ"): None,  # tatweel (kashida), pure decoration
    **{0x0660 + d: str(d) for d in range(10)},  # Arabic-Indic digits
    **{0x06F0 + d: str(d) for d in range(10)},  # Extended (Persian/Urdu) digits
}


class _FoldTable(dict):
    """A str.translate table filled per code point on first sight, so import stays cheap."""

    def __missing__(self, cp: int) -> str | None:
        ch = chr(cp)
        if unicodedata.category(ch)[0] == "M":
            out: str | None = None  # combining marks: diacritics, harakat, the dot of İ
        elif ch.isalnum() and ch != "_":
            out = ch
        else:
            out = " "  # punctuation (،؟«»¿¡ too), symbols, emoji, controls
        self[cp] = out
        return out


_TABLE = _FoldTable(_SPECIAL)


def normalize(text: str) -> str:
    """Fold case, diacritics, script variants and punctuation; words joined by single spaces."""
    s = unicodedata.normalize("NFKC", text).casefold()  # casefold: ß→ss, İ→i̇, I→i
    s = unicodedata.normalize("NFKD", s).translate(_TABLE)  # decompose, then drop the marks
    return " ".join(s.split())


def tokens(text: str) -> list[str]:
    """The normalized words of a text."""
    return normalize(text).split()


def text_problem(text: str) -> str | None:
    """Why no tier can be given ``text``, or None: one rule for the server and the CLI.  Empty: only blanks and
    control or format characters (zero-width spaces, BOMs, direction marks), which every tier reads as nothing;
    a lone surrogate (JSON's ``"\\ud800"``) is no character at all, and no log or output file can hold it; it is
    said first, since a surrogate's category (Cs) would otherwise read as an empty text."""
    if any("\ud800" <= c <= "\udfff" for c in text):
        return "text holds a lone surrogate, which is not Unicode text"
    if all(c.isspace() or unicodedata.category(c).startswith("C") for c in text):
        return "text is empty"
    return None
