"""The constrained-JSON sampler: the model can only write a schema-valid answer.

The answer is a fixed sequence of segments, each either forced text or a choice
between candidate strings, cut where every pre-tokenizer splits anyway (before a
quote that follows punctuation, before a space and digits), so that tokenizing a
segment on its own gives the same tokens as in context::

    {"primary_intent":                      forced
     "greeting", "confidence":              choice among the 15 names
     0.93, "all_intents": ["greeting        forced (confidence from the model, not typed by it)
    "]}  |  ", "restaurant                  choice: close, or one more unused name (repeat)

Each choice is a token trie over the candidates' token sequences, so masking is a
dict lookup (microseconds) and forced stretches, including the rest of a name once
it is unique, are appended without sampling (jump-forward).  The probability of a
choice is the product, over the trie's branch points, of the softmax of the
model's logits over the valid children only (at temperature ``T``): exactly what
the constrained sampler would pick with, so scoring and generation agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mlx_intent.prompts import ANSWER_PREFIX
from mlx_intent.schema import INTENTS, MAX_INTENTS

END = "]"  # the candidate that closes all_intents


@dataclass
class Node:
    """A trie node: its children by token id, the candidates below it, and the
    candidate that ends here (a leaf)."""

    children: dict[int, Node] = field(default_factory=dict)
    names: frozenset[str] = frozenset()
    leaf: str | None = None


def build_trie(sequences: dict[str, list[int]]) -> Node:
    root = Node()
    for name, seq in sequences.items():
        if not seq:
            raise ValueError(f"candidate {name!r} has no tokens")
        node = root
        node.names |= {name}
        for tok in seq:
            node = node.children.setdefault(tok, Node())
            node.names |= {name}
        if node.leaf is not None or node.children:
            raise ValueError(f"candidate {name!r} is a token prefix of another candidate")
        node.leaf = name
    for node in _walk(root):
        if node.leaf is None and not node.children:
            raise ValueError("dangling trie node")
        if node.leaf is not None and node.children:
            raise ValueError(f"candidate {node.leaf!r} is a token prefix of another candidate")
    return root


def _walk(node: Node):
    yield node
    for child in node.children.values():
        yield from _walk(child)


def valid_children(node: Node, allowed: frozenset[str]) -> list[int]:
    return [tok for tok, child in node.children.items() if child.names & allowed]


def branch_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax, at ``temperature``, of the logits of the valid tokens only.

    Infinite logits (another processor's mask) never give NaN: the +inf ones share the
    mass, and all -inf is no preference at all (uniform)."""
    x = np.asarray(logits, dtype=np.float64) / max(temperature, 1e-6)
    top = x.max()
    if not np.isfinite(top):
        x = (x == top).astype(np.float64)
        return x / x.sum()
    x = np.exp(x - top)
    return x / x.sum()


def confidence_text(confidence: float) -> str:
    return json.dumps(round(min(max(float(confidence), 0.0), 1.0), 4))


ANCHOR = "0"  # a digit: every pre-tokenizer (and SentencePiece's digit split) keeps it a token of its own


def in_context(encode: Callable[[str], list[int]]) -> Callable[[str], list[int]]:
    """Encode a segment as it tokenizes after other text, not at the start of one:
    SentencePiece tokenizers (Llama 2, TinyLlama) prepend a word boundary to a text's
    start, which would put a space inside ``"greeting "``.  Encodes ANCHOR + text and
    drops the anchor's tokens; plain ``encode`` if the anchor merged into the text."""
    anchor = encode(ANCHOR)

    def segment(text: str) -> list[int]:
        ids = encode(ANCHOR + text)
        return ids[len(anchor) :] if ids[: len(anchor)] == anchor else encode(text)

    return segment


