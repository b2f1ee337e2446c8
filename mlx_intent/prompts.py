"""The classification prompt, rendered through each model's own chat template.

The prompt is split in two around the user's text: the part before it (system
prompt and user header) is the same for every query, so its KV cache is computed
once per loaded model; the part after it (end of turn, assistant header) is short.
Its tokens are those of ``apply_chat_template`` over the whole conversation (``ChatPrompt``).
Everything is derived from ``schema``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from mlx_intent.schema import BOUNDARY_RULES, DESCRIPTIONS, INTENTS, LANGUAGES

# Few-shot examples, one or more per language; the labelling guide's own examples and
# others written by its rules (never taken from benchmarks/data).
EXAMPLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Hello! How are you?", ("greeting",)),
    ("Hi, where can I eat good fish in Kadıköy?", ("restaurant", "greeting")),
    ("Is Hagia Sophia open on Mondays?", ("attraction",)),
    ("How do I get from IST to Sultanahmet?", ("airport_transport",)),
    ("Merhaba, Topkapı Sarayı bilet fiyatı ne kadar?", ("attraction", "greeting")),
    ("Buradan Galata Kulesi'ne nasıl giderim?", ("gps_route_planning",)),
    ("Gizli kalmış sakin yerler önerir misin?", ("hidden_gems",)),
    ("هل ستمطر غدا في إسطنبول؟", ("weather",)),
    ("أين أقرب صراف آلي؟", ("nearby_locations",)),
    ("Où manger du poisson près de la tour de Galata ?", ("restaurant", "nearby_locations")),
    ("Quel quartier pour loger ?", ("neighborhood",)),
    ("Plan einen Museumstag für morgen, welche Reihenfolge?", ("museum_route_planning",)),
    ("Wo kaufe ich Lokum und Gewürze?", ("shopping",)),
    ("Когда последний паром в Кадыкёй?", ("transportation",)),
    ("Какие концерты в эти выходные?", ("events",)),
    ("Plan a 2-day route: Sultanahmet then Galata", ("route_planning",)),
    ("Do I need a visa?", ("general",)),
)

ANSWER_PREFIX = '{"primary_intent":'
# Templates that write today's date (Llama 3.1 and 3.2: "Today Date: ..." from ``strftime_now``) get this one,
# the templates' own fallback: a prompt that changed daily would change its KV-cache key every day and drift
# from the prompt an adapter or a calibration was fitted on.
PINNED_DATE = "26 Jul 2024"
_PLACEHOLDER = "\u2063USER\u2063"
_NEXT = "\u2063NEXT\u2063"
_FALLBACK_TEMPLATES = {
    "chatml": ("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"),
    "zephyr": "<|system|>\n{system}</s>\n<|user|>\n{user}</s>\n<|assistant|>\n",
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}


def _fallback_break(chat_format: str) -> str:
    """What a fallback template writes between two user turns in a row, where the model's own template cannot
    be rendered: what it writes between the system prompt and the user's turn."""
    return _FALLBACK_TEMPLATES[chat_format].split("{system}")[1].split("{user}")[0]


def system_prompt() -> str:
    lines = [
        "You classify what a traveller in Istanbul wants. Answer with JSON only:",
        '{"primary_intent": "<intent>", "confidence": <0..1>, "all_intents": ["<intent>", ...]}',
        "",
        "Intents:",
        *(f"- {name}: {DESCRIPTIONS[name]}" for name in INTENTS),
        "",
        "Rules, in order:",
        *(f"{i}. {rule}" for i, rule in enumerate(BOUNDARY_RULES, 1)),
        "",
        f"Queries come in {', '.join(LANGUAGES.values())}, or a mix. Examples (text -> all intents, primary first):",
        *(f"{text} -> {', '.join(intents)}" for text, intents in EXAMPLES),
    ]
    return "\n".join(lines)


def compact_system_prompt() -> str:
    """The prompt of fine-tuned adapters: the model has learnt the task and the names,
    so the prompt only names the job; far fewer tokens to train on and to attend to."""
    return "Classify the traveller's intent as JSON."


PROMPT_STYLES = {"full": system_prompt, "compact": compact_system_prompt}


@dataclass(frozen=True)
class PromptParts:
    prefix: str  # system prompt and user header: identical for every query
    suffix: str  # end of the user turn and assistant header


def split_prompt(tokenizer, chat_format: str, system: str | None = None) -> PromptParts:
    """Render the chat template with a placeholder user turn and cut it there."""
    system = system_prompt() if system is None else system
    messages = [{"role": "system", "content": system}, {"role": "user", "content": _PLACEHOLDER}]
    rendered = None
    if getattr(tokenizer, "chat_template", None):
        rendered = render(tokenizer, messages)
    if rendered is None or rendered.count(_PLACEHOLDER) != 1:
        rendered = _FALLBACK_TEMPLATES[chat_format].format(system=system, user=_PLACEHOLDER)
    prefix, suffix = rendered.split(_PLACEHOLDER)
    return PromptParts(prefix, suffix)


