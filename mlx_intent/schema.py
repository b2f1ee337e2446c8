"""The 15 intents, the six languages and the output schema: the one source of truth.

Everything else (prompts, the constrained sampler, the keyword tier, data checks,
docs) imports these names; nothing else spells them out.  The labelling guide is written down here, in the
repository: its table of intents (``INTENTS``, ``DESCRIPTIONS``) and its boundary rules (``BOUNDARY_RULES``);
the README's "How a query flows" tells how the tiers apply them.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

# Order matters only for display; it follows the labelling guide's table.
INTENTS: tuple[str, ...] = (
    "greeting",
    "restaurant",
    "attraction",
    "transportation",
    "weather",
    "events",
    "neighborhood",
    "shopping",
    "hidden_gems",
    "airport_transport",
    "route_planning",
    "museum_route_planning",
    "gps_route_planning",
    "nearby_locations",
    "general",
)

# One line per intent: what the traveller wants (from the labelling guide).
DESCRIPTIONS: dict[str, str] = {
    "greeting": "social talk only: hello, thanks, goodbye, how are you; no travel request",
    "restaurant": "food and drink: where or what to eat, cafés, bars, dishes, reservations, meal prices",
    "attraction": "a sight or landmark: what to see, opening hours, tickets, history of a sight",
    "transportation": "getting around the city: metro, tram, ferry, bus, taxi, Istanbulkart, fares, schedules",
    "weather": "weather, temperature, rain, forecast, season, what to wear for the weather",
    "events": "what is on: concerts, festivals, exhibitions, matches, shows, nightlife events, dates",
    "neighborhood": "a district as a whole: its character, where to stay, which area suits me",
    "shopping": "buying things: bazaars, malls, markets, souvenirs, bargaining, shop hours",
    "hidden_gems": "off the beaten path: local secrets, non-touristy places, quiet spots",
    "airport_transport": "to or from an airport (IST, SAW): shuttles, Havaist, airport taxi, transfer time",
    "route_planning": "an itinerary or multi-stop plan: plan my day, 3 days in Istanbul, best order",
    "museum_route_planning": "an itinerary of museums specifically",
    "gps_route_planning": "turn-by-turn directions from where I am now (here, my location, GPS) to a place",
    "nearby_locations": "what is close to me or to a named point: nearest pharmacy, ATM, things around",
    "general": "anything else: history, culture, money, visas, safety, language, off-topic, unclear",
}

# The boundary rules of the labelling guide, in order.
BOUNDARY_RULES: tuple[str, ...] = (
    "Social words plus a request: the request decides; greeting joins all_intents.",
    "An airport named as origin or destination: airport_transport, not transportation.",
    "From here / my location / navigate: gps_route_planning; from A to B with both named: transportation.",
    "A plan of several stops: route_planning; all of them museums: museum_route_planning.",
    "Near X / closest / around me: nearby_locations, unless plainly about food (restaurant primary).",
    "A named landmark with no other need: attraction.",
    "When nothing fits or the text is empty of meaning: general.",
)

LANGUAGES: dict[str, str] = {
    "en": "English",
    "tr": "Turkish",
    "ar": "Arabic",
    "fr": "French",
    "de": "German",
    "ru": "Russian",
}

FALLBACK_INTENT = "general"
SOCIAL_INTENT = "greeting"  # social talk only; never primary beside a request (rule 1)

# The most intents an answer lists: the primary and two more (no labelled query needs more).
MAX_INTENTS = 3

# Key order of the JSON object every tier writes.
KEYS: tuple[str, ...] = ("primary_intent", "confidence", "all_intents")

# The intents as a type (the API's pydantic models use it, so OpenAPI lists the 15 names).
Intent = Literal[INTENTS]  # type: ignore[valid-type]

# The answer's rules, here and in ``validate`` alike (the API's model follows them too): exactly the three
# keys, known intents, a confidence in [0, 1], 1 to MAX_INTENTS distinct intents, the primary listed first.
JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "primary_intent": {"type": "string", "enum": list(INTENTS)},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "all_intents": {
            "type": "array",
            "items": {"type": "string", "enum": list(INTENTS)},
            "minItems": 1,
            "maxItems": MAX_INTENTS,
            "uniqueItems": True,
        },
    },
    "required": list(KEYS),
    "additionalProperties": False,
    # all_intents starts with primary_intent: one branch per intent.
    "oneOf": [
        {
            "properties": {"primary_intent": {"const": name}, "all_intents": {"prefixItems": [{"const": name}]}},
        }
        for name in INTENTS
    ],
}


class SchemaError(ValueError):
    """A result that does not follow the output schema."""


def validate(result: dict[str, Any]) -> dict[str, Any]:
    """Check an answer against the schema (the three keys only, as JSON_SCHEMA says); return it, or raise
    SchemaError.  For a tier's result with more fields, validate ``answer_of(result)``."""
    if not isinstance(result, dict):
        raise SchemaError(f"result must be an object, got {type(result).__name__}")
    missing = [k for k in KEYS if k not in result]
    if missing:
        raise SchemaError(f"missing keys: {missing}")
    extra = [k for k in result if k not in KEYS]
    if extra:
        raise SchemaError(f"unexpected keys: {extra}")
    primary, conf, all_intents = (result[k] for k in KEYS)
    if primary not in INTENTS:
        raise SchemaError(f"unknown primary_intent {primary!r}")
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not math.isfinite(conf):
        raise SchemaError(f"confidence must be a number, got {conf!r}")
    if not 0.0 <= conf <= 1.0:
        raise SchemaError(f"confidence {conf} outside [0, 1]")
    if not isinstance(all_intents, list) or not all_intents:
        raise SchemaError("all_intents must be a non-empty list")
    if any(i not in INTENTS for i in all_intents):
        raise SchemaError(f"unknown intent in all_intents: {all_intents}")
    if len(all_intents) > MAX_INTENTS:
        raise SchemaError(f"all_intents lists more than {MAX_INTENTS} intents: {all_intents}")
    if len(set(all_intents)) != len(all_intents):
        raise SchemaError(f"duplicate intents in all_intents: {all_intents}")
    if all_intents[0] != primary:
        raise SchemaError("all_intents must start with primary_intent")
    return result


def answer_of(result: dict[str, Any]) -> dict[str, Any]:
    """The answer part of a result (the schema's keys, in order), without its other fields."""
    if not isinstance(result, dict):
        raise SchemaError(f"result must be an object, got {type(result).__name__}")
    missing = [k for k in KEYS if k not in result]
    if missing:
        raise SchemaError(f"missing keys: {missing}")
    return {k: result[k] for k in KEYS}


def parse(text: str) -> dict[str, Any]:
    """Parse a JSON answer and validate it against the schema."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SchemaError(f"invalid JSON: {e}") from e
    return validate(obj)


def to_json(primary: str, confidence: float, all_intents: list[str]) -> str:
    """The canonical text of a result: fixed key order, confidence to 4 decimals."""
    return json.dumps(
        {"primary_intent": primary, "confidence": round(float(confidence), 4), "all_intents": all_intents},
        ensure_ascii=False,
    )
