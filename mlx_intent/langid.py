"""Which of the six schema languages a query is in: script first, then letters and stop words.

Travel queries are short and full of Turkish place names (Kadıköy, Beşiktaş) whatever their language,
so a general-purpose detector guesses badly on them; a script count plus per-word evidence (letters,
a few dozen function and travel words, suffixes) is right more often, needs no model and costs
microseconds.
"""

from __future__ import annotations

import re

_MAX_CHARS = 256  # enough to decide; with _MAX_WORDS bounds the cost of pathological input
_MAX_WORDS = 40
_WORD = re.compile(r"[^\W\d_]+")
# A Turkish case suffix after an apostrophe on a name: Taksim'e, Kadıköy'de, Istanbul'dan.
_TR_APOSTROPHE = re.compile(
    r"\b[^\W\d_]{3,}['’](?:e|a|ye|ya|de|da|te|ta|den|dan|ten|tan|in|ın|un|ün|nin|nın|nun|nün|yi|yı|yu|yü|i|ı|u|ü)\b"
)

# Istanbul names spelled with Turkish letters: they appear in queries of every language, so their
# letters say nothing about the language of the query.
_PLACES = frozenset(
    "kadıköy beşiktaş beyoğlu eminönü karaköy nişantaşı topkapı üsküdar şişli gökçen dolmabahçe ortaköy "
    "büyükada kumkapı hisarı fenerbahçe güllüoğlu sarıyer çamlıca kızkulesi kız kulesi istiklal "
    "süleymaniye kapalıçarşı mısır çarşısı yerebatan ayasofya taşkışla kabataş kağıthane ataşehir bağdat "
    "beykoz çengelköy arnavutköy kuruçeşme boğaziçi haliç balıkpazarı tünel fındıklı".split()
)
# Letters (as sets) that mark a language: (language, letters, weight per word holding any of them).
# ö ü are German and Turkish, ç French and Turkish: half weight to each.
_LETTERS: tuple[tuple[str, frozenset[str], float], ...] = (
    ("tr", frozenset("ışğ"), 1.5),
    ("de", frozenset("ßä"), 1.5),
    ("fr", frozenset("éèêàœâîôûùë"), 1.5),
    ("de", frozenset("öü"), 0.5),
    ("tr", frozenset("öüç"), 0.5),
    ("fr", frozenset("ç"), 0.5),
)

# Function words and common travel words; Turkish also as typed without Turkish letters.
_STOP_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset(
        "the a an is are where what how when which who to of and in on at for with can could would should "
        "i me my you your do does there any please hello hi hey thanks thank near best from get go it this "
        "that some good want need find show take open today tomorrow tonight much many way".split()
    ),
    "tr": frozenset(
        "ve bir bu şu ne nedir nasıl nasil nerede nerde nereye nereden neresi var yok mi mı mu mü misin "
        "mısın misiniz mısınız musunuz miyim için icin ile çok cok hangi kaç kac zaman saat merhaba selam "
        "teşekkürler tesekkurler teşekkür tesekkur ederim sağol sagol lütfen lutfen iyi güzel guzel yakın "
        "yakin yakında yakinda bugün bugun yarın yarin ben bana beni burada burda buradan şimdi simdi lazım "
        "lazim istiyorum kadar gibi daha ama veya hava nasılsın nasilsin günaydın gunaydin gidebilirim "
        "gidilir giderim önerir onerir öner oner tramvay vapur otobüs otobus havalimanı havalimani müze muze "
        "müzesi muzesi camii yer yeri yerler gezilecek yemek ucuz fiyat fiyatı fiyati bilet".split()
    ),
    "de": frozenset(
        "der die das und ist ich nicht ein eine einen einem einer wie wo was gibt gibts zum zur nach mit für "
        "fur von dem im am auf bitte kann können konnen hallo danke dank vielen welche welcher welchem wann "
        "bis guten gute sehr mich mir zu auch oder heute morgen abend nacht noch wetter gehen fahren sind es "
        "man muss sollte bei dir alles klar los da dort sich ohne ab als jetzt hat wird tag tage "
        "tschüss moin kaufen preis kosten flughafen viertel wochenende besten beste schönen eigentlich "
        "diese in".split()
    ),
    "fr": frozenset(
        "le la les des du de et est un une où ou je tu vous nous pour avec dans sur quel quelle quels "
        "quelles comment combien bonjour salut coucou merci il au aux pas ce cette qu l c ne se aller peut "
        "puis faire moi mon ma mes toi près pres proche quoi plaît plait svp demain aujourd trouver y ça ca "
        "va très tres mais quand chez vers depuis entre encore cher prix billet billets horaires meilleur "
        "meilleure nuit bonne musées musees endroits pourquoi marche navette en d a".split()
    ),
}
_STOP_INDEX: dict[str, tuple[str, ...]] = {
    word: tuple(lang for lang, stop in _STOP_WORDS.items() if word in stop)
    for word in set().union(*_STOP_WORDS.values())
}
_SUFFIXES = {
    "tr": ("iyor", "ıyor", "uyor", "üyor", "iyorum", "ebilir", "abilir", "ebilirim", "abilirim", "misin"),
    "de": ("ung", "ungen", "lich", "liche", "keit", "heit", "chen", "isch", "ische", "schaft"),
    "fr": ("eux", "euse", "eaux", "aires"),
}


