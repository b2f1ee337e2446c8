"""Build training, calibration, held-out and reserved files from the public corpora.

Order of the filters (each removal is counted under its reason in the summary):

1. map each source label (maps/<corpus>.tsv); `-` drops it (`unmapped_label`), row
   exclusions (maps/<corpus>.exclude.tsv) drop single training rows (`excluded_row`);
2. reserved splits are written on their own, de-duplicated within each file;
3. on the training side, a text found in SLURP test is removed from HWU64
   (`in_slurp_test`: SLURP re-recorded HWU64 prompts), then any text found in any
   reserved split (`in_reserved`), then any text in our own train/dev/probe
   (`in_own_data`), then duplicates within and across corpora keep their first row
   (`duplicate`) unless the copies disagree on the intent, when all go (`label_conflict`);
4. the part (train / calib / heldout) comes from a hash of the normalized text, so a
   rebuild with more data never moves a sentence between parts;
5. `general` is capped to a share of public-train and of public-calib (`general_cap`), in each language.

MASSIVE (six localisations of SLURP's requests, ids shared with SLURP) differs in three ways: its rows
are relabelled request by request where a boundary rule of the guide overrides the source label
(maps/massive.relabel.tsv); its off-topic rows are capped per source intent and language before
anything else (`massive_per_source`), so every language keeps every kind of off-topic command; and its
dev split is halved by a hash of the request's id (the same half in every language): one half
calibrates, the other is reported as public-heldout-massive, and SLURP devel's English copies of the
reported half's requests are not trained on (`massive_heldout`).

Texts are compared after mlx_intent.normalize (NFKC, casefold, diacritics and
punctuation folded, spaces collapsed), the folding our data checks already use.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from mlx_intent.normalize import normalize
from mlx_intent.schema import FALLBACK_INTENT, INTENTS

from .mapping import DROP, load_exclusions, load_map, load_relabels
from .readers import READERS, Record, parallel_id
from .sources import CORPORA, TRAINING_ORDER, corpus

OWN_FILES: tuple[str, ...] = ("train.jsonl", "dev.jsonl", "probe.jsonl", "context-dev.jsonl")
DEFAULT_GENERAL_CAP = 0.30
MASSIVE_PER_SOURCE = 30  # off-topic MASSIVE train rows kept per source intent and language
DEFAULT_SEED = 0

# Per training corpus and split: the fractions (train, calib, heldout) of the hash range.
SPLIT_PLAN: dict[str, dict[str, tuple[float, float, float]]] = {
    "clinc150": {"train": (0.9, 0.1, 0.0), "oos_train": (0.9, 0.1, 0.0), "val": (0, 0, 1), "oos_val": (0, 0, 1)},
    "hwu64": {"all": (0.8, 0.1, 0.1)},
    "slurp": {"devel": (0.6, 0.2, 0.2)},
    "massive": {"train": (1, 0, 0), "dev": (0, 0.5, 0.5)},  # dev: by the request's id, not its text
}


def text_key(text: str) -> str:
    """The form two texts must share to count as the same sentence."""
    return normalize(text)


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a normalized text: the split key, not random state."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def assign_part(corpus_name: str, split: str, key: str) -> str:
    """train, calib or heldout for a training-side row, by SPLIT_PLAN and the text hash."""
    train, calib, _ = SPLIT_PLAN[corpus_name][split]
    x = hash_fraction(key)
    return "train" if x < train else "calib" if x < train + calib else "heldout"


def to_row(rec: Record, intents: tuple[str, ...]) -> dict:
    """A record in our JSONL row format (all_intents is the primary alone unless a row-level relabel says more)."""
    return {
        "id": rec.id,
        "text": rec.text,
        "lang": rec.lang,
        "primary_intent": intents[0],
        "all_intents": list(intents),
        "source": rec.source,
    }


def _massive_heldout(slurp_id: str) -> bool:
    """Whether MASSIVE's dev half that is reported holds this request (MASSIVE's ids are SLURP's)."""
    return assign_part("massive", "dev", slurp_id) == "heldout"


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _sample_key(row: dict) -> str:
    """What a cap ranks a row by: a MASSIVE request's id, so that a capped evaluation set holds the same
    requests in every language; any other row's own id."""
    rid = row["id"]
    return rid.rsplit("-", 1)[1] if rid.startswith("massive-") and row["source"].split("/")[1] != "train" else rid


