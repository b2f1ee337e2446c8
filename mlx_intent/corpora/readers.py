"""Parsers for each corpus's own file format, yielding plain (split, label, text) records.

Each reader takes the root of a checkout of the corpus repository (or of the files that
`fetch_corpus` cached, which keep the repository's paths) and raises CorpusFormatError
naming the file when a file is missing or malformed, so the CLI can say which one.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mlx_intent.schema import LANGUAGES


class CorpusFormatError(ValueError):
    """A corpus file is missing or does not parse; the message names the file."""


@dataclass(frozen=True)
class Record:
    """One labelled sentence as the corpus has it, before mapping to our intents."""

    corpus: str
    split: str
    key: str  # stable within corpus+split: the corpus's own id, or the position in its file
    source_intent: str
    text: str
    lang: str = "en"

    @property
    def id(self) -> str:
        return f"{self.corpus}-{self.split}-{self.key}"

    @property
    def source(self) -> str:
        return f"{self.corpus}/{self.split}/{self.source_intent}"


def _need(path: Path) -> Path:
    if not path.is_file():
        raise CorpusFormatError(f"missing corpus file: {path}")
    return path


def _json(path: Path) -> object:
    try:
        return json.loads(_need(path).read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusFormatError(f"corrupt corpus file {path}: {e}") from None


# --- CLINC150 -------------------------------------------------------------------------

CLINC_FILE = "data/data_full.json"


def read_clinc150(root: Path, splits: tuple[str, ...]) -> Iterator[Record]:
    """data_full.json: {split: [[text, intent], ...]}; the oos_* splits carry the label 'oos'."""
    path = root / CLINC_FILE
    data = _json(path)
    if not isinstance(data, dict):
        raise CorpusFormatError(f"corrupt corpus file {path}: expected an object of splits")
    for split in splits:
        rows = data.get(split)
        if not isinstance(rows, list):
            raise CorpusFormatError(f"corrupt corpus file {path}: no split {split!r}")
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 2 and all(isinstance(x, str) for x in row)):
                raise CorpusFormatError(f"corrupt corpus file {path}: {split}[{i}] is not [text, intent]")
            yield Record("clinc150", split, f"{i:06d}", row[1], row[0])


# --- HWU64 / NLU-Evaluation-Data ------------------------------------------------------

HWU_FULL = "AnnotatedData/NLU-Data-Home-Domain-Annotated-All.csv"
HWU_FOLDS = "CrossValidation/autoGeneFromRealAnno/*/CrossValidation/KFold_*/testset/csv/*.csv"
_SLOT = re.compile(r"\[\s*[^\[\]:]+?\s*:\s*([^\[\]]*?)\s*\]")


def strip_annotation(text: str) -> str:
    """'wake me at [time : five am]' -> 'wake me at five am' (HWU64/SLURP slot markup)."""
    return " ".join(_SLOT.sub(r"\1", text).split())


def _hwu_rows(path: Path) -> Iterator[dict[str, str]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter=";")
            fields = set(reader.fieldnames or ())
            if not {"scenario", "intent", "answerid"} <= fields:
                raise CorpusFormatError(f"corrupt corpus file {path}: header lacks scenario;intent;answerid")
            yield from reader
    except (UnicodeDecodeError, csv.Error) as e:
        raise CorpusFormatError(f"corrupt corpus file {path}: {e}") from None


def read_hwu64(root: Path, splits: tuple[str, ...] = ("all",)) -> Iterator[Record]:
    """The full annotated CSV when present, else the union of the 10 cross-validation test folds.

    Labels are scenario_intent (e.g. alarm_set); rows whose status starts with IRR are
    dropped, as the corpus's own scripts do.  The key is the corpus's answerid, which
    both layouts share, so exclusions keep working whichever layout is read.
    """
    full = root / HWU_FULL
    files = [full] if full.is_file() else sorted(root.glob(HWU_FOLDS))
    if not files:
        raise CorpusFormatError(f"missing corpus file: {full} (nor any {HWU_FOLDS})")
    seen: set[str] = set()
    for path in files:
        for n, row in enumerate(_hwu_rows(path), start=2):
            if (row.get("status") or "").startswith("IRR"):
                continue
            anno = row.get("answer_annotation") or ""
            text = row.get("answer_from_anno") or strip_annotation(anno) or row.get("answer_normalised") or ""
            scenario, intent, key = (row.get(k) or "" for k in ("scenario", "intent", "answerid"))
            if not (scenario and intent and key):
                raise CorpusFormatError(f"corrupt corpus file {path}: line {n} lacks scenario, intent or answerid")
            if key in seen:  # the same answer in two layouts or folds
                continue
            seen.add(key)
            yield Record("hwu64", "all", key, f"{scenario}_{intent}", text.strip())


# --- SLURP ----------------------------------------------------------------------------


def _jsonl_fields(path: Path, fields: Callable[[dict], tuple]) -> Iterator[tuple]:
    """``fields(row)`` of each line of a JSONL corpus file; a line that is no JSON object with those fields names
    the file and the line."""
    with _need(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield fields(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorpusFormatError(f"corrupt corpus file {path}: line {n}: {e!r}") from None


def read_slurp(root: Path, splits: tuple[str, ...]) -> Iterator[Record]:
    """dataset/slurp/<split>.jsonl; the label is scenario_action (the 'intent' field is not always that)."""
    for split in splits:
        path = root / "dataset" / "slurp" / f"{split}.jsonl"
        for label, text, key in _jsonl_fields(
            path, lambda r: (f"{r['scenario']}_{r['action']}", r["sentence"], r["slurp_id"])
        ):
            yield Record("slurp", split, str(key), label, str(text).strip())


# --- xSID -----------------------------------------------------------------------------

XSID_DIR = "data/xSID"
_XSID_META = re.compile(r"#\s*(text|intent|id)\s*[:=]\s*(.*)")


def read_xsid(
    root: Path, splits: tuple[str, ...] = ("test",), langs: tuple[str, ...] | None = tuple(LANGUAGES)
) -> Iterator[Record]:
    """data/xSID/<lang>.<split>.conll: '# text: ...' / '# intent: ...' comment lines start each sentence.

    By default only the languages the classifier serves (en, de, tr, ar of xSID's; not de-st, a dialect);
    ``langs=None`` reads them all.

    Files use either ':' or '=' after the key, and some carry a '# text-en' line too,
    which is ignored (it is the English source, not the sentence).
    """
    for split in splits:
        files = sorted((root / XSID_DIR).glob(f"*.{split}.conll"))
        if not files:
            raise CorpusFormatError(f"missing corpus file: {root / XSID_DIR}/*.{split}.conll")
        for path in files:
            lang = path.name.split(".")[0]
            if langs is not None and lang not in langs:
                continue
            yield from _xsid_file(path, lang, split)


def _xsid_file(path: Path, lang: str, split: str) -> Iterator[Record]:
    try:
        blocks = path.read_text("utf-8").split("\n\n")
    except UnicodeDecodeError as e:
        raise CorpusFormatError(f"corrupt corpus file {path}: {e}") from None
    n = 0
    for block in blocks:
        meta: dict[str, str] = {}
        for line in block.splitlines():
            m = _XSID_META.fullmatch(line.strip())
            if m and m.group(1) not in meta:
                meta[m.group(1)] = m.group(2).strip()
        if not block.strip():
            continue
        if "text" not in meta or "intent" not in meta:
            raise CorpusFormatError(f"corrupt corpus file {path}: sentence {n + 1} lacks '# text' or '# intent'")
        yield Record("xsid", f"{lang}.{split}", f"{n:05d}", meta["intent"], meta["text"], lang)
        n += 1


# --- Snips ----------------------------------------------------------------------------

SNIPS_DIR = "2017-06-custom-intent-engines"


def read_snips(root: Path, splits: tuple[str, ...] = ("validate",)) -> Iterator[Record]:
    """<Intent>/validate_<Intent>.json: {Intent: [{"data": [{"text": chunk, "entity"?: ...}, ...]}, ...]}."""
    for split in splits:
        files = sorted((root / SNIPS_DIR).glob(f"*/{split}_*.json"))
        if not files:
            raise CorpusFormatError(f"missing corpus file: {root / SNIPS_DIR}/*/{split}_*.json")
        for path in files:
            data = _json(path)
            if not (isinstance(data, dict) and len(data) == 1):
                raise CorpusFormatError(f"corrupt corpus file {path}: expected {{intent: [...]}}")
            ((intent, rows),) = data.items()
            for i, row in enumerate(rows):
                try:
                    text = "".join(chunk["text"] for chunk in row["data"])
                except (KeyError, TypeError) as e:
                    raise CorpusFormatError(f"corrupt corpus file {path}: item {i}: {e!r}") from None
                yield Record("snips", split, f"{intent}-{i:04d}", intent, " ".join(text.split()))


# --- MASSIVE -------------------------------------------------------------------------

MASSIVE_DIR = "1.1/data"
MASSIVE_LOCALES: dict[str, str] = {
    "en": "en-US",
    "tr": "tr-TR",
    "ar": "ar-SA",
    "fr": "fr-FR",
    "de": "de-DE",
    "ru": "ru-RU",
}


def read_massive(root: Path, splits: tuple[str, ...]) -> Iterator[Record]:
    """1.1/data/<locale>.jsonl of the official release (id, locale, partition, intent, utt, ...), our six locales.

    The key is ``<lang>-<id>``: MASSIVE's id is SLURP's and is shared by a request's six localisations,
    so ``parallel_id`` finds the English original of any row (row-level relabels are made on it).
    """
    for lang, locale in MASSIVE_LOCALES.items():
        rows = _jsonl_fields(
            root / MASSIVE_DIR / f"{locale}.jsonl", lambda r: (r["partition"], r["intent"], r["utt"], r["id"])
        )
        for split, label, text, key in rows:
            if split in splits:
                yield Record("massive", split, f"{lang}-{key}", label, " ".join(str(text).split()), lang)


def parallel_id(rec: Record) -> str:
    """MASSIVE's own id of a row (the same in every locale); other corpora's key as it is."""
    return rec.key.split("-", 1)[1] if rec.corpus == "massive" else rec.key


READERS: dict[str, Callable[..., Iterator[Record]]] = {
    "clinc150": read_clinc150,
    "hwu64": read_hwu64,
    "slurp": read_slurp,
    "xsid": read_xsid,
    "snips": read_snips,
    "massive": read_massive,
}