def _script(ch: str) -> str | None:
    cp = ord(ch)
    if cp < 0x250 or 0x1E00 <= cp <= 0x1EFF:
        return "latin"
    if 0x400 <= cp <= 0x52F:
        return "ru"
    if 0x600 <= cp <= 0x6FF or 0x750 <= cp <= 0x77F or 0x8A0 <= cp <= 0x8FF or 0xFB50 <= cp <= 0xFEFF:
        return "ar"
    return None


def _latin_scores(words: list[str], text: str) -> dict[str, float]:
    """Evidence per Latin-script language; letters count once per word, Turkish-looking names less."""
    # English first: max() keeps the first of equal scores, and English is the usual unmarked query.
    scores = {"en": 0.0, "tr": 0.0, "de": 0.0, "fr": 0.0}
    for word in words:
        # Python lower-cases "İ" to "i" plus a combining dot; keep the dotted capital as a Turkish letter.
        low = word.replace("İ", "i").lower() + ("ı" if "İ" in word else "")
        for lang in _STOP_INDEX.get(low, ()):
            scores[lang] += 1
        if low in _PLACES:
            continue
        chars = set(low)
        # A capitalised word is often a name, and names here are mostly Turkish; German capitalises nouns.
        tr_weight = 1 / 3 if word[0].isupper() else 1.0
        for lang, letters, weight in _LETTERS:
            if not chars.isdisjoint(letters):
                scores[lang] += weight * tr_weight if lang == "tr" else weight
        if "sch" in low or "tz" in low or "pf" in low:  # German spellings English rarely has
            scores["de"] += 0.5
        if len(low) > 5:
            for lang, suffixes in _SUFFIXES.items():
                scores[lang] += low.endswith(suffixes)
    scores["tr"] += 2 * len(_TR_APOSTROPHE.findall(text))
    return scores


def detect_language(text: str) -> str | None:
    """One of schema.LANGUAGES' codes, or None when there are no letters (or only other scripts).

    Arabic or Cyrillic wins when its words are at least half as many as the Latin ones, so a Russian
    question about a Latin-spelled landmark stays Russian.  Latin text goes to the language with the
    most evidence; English when nothing points elsewhere.
    """
    if not isinstance(text, str):
        return None
    text = text[:_MAX_CHARS]
    counts = {"latin": 0, "ru": 0, "ar": 0}
    latin: list[str] = []
    for word in _WORD.findall(text)[:_MAX_WORDS]:
        script = _script(word[0])
        if script is not None:
            counts[script] += 1
            if script == "latin":
                latin.append(word)
    other = max(("ru", "ar"), key=counts.__getitem__)
    if counts[other] and 2 * counts[other] >= counts["latin"]:
        return other
    if not latin:
        return None
    scores = _latin_scores(latin, text)
    return max(scores, key=scores.__getitem__)