def cap_general(rows: list[dict], cap: float, seed: int = DEFAULT_SEED) -> tuple[list[dict], int]:
    """Keep at most `cap` of each language's rows as `general`, choosing which by a seeded hash of the id.

    Off-topic assistant commands are the negatives our own data lacks, but tens of
    thousands of them would swamp the 14 travel intents; the order of the others is kept.
    """
    if not 0 <= cap < 1:
        raise ValueError(f"general cap must be in [0, 1), got {cap}")
    keep: set[str] = set()
    dropped = 0
    for lang in sorted({r["lang"] for r in rows}):
        general = [r for r in rows if r["lang"] == lang and r["primary_intent"] == FALLBACK_INTENT]
        others = sum(r["lang"] == lang for r in rows) - len(general)
        allowed = int(cap * others / (1 - cap))
        ranked = sorted(general, key=lambda r: _rank(seed, _sample_key(r)))
        keep |= {r["id"] for r in ranked[:allowed]}
        dropped += max(0, len(general) - allowed)
    if not dropped:
        return rows, 0
    return [r for r in rows if r["primary_intent"] != FALLBACK_INTENT or r["id"] in keep], dropped


def cap_per_source(
    pairs: list[tuple[Record, tuple[str, ...]]], per_source: int, seed: int = DEFAULT_SEED
) -> tuple[list[tuple[Record, tuple[str, ...]]], int]:
    """Keep at most ``per_source`` general rows per (source intent, language), by a seeded hash of the id.

    MASSIVE is four-fifths off-topic: a share cap alone would keep whichever kinds of command hash
    first, where the tier needs every kind (alarms, lists, music, smart home...) in every language.
    """
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for rec, intents in pairs:
        if intents[0] == FALLBACK_INTENT:
            groups[(rec.source_intent, rec.lang)].append(rec)
    keep = {r.id for g in groups.values() for r in sorted(g, key=lambda r: _rank(seed, r.id))[:per_source]}
    out = [(rec, intents) for rec, intents in pairs if intents[0] != FALLBACK_INTENT or rec.id in keep]
    return out, len(pairs) - len(out)


