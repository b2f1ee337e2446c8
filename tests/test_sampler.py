"""The constrained-JSON sampler: whatever the logits and however the tokenizer splits text,
the machine writes schema-valid JSON, and its tokens decode to exactly that JSON.

Besides the bundled SmolLM2 tokenizer, synthetic tokenizers built with ``tokenizers`` split
the same text differently: one character per token; byte-pair encodings trained on answers
with no pre-tokenizer, whose merges cross quotes, spaces and letters (``"g``, ``", "``), at
three vocabulary sizes; and a SentencePiece-style one that marks the start of every text.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mlx_intent import schema
from mlx_intent.prompts import ANSWER_PREFIX
from mlx_intent.sampler import (
    END,
    AnswerVocab,
    JSONMachine,
    branch_probs,
    write_answer,
)
from mlx_intent.schema import INTENTS, MAX_INTENTS

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Tok:
    """A tokenizer as the sampler sees it, with the answer vocabulary built on it."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    size: int
    vocab: AnswerVocab


def _from_tokenizers(tk: Tokenizer) -> Tok:
    def encode(text: str) -> list[int]:
        return tk.encode(text, add_special_tokens=False).ids

    return Tok(encode, tk.decode, tk.get_vocab_size(), AnswerVocab(encode))


def char_tokenizer() -> Tok:
    """One token per character."""
    alphabet = sorted(set(string.printable))
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(alphabet)}, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return _from_tokenizers(tk)


def answer_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        names = [INTENTS[i] for i in rng.permutation(len(INTENTS))[: rng.integers(1, 4)]]
        texts.append(schema.to_json(names[0], float(rng.random()), names))
    return texts


def bpe_tokenizer(vocab_size: int) -> Tok:
    """Byte-pair merges learnt on answers with no pre-tokenizer: tokens span quotes and letters."""
    tk = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=list(string.printable), show_progress=False)
    tk.train_from_iterator(answer_corpus(), trainer)
    tk.decoder = decoders.Fuse()
    return _from_tokenizers(tk)


def sentencepiece_tokenizer(vocab_size: int) -> Tok:
    """Like Llama 2's (TinyLlama's) tokenizer.json: a word boundary "▁" before the text and for
    every space, merges over the whole text, the first boundary dropped when decoding."""
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = [*string.printable, "▁"]
    tk.train_from_iterator(
        answer_corpus(), trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    )
    return _from_tokenizers(tk)


@pytest.fixture(scope="module")
def toks(bundled) -> dict[str, Tok]:
    _, tokenizer = bundled

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    return {
        "smollm2": Tok(encode, tokenizer.decode, tokenizer.vocab_size, AnswerVocab(encode)),
        "chars": char_tokenizer(),
        "bpe120": bpe_tokenizer(120),
        "bpe300": bpe_tokenizer(300),
        "bpe1000": bpe_tokenizer(1000),
        "sentencepiece": sentencepiece_tokenizer(300),
    }


TOKENIZERS = st.sampled_from(["smollm2", "chars", "bpe120", "bpe300", "bpe1000", "sentencepiece"])
# Any NaN-free float32 logits: huge, tiny, negative, equal (drawn from few values), infinite.
LOGIT = st.one_of(
    st.floats(width=32, allow_nan=False),
    st.sampled_from([0.0, -1.0, 1.0, 3.4e38, -3.4e38, float("inf"), float("-inf")]),
)
TARGETS = st.lists(st.sampled_from(INTENTS), min_size=1, max_size=MAX_INTENTS, unique=True)
CONFIDENCE = st.floats(0.0, 1.0)


def check_answer(tok: Tok, machine: JSONMachine) -> dict:
    """What every finished machine must satisfy."""
    assert machine.done
    answer = schema.parse(machine.text)  # valid JSON, valid schema, no duplicate intents
    assert len(answer["all_intents"]) <= machine.max_intents
    assert machine.text == schema.to_json(answer["primary_intent"], answer["confidence"], answer["all_intents"])
    assert tok.decode(machine.tokens) == machine.text
    return answer


def test_synthetic_tokenizers_split_across_quotes(toks):
    """The fixtures are worth having: merges span a quote and a letter, and a space and a quote;
    the SentencePiece one marks the start of a text."""
    for name in ("bpe300", "bpe1000"):
        pieces = [toks[name].decode([t]) for t in toks[name].encode(schema.to_json("greeting", 0.5, ["greeting"]))]
        assert any('"' in p and any(c.isalpha() for c in p) for p in pieces), pieces
        assert any(' "' in p for p in pieces), pieces
    assert all(len(toks["chars"].decode([t])) == 1 for t in toks["chars"].encode(ANSWER_PREFIX))
    sp = toks["sentencepiece"]  # marks a text's start: '"]}' alone is not '"]}' after a name
    assert sp.encode('"]}') != sp.vocab.encode('"]}') and sp.decode(sp.vocab.encode('"]}')) == '"]}'


