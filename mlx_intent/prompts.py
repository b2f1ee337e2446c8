"""The classification prompt, rendered through each model's own chat template.

The prompt is split in two around the user's text: the part before it (system
prompt and user header) is the same for every query, so its KV cache is computed
once per loaded model; the part after it (end of turn, assistant header) is short.
Everything is derived from ``schema``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
_PLACEHOLDER = "\u2063USER\u2063"
_FALLBACK_TEMPLATES = {
    "chatml": ("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"),
    "zephyr": "<|system|>\n{system}</s>\n<|user|>\n{user}</s>\n<|assistant|>\n",
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}


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
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if rendered is None or rendered.count(_PLACEHOLDER) != 1:
        rendered = _FALLBACK_TEMPLATES[chat_format].format(system=system, user=_PLACEHOLDER)
    prefix, suffix = rendered.split(_PLACEHOLDER)
    return PromptParts(prefix, suffix)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2063]")


def clean_user_text(text: str, special_tokens: list[str]) -> str:
    """Remove control characters and any special-token strings (a user must not be able
    to close the turn or open a new one), and collapse whitespace."""
    text = _CONTROL.sub(" ", text)
    for tok in special_tokens:
        if tok:
            text = text.replace(tok, " ")
    return " ".join(text.split())