def read_own_texts(own_data_dir: Path) -> set[str]:
    """Normalized texts of our own train/dev/probe; the folder must hold at least one of them."""
    found = [own_data_dir / f for f in OWN_FILES if (own_data_dir / f).is_file()]
    if not found:
        raise FileNotFoundError(f"no {', '.join(OWN_FILES)} in {own_data_dir}")
    keys = set()
    for path in found:
        for n, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    keys.add(text_key(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"corrupt own data file {path}: line {n}: {e!r}") from None
    return keys


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write via a .partial file and rename, so a failed build never leaves half a file."""
    tmp = path.with_name(path.name + ".partial")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def _intents(rows: list[dict]) -> dict[str, int]:
    c = Counter(r["primary_intent"] for r in rows)
    return {i: c[i] for i in INTENTS if c[i]}


def build(
    sources: Mapping[str, Path],
    out_dir: Path,
    own_data_dir: Path,
    *,
    general_cap: float = DEFAULT_GENERAL_CAP,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Read, map, filter and split the given corpora into out_dir; return (and write) the summary."""
    for name, root in sources.items():
        corpus(name)  # unknown names fail before any work
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{name}: no such folder {root}")
    if "hwu64" in sources and "slurp" not in sources:
        raise ValueError("hwu64 needs slurp too: every HWU64 sentence found in SLURP test must be removed")
    own = read_own_texts(own_data_dir)
    removed: dict[str, Counter] = defaultdict(Counter)
    raw: dict[str, dict[str, int]] = defaultdict(dict)

    def mapped(name: str, records: Iterable[Record], training: bool) -> list[tuple[Record, tuple[str, ...]]]:
        table, excl = load_map(name), load_exclusions(name) if training else {}
        relabels = load_relabels(name) if training else {}
        out = []
        for rec in records:
            raw[name][rec.split] = raw[name].get(rec.split, 0) + 1
            if not rec.text:
                removed["empty_text"][name] += 1
                continue
            if rec.source_intent not in table:
                raise KeyError(f"maps/{name}.tsv has no line for source intent {rec.source_intent!r} ({rec.id})")
            intents = relabels.get(parallel_id(rec)) or (table[rec.source_intent].intent,)
            if intents == (DROP,) and table[rec.source_intent].intent == DROP:
                removed["unmapped_label"][name] += 1
            elif intents == (DROP,) or rec.id in excl:
                removed["excluded_row"][name] += 1
            else:
                out.append((rec, intents))
        return out

    # Reserved splits first: their texts bar the training side.
    reserved_keys: set[str] = set()
    slurp_test: set[str] = set()
    reserved_rows: dict[str, list[dict]] = {}
    for name in (n for n in CORPORA if n in sources and CORPORA[n].reserved_splits):
        records = list(READERS[name](Path(sources[name]), CORPORA[name].reserved_splits))
        keys = {text_key(r.text) for r in records}
        reserved_keys |= keys  # every reserved text, mapped or not
        if name == "slurp":
            slurp_test = keys
        rows, labels = [], defaultdict(set)
        pairs = mapped(name, records, training=False)
        for rec, intents in pairs:
            labels[(rec.lang, text_key(rec.text))].add(intents)
        seen = set()
        for rec, intents in pairs:
            k = (rec.lang, text_key(rec.text))
            if len(labels[k]) > 1:
                removed["label_conflict"][f"reserved-{name}"] += 1
            elif k in seen:
                removed["duplicate"][f"reserved-{name}"] += 1
            else:
                seen.add(k)
                rows.append(to_row(rec, intents))
        if name == "massive":  # capped as its held-out half is, so the two read alike
            rows, n = cap_general(rows, general_cap, seed)
            if n:
                removed["general_cap"][f"reserved-{name}"] += n
        reserved_rows[name] = rows

    # Training side, in TRAINING_ORDER so that the first copy of a duplicate is deterministic.
    candidates: list[tuple[Record, tuple[str, ...], str]] = []
    for name in (n for n in TRAINING_ORDER if n in sources):
        pairs = mapped(name, READERS[name](Path(sources[name]), CORPORA[name].training_splits), True)
        if name == "massive":
            train = [p for p in pairs if p[0].split == "train"]
            train, n = cap_per_source(train, MASSIVE_PER_SOURCE, seed)
            removed["massive_per_source"][name] += n
            pairs = train + [p for p in pairs if p[0].split != "train"]
        for rec, intent in pairs:
            key = text_key(rec.text)
            if name == "hwu64" and key in slurp_test:
                removed["in_slurp_test"][name] += 1
            elif key in reserved_keys:
                removed["in_reserved"][name] += 1
            elif key in own:
                removed["in_own_data"][name] += 1
            else:
                candidates.append((rec, intent, key))
    labels: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for _, intents, key in candidates:
        labels[key].add(intents[:1])
    parts: dict[str, list[dict]] = {"train": [], "calib": []}
    heldout: dict[str, list[dict]] = {n: [] for n in TRAINING_ORDER if n in sources}
    seen: set[str] = set()
    for rec, intents, key in candidates:
        if len(labels[key]) > 1:
            removed["label_conflict"][rec.corpus] += 1
            continue
        # a MASSIVE dev request falls in the same half in every language: split by its id, not its text
        part = assign_part(rec.corpus, rec.split, parallel_id(rec) if rec.corpus == "massive" else key)
        if rec.corpus == "slurp" and part == "train" and "massive" in sources and _massive_heldout(rec.key):
            removed["massive_heldout"][rec.corpus] += 1  # its localisations are reported: not trained in English
            continue
        if key in seen:
            removed["duplicate"][rec.corpus] += 1
            continue
        seen.add(key)
        (heldout[rec.corpus] if part == "heldout" else parts[part]).append(to_row(rec, intents))
    if heldout.get("massive"):
        heldout["massive"], n = cap_general(heldout["massive"], general_cap, seed)
        if n:
            removed["general_cap"]["public-heldout-massive"] += n
    for part in ("train", "calib"):
        parts[part], n = cap_general(parts[part], general_cap, seed)
        if n:
            removed["general_cap"][f"public-{part}"] += n

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"public-train.jsonl": parts["train"], "public-calib.jsonl": parts["calib"]}
    files |= {f"public-heldout-{n}.jsonl": rows for n, rows in heldout.items()}
    files |= {f"reserved-{n}.jsonl": rows for n, rows in reserved_rows.items()}
    outputs = {}
    for fname, rows in files.items():
        write_jsonl(out_dir / fname, rows)
        outputs[fname] = {
            "rows": len(rows),
            "intents": _intents(rows),
            "langs": dict(Counter(r["lang"] for r in rows)),
        }
    summary = {
        "sources": {n: str(p) for n, p in sources.items()},
        "own_data": str(own_data_dir),
        "general_cap": general_cap,
        "seed": seed,
        "read": {n: dict(s) for n, s in raw.items()},
        "removed": {reason: dict(c) for reason, c in sorted(removed.items())},
        "outputs": outputs,
    }
    tmp = out_dir / "summary.json.partial"
    tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", "utf-8")
    os.replace(tmp, out_dir / "summary.json")
    return summary


def format_summary(summary: dict) -> str:
    """The per-file, per-intent counts and the removals as a plain-text table."""
    files = list(summary["outputs"])
    short = [f.removesuffix(".jsonl").replace("public-", "").replace("heldout-", "ho-") for f in files]
    width = max(len(s) for s in short) + 1 if short else 8
    lines = ["intent".ljust(22) + "".join(s.rjust(width) for s in short)]
    for intent in (*INTENTS, "TOTAL"):
        counts = [
            summary["outputs"][f]["rows"] if intent == "TOTAL" else summary["outputs"][f]["intents"].get(intent, 0)
            for f in files
        ]
        lines.append(intent.ljust(22) + "".join(str(c).rjust(width) for c in counts))
    lines.append("")
    lines.append(
        "read: "
        + "; ".join(f"{n} " + ", ".join(f"{s}={c}" for s, c in sp.items()) for n, sp in summary["read"].items())
    )
    for reason, by in summary["removed"].items():
        lines.append(f"removed {reason}: " + ", ".join(f"{k}={v}" for k, v in by.items()))
    return "\n".join(lines)
