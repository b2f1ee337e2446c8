"""Settings: defaults, then a ``.env`` file, then the process environment, then command-line flags.

Later layers win.  One frozen object is built at start-up and passed down, so no module reads
``os.environ`` behind the caller's back and ``mlx-intent config`` can say where every value came from.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# The seed's calibrated confidence levels; `low` is the default threshold for moving to the next tier.
CONFIDENCE_LEVELS: dict[str, float] = {"high": 0.85, "medium": 0.70, "low": 0.50}
MODES: tuple[str, ...] = ("score", "generate")
# The HTTP service's batching queue (``mlx-intent serve``, its Batcher): texts per batch (the batch_size
# setting's default), the wait to gather a batch, and the jobs that may wait before a 503.
BATCH_SIZE = 8
MAX_WAIT_MS = 5.0
QUEUE_SIZE = 256
# The ambiguity margin: a tier whose top two intents are closer than this passes the text over (the last tier
# before general flags its answer "ambiguous").  Fitted on the calibration split for the default chain: no
# margin gained half a point there, so it is off (benchmarks/reports/ambiguity.md, benchmarks/fit_margin.py).
DEFAULT_MARGIN = 0.0
# Its connection limits (seconds): a whole request head, from a connection's opening or its last response;
# a whole body, from the head; an idle connection.
HEADER_TIMEOUT_S, BODY_TIMEOUT_S, KEEP_ALIVE_S = 10.0, 10.0, 5.0


def default_home() -> Path:
    """The models folder when no ``home`` is set: ``models/`` of the checkout (a source tree), else
    ~/.cache/mlx-intent/models (an installed package).  Only the settings use it: everyone else is passed
    ``Settings.home``."""
    checkout = Path(__file__).resolve().parents[1]  # mlx_intent/settings.py -> the checkout
    if (checkout / "pyproject.toml").is_file():
        return checkout / "models"
    return Path("~/.cache/mlx-intent/models").expanduser()


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the variable, its source and the bad value."""


@dataclass(frozen=True)
class Settings:
    """The effective configuration; ``sources`` maps each field name to where its value came from."""

    home: Path = field(default_factory=lambda: settings_home())  # .env < environment, else default_home()
    model: str | None = None
    fallback_model: str | None = None
    chain: tuple[str, ...] | None = None
    mode: str = "score"
    latency_budget_ms: float = 800.0
    min_confidence: float = CONFIDENCE_LEVELS["low"]
    margin: float = DEFAULT_MARGIN
    keyword_floor: bool = True
    combine: bool = True
    cache_size: int = 1024
    max_loaded_models: int = 2
    retry_after_s: float = 60.0
    batch_size: int = BATCH_SIZE
    log: Path | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def as_rows(self) -> list[tuple[str, str, str]]:
        """(name, value as text, source) per setting, in declaration order, for display."""
        return [
            (name, _show(name, getattr(self, name)), self.sources.get(name, "default")) for name in SPECS
        ]


def _optional(parse: Callable[[object], object]) -> Callable[[object], object]:
    """Blank means unset, so ``LLM_MODEL=`` in the environment can clear a value set in ``.env``."""

    def wrapped(value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return parse(value)

    return wrapped


def _path(value: object) -> Path:
    return Path(str(value).strip()).expanduser()


def _text(value: object) -> str:
    return str(value).strip()


def _chain(value: object) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    names = tuple(n for n in (str(i).strip() for i in items) if n)
    if not names:
        raise ValueError("expected comma-separated tier names")
    if len(set(names)) != len(names):
        raise ValueError("a tier is listed twice")
    return names


def _mode(value: object) -> str:
    mode = str(value).strip().lower()
    if mode not in MODES:
        raise ValueError(f"expected one of {', '.join(MODES)}")
    return mode


_SWITCH = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False, "no": False}