def turn_break(tokenizer, chat_format: str, system: str | None = None) -> str:
    """What the chat template writes between two user turns in a row.  A conversation's earlier turns go in as
    user messages of their own after the system prompt, before the query (mlx_intent/context.py): the system
    prompt's KV cache is the same for every conversation.  The assistant's earlier answers are left out: they
    are this classifier's own guesses, and a model shown its last JSON tends to copy it onto a new request."""
    system = system_prompt() if system is None else system
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": _PLACEHOLDER},
        {"role": "user", "content": _NEXT},
    ]
    rendered = None
    if getattr(tokenizer, "chat_template", None):
        try:
            rendered = render(tokenizer, messages)
        except Exception:  # a template that insists on user/assistant alternation
            rendered = None
    if rendered is None or rendered.count(_PLACEHOLDER) != 1 or rendered.count(_NEXT) != 1:
        return _fallback_break(chat_format)
    return rendered.split(_PLACEHOLDER)[1].split(_NEXT)[0]


def render(tokenizer, messages: list[dict], tokenize: bool = False):
    """The tokenizer's chat template over ``messages`` with the generation prompt, on the pinned date."""
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=tokenize, date_string=PINNED_DATE
    )


def special_strings(tokenizer) -> list[str]:
    """Every special token's text, longest first: the declared ones and every added token marked
    special (SmolLM2's <filename>, <jupyter_code>... are not in ``all_special_tokens``)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    found = {*getattr(tokenizer, "all_special_tokens", []), *(t.content for t in added.values() if t.special)}
    return sorted(found - {""}, key=len, reverse=True)


@dataclass(frozen=True)
class ChatPrompt:
    """The prompt in tokens: ``prefix + user(text) + suffix`` is what the chat template gives for the whole
    conversation, token for token, while ``prefix`` stays one list for every query (its KV cache is reused).

    The user's text is tokenized in its context, not on its own: SentencePiece tokenizers (TinyLlama) start a
    text with a word boundary ("▁Hello") that the rendered template, where the text follows "<|user|>\\n",
    does not have.  The context is the prefix from its last special token on (``anchor``): tokenizers start
    afresh after a special token, so those tokens are the prefix's own last ones."""

    prefix: list[int]
    suffix: list[int]
    anchor: str
    anchor_ids: list[int]
    suffix_text: str
    encode: Callable[[str], list[int]] = field(repr=False)
    between: list[int] = field(default_factory=list)  # turn_break in tokens: after each earlier user turn

    def earlier(self, turns: list[str]) -> list[int]:
        """Tokens of a conversation's earlier (cleaned) user turns, each a user message, before the query's."""
        return [i for turn in turns for i in (*self.user(turn), *self.between)]

    def user(self, text: str) -> list[int]:
        """Tokens of the (cleaned) user text as they are in the rendered conversation."""
        ids = self.encode(self.anchor + text + self.suffix_text)
        head, tail = len(self.anchor_ids), len(ids) - len(self.suffix)
        if ids[:head] == self.anchor_ids and ids[tail:] == self.suffix and tail >= head:
            return ids[head:tail]
        return self.encode(text)  # the text merged with its neighbours: no split of the prompt is exact


def chat_prompt(tokenizer, chat_format: str, system: str | None = None) -> ChatPrompt:
    """The classification prompt of ``tokenizer`` (``split_prompt``), in tokens."""

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    parts = split_prompt(tokenizer, chat_format, system)
    prefix = encode(parts.prefix)
    at = max((parts.prefix.rfind(s) for s in special_strings(tokenizer)), default=-1)
    anchor = parts.prefix[max(at, 0) :]
    anchor_ids = encode(anchor)
    if prefix[len(prefix) - len(anchor_ids) :] != anchor_ids:  # the cut changed the tokens: keep all context
        anchor, anchor_ids = parts.prefix, prefix
    between = encode(turn_break(tokenizer, chat_format, system))
    return ChatPrompt(prefix, encode(parts.suffix), anchor, anchor_ids, parts.suffix, encode, between)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2063]")


def clean_user_text(text: str, special_tokens: list[str]) -> str:
    """Remove control characters and any special-token strings (a user must not be able
    to close the turn or open a new one), and collapse whitespace."""
    text = _CONTROL.sub(" ", text)
    for tok in special_tokens:
        if tok:
            text = text.replace(tok, " ")
    return " ".join(text.split())
