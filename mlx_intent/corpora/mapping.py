"""The reviewed label maps: source intent -> one of our 15 intents, or dropped.

The maps are TSV package data (maps/<corpus>.tsv: source_intent, intent, reason), one
line per source label, each with a reason citing the labelling guide (schema.py), so that a reviewer
reads and diffs decisions rather than code.  `-` drops a label that is genuinely
ambiguous for our schema.  maps/<corpus>.exclude.tsv (id, reason) drops single rows of
training splits that contradict their label's mapping (e.g. a taxi to the airport:
boundary rule 2).  Reserved corpora are mapped by label only; they have no exclusions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from mlx_intent.schema import INTENTS

DROP = "-"


class MapError(ValueError):
    """A map file is malformed: an unknown target, a duplicate or a missing reason."""


@dataclass(frozen=True)
class Mapping:
    intent: str  # one of INTENTS, or DROP
    reason: str


def _rows(name: str, header: tuple[str, ...]) -> list[list[str]]:
    path = resources.files(__package__).joinpath("maps", name)
    lines = path.read_text("utf-8").splitlines()
    if not lines or tuple(lines[0].split("\t")) != header:
        raise MapError(f"{name}: first line must be the header {'<TAB>'.join(header)}")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != len(header) or not all(c.strip() for c in cols):
            raise MapError(f"{name}:{n}: expected {len(header)} non-empty tab-separated columns")
        out.append(cols)
    return out


@cache
def load_map(corpus: str) -> dict[str, Mapping]:
    """maps/<corpus>.tsv as {source_intent: Mapping}; every target is checked against the schema."""
    table: dict[str, Mapping] = {}
    for source, intent, reason in _rows(f"{corpus}.tsv", ("source_intent", "intent", "reason")):
        if intent != DROP and intent not in INTENTS:
            raise MapError(f"{corpus}.tsv: {source!r} maps to unknown intent {intent!r}")
        if source in table:
            raise MapError(f"{corpus}.tsv: {source!r} is listed twice")
        table[source] = Mapping(intent, reason)
    return table


@cache
def load_exclusions(corpus: str) -> dict[str, str]:
    """maps/<corpus>.exclude.tsv as {row id: reason}; an absent file means no exclusions."""
    if not resources.files(__package__).joinpath("maps", f"{corpus}.exclude.tsv").is_file():
        return {}
    return {rid: reason for rid, reason in _rows(f"{corpus}.exclude.tsv", ("id", "reason"))}


@cache
def load_relabels(corpus: str) -> dict[str, tuple[str, ...]]:
    """maps/<corpus>.relabel.tsv as {parallel id: intents, primary first}; ``(DROP,)`` excludes the request.

    A row-level decision made on a request's original text under a boundary rule of the guide, which the
    source label's blanket mapping gets wrong (an airport trip filed as a taxi, a restaurant filed as a
    location recommendation).  It applies to every localisation of the request.
    """
    if not resources.files(__package__).joinpath("maps", f"{corpus}.relabel.tsv").is_file():
        return {}
    table: dict[str, tuple[str, ...]] = {}
    for rid, intents, _ in _rows(f"{corpus}.relabel.tsv", ("id", "intents", "reason")):
        names = tuple(intents.split(","))
        if (names != (DROP,) and not all(n in INTENTS for n in names)) or len(set(names)) != len(names):
            raise MapError(f"{corpus}.relabel.tsv: {rid!r} has bad intents {intents!r}")
        if rid in table:
            raise MapError(f"{corpus}.relabel.tsv: {rid!r} is listed twice")
        table[rid] = names
    return table


def map_intent(corpus: str, source_intent: str) -> str:
    """Our intent for a source label (DROP if dropped); KeyError if the map lacks the label."""
    table = load_map(corpus)
    if source_intent not in table:
        raise KeyError(f"maps/{corpus}.tsv has no line for source intent {source_intent!r}")
    return table[source_intent].intent
