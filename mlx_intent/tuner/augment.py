"""Training rows of conversations: what the encoder reads for a labelled turn, and the augmentation that keeps
the conversations from teaching "always continue".

The encoder is trained on turns read in their conversation (``encoder_text``: ``context.pair_text``) as well as
alone (tuner/encoder.py).  ``with_request_pairs`` adds ``AUGMENT`` full requests after a conversation's earlier
turns, labelled as they are: a request of its own stays its own after a conversation, and social talk stays
social.
"""

from __future__ import annotations

import numpy as np

from mlx_intent.context import pair_text
from mlx_intent.schema import SOCIAL_INTENT

AUGMENT = 1000  # rows of the single-turn training data, each after earlier turns of the context set: not follow-ups


def encoder_text(row: dict) -> str:
    """What the encoder reads for a labelled row: the turn in its conversation (``pair_text``) where it has one."""
    return pair_text(tuple(row["context"]), row["text"]) if row.get("context") else row["text"]


def request_pairs(context_rows: list[dict], single_rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` rows of ``single_rows``, each after the earlier turns of a random row of ``context_rows``, labelled
    as they are: a request of its own stays its own after a conversation, and social talk stays social."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(single_rows), size=min(n, len(single_rows)), replace=False) if context_rows else []
    earlier = [list(r["context"]) for r in context_rows]
    return [
        {
            **single_rows[i],
            "context": earlier[rng.integers(len(earlier))],
            "kind": "social" if single_rows[i]["primary_intent"] == SOCIAL_INTENT else "new_request",
        }
        for i in picked
    ]


def with_request_pairs(rows: list[dict], seed: int = 0) -> list[dict]:
    """Training ``rows``, and where some are conversations, AUGMENT ``request_pairs`` after them: full requests
    after a conversation too, so that the conversations do not teach "always continue"."""
    pairs = [r for r in rows if r.get("context")]
    return rows + request_pairs(pairs, [r for r in rows if not r.get("context")], AUGMENT, seed) if pairs else rows