def _switch(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in _SWITCH:
        raise ValueError("expected on or off")
    return _SWITCH[text]


def number_parser(kind: type, low: float, high: float = math.inf, *, low_open: bool = False) -> Callable:
    """A parser for an int or float in [low, high] (or (low, high] when low_open); text or a number."""
    what = "an integer" if kind is int else "a number"
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    if high < math.inf:
        bound = f"between {low:g} and {high:g}"

    def parse(value: object) -> int | float:
        if isinstance(value, bool) or (kind is int and not isinstance(value, (int, str))):
            raise ValueError(f"expected {what}")
        try:
            x = kind(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"expected {what}") from None
        if not (math.isfinite(x) and (x > low if low_open else x >= low) and x <= high):
            raise ValueError(f"must be {bound}")
        return x

    return parse


@dataclass(frozen=True)
class _Spec:
    env: str
    parse: Callable[[object], object]
    unset: str  # how None reads in `mlx-intent config`
    metavar: str
    help: str


SPECS: dict[str, _Spec] = {
    "home": _Spec("MLX_INTENT_HOME", _optional(_path), "(models/ of the checkout)", "DIR", "model folder"),
    "model": _Spec("LLM_MODEL", _optional(_text), "(none)", "NAME", "primary LLM tier model"),
    "fallback_model": _Spec(
        "LLM_FALLBACK_MODEL", _optional(_text), "(none)", "NAME", "fallback LLM tier model"
    ),
    "chain": _Spec(
        "MLX_INTENT_CHAIN", _optional(_chain), "(default chain)", "TIER,...", "comma-separated tiers"
    ),
    "mode": _Spec("MLX_INTENT_MODE", _mode, "", "MODE", f"LLM decoding: {'|'.join(MODES)}"),
    "latency_budget_ms": _Spec(
        "MLX_INTENT_LATENCY_BUDGET_MS",
        number_parser(float, 0, low_open=True),
        "",
        "MS",
        "latency budget per query (ms)",
    ),
    "min_confidence": _Spec(
        "MLX_INTENT_MIN_CONFIDENCE", number_parser(float, 0, 1), "", "P", "below this the chain tries the next tier"
    ),
    "margin": _Spec(
        "MLX_INTENT_MARGIN",
        number_parser(float, 0, 1),
        "",
        "M",
        "a tier whose top two intents are closer than this passes over as ambiguous (0: off)",
    ),
    "keyword_floor": _Spec(
        "MLX_INTENT_KEYWORD_FLOOR",
        _switch,
        "",
        "on|off",
        "a model tier before the keyword tier must also beat its calibrated accuracy",
    ),
    "combine": _Spec(
        "MLX_INTENT_COMBINE",
        _switch,
        "",
        "on|off",
        "the e5-small tier answers with its calibrated combination with the keyword tier when it comes before it",
    ),
    "cache_size": _Spec("MLX_INTENT_CACHE_SIZE", number_parser(int, 0), "", "N", "result cache entries (0: off)"),
    "max_loaded_models": _Spec("MLX_INTENT_MAX_LOADED", number_parser(int, 1), "", "N", "models kept in memory"),
    "retry_after_s": _Spec(
        "MLX_INTENT_RETRY_AFTER_S",
        number_parser(float, 0),
        "",
        "S",
        "back-off before retrying a tier that failed to load",
    ),
    "batch_size": _Spec("MLX_INTENT_BATCH_SIZE", number_parser(int, 1), "", "N", "queries per batch"),
    "log": _Spec("MLX_INTENT_LOG", _optional(_path), "(off)", "FILE", "JSON-lines classification log"),
}

# Setting name -> environment variable, for documentation and display.
ENV_VARS: dict[str, str] = {name: spec.env for name, spec in SPECS.items()}


def _show(name: str, value: object) -> str:
    if value is None:
        return SPECS[name].unset
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_LINE = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*")
_DOUBLE = re.compile(r'"((?:[^"\\]|\\.)*)"\s*(?:#.*)?')
_SINGLE = re.compile(r"'([^']*)'\s*(?:#.*)?")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines: optional ``export``, single or double quotes, ``#`` comments.

    An unquoted ``#`` starts a comment at the start of a value or after whitespace (``a#b`` stays whole);
    double quotes understand backslash escapes, single quotes take the text literally.
    A line that is not KEY=VALUE raises SettingsError naming the file and line number, never the line's text.
    """
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"cannot read {path}: {e}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        if m is None:
            # the line itself is not echoed: a malformed line may well be a pasted token or password
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE (the line is not shown: it may hold a secret)")
        key, raw = m.groups()
        if raw.startswith('"'):
            q = _DOUBLE.fullmatch(raw)
            if q is None:
                raise SettingsError(f"{path}:{number}: unterminated double quote in {key}")
            values[key] = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e[1], e[1]), q[1])
        elif raw.startswith("'"):
            q = _SINGLE.fullmatch(raw)
            if q is None:
                raise SettingsError(f"{path}:{number}: unterminated single quote in {key}")
            values[key] = q[1]
        else:
            values[key] = re.split(r"(?:^|\s)#", raw, maxsplit=1)[0].rstrip()
    return values


def load_settings(
    cli: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    dotenv: Path | None = None,
) -> Settings:
    """Build the settings: defaults < ``.env`` < environment < ``cli`` (field names; None values ignored).

    ``environ`` defaults to ``os.environ``; ``dotenv`` to ``./.env`` when that file exists (an explicit
    path must exist).  Only the winning value of each setting is parsed, so a later layer can fix a bad
    earlier one.
    """
    environ = os.environ if environ is None else environ
    unknown = sorted(set(cli or ()) - set(SPECS))
    if unknown:
        raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")

    layers: list[tuple[str, Mapping[str, object]]] = []
    path = dotenv if dotenv is not None else Path.cwd() / ".env"
    if dotenv is not None or path.is_file():
        if not path.is_file():
            raise SettingsError(f"no .env file at {path}")
        file_values = read_dotenv(path)
        layers.append(
            (f".env ({path})", {n: file_values[s.env] for n, s in SPECS.items() if s.env in file_values})
        )
    layers.append(("environment", {n: environ[s.env] for n, s in SPECS.items() if s.env in environ}))
    layers.append(("command line", {n: v for n, v in (cli or {}).items() if v is not None}))

    winners: dict[str, tuple[str, object]] = {}
    for source, layer in layers:
        winners.update({name: (source, raw) for name, raw in layer.items()})

    values: dict[str, object] = {}
    for name, (source, raw) in winners.items():
        spec = SPECS[name]
        variable = flag(name) if source == "command line" else spec.env
        try:
            values[name] = spec.parse(raw)
        except ValueError as e:
            raise SettingsError(f"{variable}={raw!r} (from {source}): {e}") from None
    if values.get("home") is None:  # unset, or blank to clear .env's: the default folder, decided here once
        values["home"] = default_home()
    sources = {name: winners[name][0] if name in winners else "default" for name in SPECS}
    return Settings(**values, sources=sources)  # type: ignore[arg-type]


def settings_home(environ: Mapping[str, str] | None = None, dotenv: Path | None = None) -> Path:
    """The ``home`` setting as ``load_settings`` gives it without flags: ``.env`` < MLX_INTENT_HOME, parsed
    alike, else ``default_home()``.  Only ``home`` is read, so a bad other setting does not stop a path: for
    the library's entry points called without a home (``IntentClassifier()``, ``EncoderClassifier()``...),
    which then pass it down; commands pass ``Settings.home``."""
    environ = os.environ if environ is None else environ
    spec = SPECS["home"]
    raw, source = environ.get(spec.env), "environment"
    path = dotenv if dotenv is not None else Path.cwd() / ".env"
    if raw is None and (dotenv is not None or path.is_file()):
        raw, source = read_dotenv(path).get(spec.env), f".env ({path})"
    try:
        home = spec.parse(raw)
    except ValueError as e:
        raise SettingsError(f"{spec.env}={raw!r} (from {source}): {e}") from None
    return default_home() if home is None else home  # type: ignore[return-value]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")
