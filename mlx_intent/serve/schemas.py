"""The HTTP API's bodies: requests and answers as pydantic models (what /openapi.json describes), and errors
as JSON (``{"error": ..., "detail": ...}``, with the statuses each route may answer).

An answer is checked here by the rules of ``schema``; a request by the limits below and ``normalize``'s.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator

from mlx_intent.context import MAX_CONTEXT_TURNS
from mlx_intent.normalize import MAX_TEXT_CHARS, text_problem
from mlx_intent.results import Reason, check_user
from mlx_intent.schema import MAX_INTENTS, Intent
from mlx_intent.serve.sessions import MAX_SESSION_ID
from mlx_intent.settings import BODY_TIMEOUT_S, MODES

MAX_BATCH_TEXTS = 64
MAX_BODY_BYTES = 64 * 1024
MAX_HEAD_BYTES = 16 * 1024  # request line and headers
RETRY_AFTER_S = 1


def _readable(text: str) -> str:
    """Reject what no tier can read, by the rule the CLI applies too (normalize.text_problem)."""
    if (problem := text_problem(text)) is not None:
        raise ValueError(problem)
    return text


Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(_readable)]
Mode = Literal[MODES]  # type: ignore[valid-type]
User = Annotated[str, AfterValidator(check_user)]
USER_HELP = "Whose thresholds apply (mlx-intent users set); an unknown user gets the defaults."


class Turn(BaseModel):
    """A text and where it stands in a conversation: its earlier turns, or the session that keeps them."""

    text: Text = Field(description=f"The traveller's query, 1 to {MAX_TEXT_CHARS} characters.")
    context: list[Text] | None = Field(
        None,
        max_length=MAX_CONTEXT_TURNS,
        description=f"Earlier user turns, oldest first (at most {MAX_CONTEXT_TURNS}).",
    )
    session: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_SESSION_ID,
        description=f"A conversation id: the server keeps its last {MAX_CONTEXT_TURNS} turns for 20 minutes "
        "as the context of the next.",
    )

    @model_validator(mode="after")
    def _one_memory(self) -> Turn:
        if self.context is not None and self.session is not None:
            raise ValueError("give context or session, not both")
        return self


class ClassifyRequest(Turn):
    mode: Mode | None = Field(None, description="LLM decoding; default: the server's mode setting.")
    user: User | None = Field(None, description=USER_HELP)


class BatchRequest(BaseModel):
    texts: list[Text] | None = Field(
        None, min_length=1, max_length=MAX_BATCH_TEXTS, description="Queries, answered in order."
    )
    items: list[Turn] | None = Field(
        None, min_length=1, max_length=MAX_BATCH_TEXTS, description="Or queries with their context or session."
    )
    mode: Mode | None = None
    user: User | None = Field(None, description=USER_HELP + " For every text of the batch.")

    @model_validator(mode="after")
    def _texts_or_items(self) -> BatchRequest:
        if (self.texts is None) == (self.items is None):
            raise ValueError("give texts or items")
        return self

    def turns(self) -> list[Turn]:
        return self.items if self.items is not None else [Turn(text=t) for t in self.texts]


class StreamRequest(BaseModel):
    """A text alone: the stream honours no user, session or context, so it refuses them (422) rather than
    answering as if they had not been sent."""

    model_config = ConfigDict(extra="forbid")

    text: Text


class Fallback(BaseModel):
    tier: str
    reason: str = Field(description="Why, in words.")
    kind: Reason = Field(description="Why, as one of a few values (the label of mlx_intent_fallbacks).")


def _number(value: Any) -> Any:
    """A JSON number: not a bool, not a string of digits (pydantic's float would take both)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("confidence must be a number")
    return value


Confidence = Annotated[float, BeforeValidator(_number), Field(ge=0, le=1, allow_inf_nan=False)]


class Answer(BaseModel):
    """The answer, by the rules of ``schema`` (``validate`` and ``JSON_SCHEMA``): the intents are the 15
    names, all_intents lists 1 to 3 distinct ones, the primary first."""

    model_config = ConfigDict(extra="forbid")

    primary_intent: Intent
    confidence: Confidence = Field(description="Calibrated probability that the primary intent is right.")
    all_intents: list[Intent] = Field(min_length=1, max_length=MAX_INTENTS, description="The primary first.")

    @model_validator(mode="after")
    def _primary_first(self) -> Answer:
        if len(set(self.all_intents)) != len(self.all_intents):
            raise ValueError("duplicate intents in all_intents")
        if self.all_intents[0] != self.primary_intent:
            raise ValueError("all_intents must start with primary_intent")
        return self


class ClassifyResult(Answer):
    model_config = ConfigDict(extra="ignore")  # a tier's other fields (top, truncated) are not shown

    id: str = Field(description="This answer's id, for POST /v1/feedback.")
    tier: str = Field(description="The tier that answered.")
    model: str | None = Field(description="Its model; null for the keyword and general tiers.")
    fallbacks: list[Fallback] = Field(
        description="Tiers above it and why they did not answer; kinds not_installed and too_large mean the tier "
        "is absent here (a configuration fact), the others that it was passed over at run time."
    )
    runtime_fallback: bool = Field(
        False, description="A tier was passed over at run time (not merely absent here): what the fallback rate counts."
    )
    latency_ms: float = Field(description="Time in the server for this request, queueing included.")
    latency_per_query_ms: float | None = Field(
        None, description="latency_ms over the request's texts: each text's share (equal for /v1/classify)."
    )
    cached: bool
    context_used: bool = Field(False, description="The earlier turns decided the answer (a follow-up).")
    ambiguous: bool = Field(False, description="The answering tier's top two intents were within the margin.")
    lang: str | None = None


class FeedbackRequest(BaseModel):
    """A correction (the right primary_intent, optionally all_intents) or, with correct, a confirmation."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, description="The id of the answer judged.")
    primary_intent: Intent | None = None
    all_intents: list[Intent] | None = Field(None, min_length=1, max_length=MAX_INTENTS)
    # strict: "yes", "on" or 1 must not pass for true (pydantic's lax mode takes them)
    correct: StrictBool = Field(False, description="The answer was right (true or false, nothing else).")
    replace: StrictBool = Field(False, description="Replace feedback already given for this id (else 409).")


class BatchResult(BaseModel):
    results: list[ClassifyResult]


class ModelInfo(BaseModel):
    name: str
    state: str = Field(description="missing, downloaded, converted or ready (loaded once at least; the keyword and "
                       "general tiers always).")
    loaded: bool = Field(description="In memory in this server now.")
    tier: int | None = Field(description="Its place in the chain, from 0; null when not in it.")


class ModelsResult(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    ready: bool
    status: str = Field(description="warming, ready, degraded or stopping.")
    primary: str | None = Field(description="The tier the server waited for (first LLM tier it could load).")
    detail: str | None = None


class ErrorBody(BaseModel):
    error: str
    detail: Any = None


ERRORS = {
    code: {"model": ErrorBody, "description": why}
    for code, why in {
        400: "Invalid JSON, or a Host header this server does not answer.",
        401: "No or a wrong bearer token, where the server was started with --token (feedback, metrics, models).",
        408: f"The body did not arrive within the body timeout ({BODY_TIMEOUT_S:g} s by default).",
        413: f"Body over {MAX_BODY_BYTES} bytes.",
        415: "Content type is not application/json.",
        431: f"Request line and headers over {MAX_HEAD_BYTES} bytes.",
        422: "A field is missing or invalid.",
        503: "Queue full or shutting down; see Retry-After.",
    }.items()
}


FEEDBACK_ERRORS = {
    **ERRORS,
    404: {"model": ErrorBody, "description": "No such answer recorded here."},
    409: {"model": ErrorBody, "description": "Feedback given already for this id; send replace."},
    503: {
        "model": ErrorBody,
        "description": "The feedback store is busy (locked by another process); see Retry-After.",
    },
}


def error(status: int, message: str, detail: Any = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)