class AnswerVocab:
    """The tokenized segments and tries of the answer grammar for one tokenizer."""

    def __init__(self, encode: Callable[[str], list[int]], names: tuple[str, ...] = INTENTS):
        self.encode = encode = in_context(encode)
        self.names = names
        self.prefix = encode(ANSWER_PREFIX)
        self.primary = build_trie({n: encode(self.primary_text(n)) for n in names})
        self.extra = build_trie({n: encode(self.extra_text(n)) for n in (*names, END)})

    @staticmethod
    def primary_text(name: str) -> str:
        return f' "{name}", "confidence":'

    @staticmethod
    def after_primary_text(primary: str, confidence: float) -> str:
        return f' {confidence_text(confidence)}, "all_intents": ["{primary}'

    @staticmethod
    def extra_text(name: str) -> str:
        return '"]}' if name == END else f'", "{name}'

    def stem(self) -> tuple[list[int], Node]:
        """The tokens every primary name's path starts with, and the node where the names part."""
        tokens, node = [], self.primary
        while len(node.children) == 1:
            tok, node = next(iter(node.children.items()))
            tokens.append(tok)
        return tokens, node

    def name_tokens(self, name: str) -> list[int]:
        """The trie path of ``name`` up to the name's last token (the rest is forced)."""
        text = self.primary_text(name)
        return self.encode(text)[: len(self.encode(text.split('",')[0]))]

    def answer_text(self, primary: str, confidence: float, all_intents: list[str]) -> str:
        """The text the machine writes for these choices (identical to schema.to_json)."""
        parts = [ANSWER_PREFIX, self.primary_text(primary), self.after_primary_text(primary, confidence)]
        parts += [self.extra_text(n) for n in [*all_intents[1:], END]]
        return "".join(parts)


class JSONMachine:
    """Walks the answer grammar one token at a time.

    ``allowed()`` is the mask; ``advance(token, prob)`` consumes a token (``prob`` is
    its probability among the allowed ones, 1.0 when forced); ``forced_run()`` is the
    stretch that follows with no choice, for jump-forward.
    """

    def __init__(self, vocab: AnswerVocab, max_intents: int = MAX_INTENTS):
        self.vocab = vocab
        self.max_intents = max_intents
        self.tokens: list[int] = []
        self.forced: list[int] = list(vocab.prefix)
        self.node: Node | None = vocab.primary
        self.primary: str | None = None
        self.confidence = 1.0  # product of branch probabilities of the primary's path
        self.all_intents: list[str] = []
        self.done = False

    def _candidates(self) -> frozenset[str]:
        if self.primary is None:
            return frozenset(self.vocab.names)
        if len(self.all_intents) >= self.max_intents:
            return frozenset({END})
        return frozenset(set(self.vocab.names) - set(self.all_intents)) | {END}

    def allowed(self) -> list[int]:
        if self.done:
            return []
        if self.forced:
            return [self.forced[0]]
        return valid_children(self.node, self._candidates())

    def advance(self, token: int, prob: float = 1.0) -> None:
        if token not in self.allowed():
            raise ValueError(f"token {token} is not allowed here")
        self.tokens.append(token)
        if self.forced:
            self.forced.pop(0)
            return
        if self.primary is None:
            self.confidence *= prob
        self.node = self.node.children[token]
        if self.node.leaf is not None:
            self._finish(self.node.leaf)

    def _finish(self, name: str) -> None:
        vocab = self.vocab
        if self.primary is None:
            self.primary = name
            self.all_intents = [name]
            self.forced = vocab.encode(vocab.after_primary_text(name, self.confidence))
        elif name == END:
            self.done = True
            return
        else:
            self.all_intents.append(name)
        self.node = vocab.extra

    def at_branch(self) -> bool:
        return not self.done and not self.forced and len(self.allowed()) > 1

    def forced_run(self) -> list[int]:
        """Consume and return every token up to the next real choice (jump-forward)."""
        run = []
        while not self.done and not self.at_branch():
            (tok,) = self.allowed()
            self.advance(tok)
            run.append(tok)
        return run

    @property
    def text(self) -> str:
        if not self.done:
            raise RuntimeError("the answer is not finished")
        return self.vocab.answer_text(self.primary, self.confidence, self.all_intents)


def write_answer(vocab: AnswerVocab, primary: str, confidence: float, all_intents: list[str]) -> JSONMachine:
    """Forced mode: drive the machine to a known answer (how scoring mode writes its JSON)."""
    machine = JSONMachine(vocab, max_intents=len(all_intents))
    machine.confidence = confidence
    while not machine.done:
        machine.forced_run()
        if machine.done:
            break
        if machine.primary is None:
            target = primary
        elif len(machine.all_intents) < len(all_intents):
            target = all_intents[len(machine.all_intents)]
        else:
            target = END
        machine.advance(next(t for t in machine.allowed() if target in machine.node.children[t].names))
    return machine
