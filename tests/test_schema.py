"""One answer schema: ``schema.validate``, ``schema.JSON_SCHEMA`` and the API's pydantic model agree.

The ``jsonschema`` package is not installed, so the JSON schema's keywords are checked by the small
evaluator below (only the keywords JSON_SCHEMA uses; an unknown one fails the test)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mlx_intent import schema
from mlx_intent.schema import INTENTS, JSON_SCHEMA, KEYS, MAX_INTENTS, SchemaError

pytest.importorskip("fastapi")
from mlx_intent.serve.schemas import Answer, ClassifyResult  # noqa: E402

TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
}


def conforms(value: Any, rule: dict) -> bool:
    """Whether ``value`` follows the JSON schema ``rule`` (draft 2020-12 meaning of each keyword)."""
    for key, want in rule.items():
        if key == "type":
            ok = TYPES[want](value)
        elif key == "enum":
            ok = any(value == w and type(value) is type(w) for w in want)
        elif key == "const":
            ok = value == want and type(value) is type(want)
        elif key in ("minimum", "maximum"):
            ok = not TYPES["number"](value) or (value >= want if key == "minimum" else value <= want)
        elif key in ("minItems", "maxItems"):
            ok = not isinstance(value, list) or (len(value) >= want if key == "minItems" else len(value) <= want)
        elif key == "uniqueItems":
            ok = not isinstance(value, list) or not want or len({repr(v) for v in value}) == len(value)
        elif key == "items":
            ok = not isinstance(value, list) or all(conforms(v, want) for v in value)
        elif key == "prefixItems":
            ok = not isinstance(value, list) or all(conforms(v, r) for v, r in zip(value, want))
        elif key == "properties":
            ok = not isinstance(value, dict) or all(conforms(value[k], r) for k, r in want.items() if k in value)
        elif key == "required":
            ok = not isinstance(value, dict) or all(k in value for k in want)
        elif key == "additionalProperties":
            ok = not isinstance(value, dict) or want or set(value) <= set(rule.get("properties", {}))
        elif key == "oneOf":
            ok = sum(conforms(value, r) for r in want) == 1
        else:
            raise AssertionError(f"JSON_SCHEMA uses {key!r}, which this test cannot check")
        if not ok:
            return False
    return True


def by_validate(candidate) -> bool:
    try:
        schema.validate(candidate)
    except SchemaError:
        return False
    return True


def by_pydantic(candidate) -> bool:
    try:
        Answer.model_validate(candidate)
    except ValidationError:
        return False
    return True


names = st.one_of(st.sampled_from(INTENTS), st.sampled_from(["pizza", "", "Greeting"]), st.integers(0, 3))
confidences = st.one_of(
    st.floats(-0.5, 1.5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, True, False, "0.5", None]),
)
intent_lists = st.one_of(st.lists(names, max_size=MAX_INTENTS + 1), st.sampled_from(["greeting", None, 3]))


@st.composite
def candidates(draw) -> Any:
    """Answers near the boundary: mostly valid values, some keys missing or extra, some values wrong."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)))
    primary = draw(names)
    rest = draw(intent_lists)
    values = {
        "primary_intent": primary,
        "confidence": draw(confidences),
        # often well-formed: the primary first, then distinct others
        "all_intents": draw(st.sampled_from(["rest", "primary first"])) == "rest"
        and rest
        or ([primary, *[i for i in rest if i != primary]][:MAX_INTENTS] if isinstance(rest, list) else rest),
    }
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=1)):
        del values[key]
    if draw(st.booleans()) and draw(st.booleans()):
        values[draw(st.sampled_from(["tier", "top", "extra"]))] = draw(st.sampled_from(["keyword", 1, None]))
    return values


@settings(max_examples=1500, deadline=None)
@given(candidates())
def test_validate_the_json_schema_and_the_api_model_agree(candidate):
    verdicts = {"validate": by_validate(candidate), "json schema": conforms(candidate, JSON_SCHEMA)}
    verdicts["pydantic"] = by_pydantic(candidate)
    assert len(set(verdicts.values())) == 1, (candidate, verdicts)


def test_the_three_accept_and_refuse_the_boundary_cases():
    good = {"primary_intent": "restaurant", "confidence": 0.9, "all_intents": ["restaurant", "greeting"]}
    bad = [
        {**good, "all_intents": ["greeting", "restaurant"]},  # primary not first
        {**good, "tier": "keyword"},  # extra key
        {**good, "all_intents": ["restaurant", "restaurant"]},
        {**good, "confidence": True},
    ]
    assert by_validate(good) and conforms(good, JSON_SCHEMA) and by_pydantic(good)
    for candidate in bad:
        assert not by_validate(candidate) and not conforms(candidate, JSON_SCHEMA) and not by_pydantic(candidate)


def test_the_api_result_lists_the_15_intents_and_keeps_its_own_fields():
    props = ClassifyResult.model_json_schema()["properties"]
    assert props["primary_intent"]["enum"] == list(INTENTS)
    assert props["all_intents"]["items"]["enum"] == list(INTENTS)
    answer = {"primary_intent": "weather", "confidence": 0.5, "all_intents": ["weather"]}
    extra = {"tier": "keyword", "model": None, "fallbacks": [], "latency_ms": 1.0, "cached": False, "top": [1]}
    extra["id"] = "0f" * 16  # every result carries its id (mlx_intent.feedback)
    shown = ClassifyResult.model_validate({**answer, **extra}).model_dump()
    assert schema.answer_of(shown) == answer and "top" not in shown
    with pytest.raises(ValidationError):
        ClassifyResult.model_validate({**answer, **extra, "all_intents": ["greeting", "weather"]})
