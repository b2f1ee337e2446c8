"""A reference for the classifier's generation, used only by the tests: the sampler's JSON machine as an mlx-lm
logits processor, so ``mlx_lm.stream_generate`` writes the answer one token at a time (no jump-forward) and
the classifier's jump-forward generation can be compared with it."""

from __future__ import annotations

import math

import numpy as np

from mlx_intent.sampler import AnswerVocab, JSONMachine, branch_probs
from mlx_intent.schema import MAX_INTENTS


class JSONLogitsProcessor:
    """The same machine as an mlx-lm logits processor, for ``mlx_lm.stream_generate``:
    every token that would leave the schema gets -inf, the allowed ones their
    log-probabilities among themselves (the same draw as their logits for any sampler,
    and finite whatever the logits, infinities included); once the answer is complete
    only EOS is allowed.  (No jump-forward here: mlx-lm samples every token.)

    The mask is built on the device: the one host sync a token costs is reading the token just sampled, which
    the trie needs to know what may follow; the logits themselves never come to the host (the allowed ones are
    read there only after that token was drawn from them, for the answer's confidence)."""

    def __init__(self, vocab: AnswerVocab, eos_token_id: int, temperature: float = 1.0, max_intents: int = MAX_INTENTS):
        self.machine = JSONMachine(vocab, max_intents)
        self.eos = eos_token_id
        self.temperature = temperature
        self._seen: int | None = None
        self._row = None  # (allowed ids, their logits on the device) of the last step with a choice

    def __call__(self, tokens, logits):
        import mlx.core as mx

        n = len(tokens)
        if self._seen is not None and n > self._seen and not self.machine.done:
            tok = int(tokens[-1])
            self.machine.advance(tok, self._chance(tok))
        self._seen = n
        allowed = self.machine.allowed() or [self.eos]
        index = mx.array(allowed)
        out = mx.full(logits.shape, -math.inf, dtype=mx.float32)
        if len(allowed) > 1:
            row = logits[:, index].astype(mx.float32)
            self._row = (allowed, row)
            out[:, index] = _log_branch_probs(row)
        else:
            self._row = None
            out[:, index] = 0.0
        return out

    def _chance(self, token: int) -> float:
        """The probability, at the temperature, that ``token`` had among the allowed ones (1 when it was forced)."""
        if self._row is None or token not in self._row[0]:
            return 1.0
        allowed, row = self._row
        return float(branch_probs(np.array(row[0]), self.temperature)[allowed.index(token)])


def _log_branch_probs(row):
    """``log(branch_probs(row))`` on the device, row by row: +inf logits share the mass, all -inf is uniform."""
    import mlx.core as mx

    top = row.max(axis=-1, keepdims=True)
    ties = row == top
    shared = mx.where(ties, 0.0, -math.inf) - mx.log(ties.sum(axis=-1, keepdims=True).astype(mx.float32))
    soft = row - top - mx.log(mx.exp(row - top).sum(axis=-1, keepdims=True))
    return mx.where(mx.isinf(top), shared, soft)