@SETTINGS
@given(data=st.data(), which=TOKENIZERS, max_intents=st.integers(1, MAX_INTENTS), greedy=st.booleans())
def test_machine_always_writes_valid_json(toks, data, which, max_intents, greedy):
    """Greedy on random logits, or any allowed token: the machine always finishes a valid answer."""
    tok = toks[which]
    machine = JSONMachine(tok.vocab, max_intents=max_intents)
    for _ in range(1000):
        if machine.done:
            break
        allowed = machine.allowed()
        assert allowed and len(set(allowed)) == len(allowed)
        logits = data.draw(arrays(np.float32, len(allowed), elements=LOGIT))
        temperature = data.draw(st.sampled_from([0.0, 0.3, 1.0, 2.0]))
        probs = branch_probs(logits, temperature)
        assert np.isfinite(probs).all() and (probs >= 0).all() and probs.sum() == pytest.approx(1.0)
        pick = int(np.argmax(probs)) if greedy else data.draw(st.integers(0, len(allowed) - 1))
        machine.advance(allowed[pick], float(probs[pick]))
    answer = check_answer(tok, machine)
    assert 0.0 <= machine.confidence <= 1.0
    assert answer["confidence"] == round(machine.confidence, 4)


def step_by_step(vocab: AnswerVocab, primary: str, confidence: float, all_intents: list[str]) -> JSONMachine:
    """Drive the machine one token at a time, no jump-forward: a forced token is simply the only allowed one."""
    machine = JSONMachine(vocab, max_intents=len(all_intents))
    machine.confidence = confidence
    while not machine.done:
        allowed = machine.allowed()
        if len(allowed) > 1:
            done = len(machine.all_intents)
            target = primary if machine.primary is None else (all_intents + [END])[done]
            allowed = [t for t in allowed if target in machine.node.children[t].names]
        machine.advance(allowed[0])
    return machine


@SETTINGS
@given(which=TOKENIZERS, targets=TARGETS, confidence=CONFIDENCE)
def test_jump_forward_equals_step_by_step(toks, which, targets, confidence):
    tok = toks[which]
    jumped = write_answer(tok.vocab, targets[0], confidence, targets)  # forced_run between choices
    stepped = step_by_step(tok.vocab, targets[0], confidence, targets)
    assert jumped.tokens == stepped.tokens
    assert jumped.text == stepped.text
    assert check_answer(tok, jumped)["all_intents"] == targets


@SETTINGS
@given(which=TOKENIZERS, targets=TARGETS, confidence=CONFIDENCE)
def test_write_answer_is_schema_to_json(toks, which, targets, confidence):
    tok = toks[which]
    machine = write_answer(tok.vocab, targets[0], confidence, targets)
    assert machine.text == schema.to_json(targets[0], confidence, targets)
    assert tok.vocab.answer_text(targets[0], confidence, targets) == machine.text
    assert json.loads(machine.text)["all_intents"] == targets


@SETTINGS
@given(data=st.data(), which=TOKENIZERS)
def test_mask_is_a_trie_lookup(toks, data, which):
    """Per step, the mask is read off the current trie node: no tokenizer calls (one, when the
    primary is chosen, writes its confidence), no pass over the vocabulary."""
    tok = toks[which]
    calls = []
    vocab = tok.vocab
    encode = vocab.encode
    vocab.encode = lambda text: calls.append(text) or encode(text)
    try:
        machine = JSONMachine(vocab)
        while not machine.done:
            allowed = machine.allowed()
            if not machine.forced:
                candidates = machine._candidates()
                expected = [t for t, child in machine.node.children.items() if child.names & candidates]
                assert allowed == expected
                assert len(allowed) <= len(machine.node.children) <= len(INTENTS) + 1
            machine.advance(allowed[data.draw(st.integers(0, len(allowed) - 1))])
    finally:
        vocab.encode = encode
    assert len(calls) == 1 and calls[0].startswith(" ") and '"all_intents": ["' in calls[0]


@given(extra=st.lists(st.sampled_from(INTENTS), min_size=MAX_INTENTS, max_size=len(INTENTS), unique=True))
def test_validate_refuses_too_many_intents(extra):
    """The schema's maxItems: the sampler never writes more than MAX_INTENTS, and validate says so."""
    result = {"primary_intent": extra[0], "confidence": 0.5, "all_intents": extra}
    if len(extra) > MAX_INTENTS:
        with pytest.raises(schema.SchemaError, match="more than"):
            schema.validate(result)
    else:
        assert schema.validate(result) is result
    assert schema.JSON_SCHEMA["properties"]["all_intents"]["maxItems"] == MAX_INTENTS


@SETTINGS
@given(which=TOKENIZERS, name=st.sampled_from(INTENTS))
def test_name_tokens_follow_the_trie_until_the_name_is_decided(toks, which, name):
    """What training teaches is what scoring reads: the stem every name shares, then the name's own
    tokens down the primary trie, ending where no other name is left."""
    vocab = toks[which].vocab
    stem, branch = vocab.stem()
    path = vocab.name_tokens(name)
    assert path[: len(stem)] == stem and len(branch.children) > 1
    node = vocab.primary
    for tok in path:
        assert tok in node.children, (which, name, path)
        node = node.children[tok]
    assert node.names == {name}
