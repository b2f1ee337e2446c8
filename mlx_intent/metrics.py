"""In-process metrics for every classification, and the append-only JSON-lines classification log.

Metrics keep bounded memory however long the process runs: counters over small key sets, fixed
latency and confidence buckets, and a fixed-size reservoir sample of latencies for the percentiles.
The log survives crashes: each record is one ``write`` of a whole line followed by ``fsync``.  It never
costs an answer: a record that cannot be written (a full disk, text that is not UTF-8) is counted
(``log_write_failures``) and warned about once, and the answer is given all the same.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import sys
import threading
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlx_intent.errors import warn_once
from mlx_intent.jsonl import JSONLError, iter_jsonl, repair_tail
from mlx_intent.results import ABSENT, WARMUP

# Upper edges (ms) of the latency buckets, 1-2-5 spaced; one more bucket holds everything above the last.
LATENCY_EDGES_MS: tuple[float, ...] = (
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
    10000,
    20000,
    50000,
)
CONFIDENCE_BINS = 10
RESERVOIR_SIZE = 10_000  # percentiles are exact up to this many records, a uniform sample after
MAX_REASONS = 100  # distinct fallback reasons kept; the rest are counted under "(other)"
MB = 1024 * 1024


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (MiB): ``ru_maxrss`` is KB on Linux, bytes on macOS."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MB if sys.platform == "darwin" else 1024)


def peak_memory_mb() -> float | None:
    """Peak MLX memory of this process in MB (MiB), or None when this process has not imported MLX.

    MLX is read only when already imported: a process that never loaded it has no MLX memory to report,
    and importing it just to read zero would cost a noticeable start-up.  Never raises.
    """
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return None
    try:
        get = getattr(mx, "get_peak_memory", None) or mx.metal.get_peak_memory
        return get() / MB
    except Exception:  # a backend without the counter: no figure rather than a failed classification
        return None


def is_absent(entry: Mapping[str, Any]) -> bool:
    """Whether a ``fallbacks`` entry says its tier is absent here (an entry without a kind is not)."""
    return entry.get("kind") in ABSENT


def is_warming(entry: Mapping[str, Any]) -> bool:
    """Whether a ``fallbacks`` entry says its tier was still loading while the server warmed up."""
    return entry.get("kind") in WARMUP


def runtime_fallback(fallbacks) -> bool:
    """Whether a tier passed over at run time (failed to load, raised, timed out, answered invalidly or
    unsure, rule 1): any ``fallbacks`` entry other than an absent tier or one still loading at start-up."""
    return any(not (is_absent(f) or is_warming(f)) for f in fallbacks or ())


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def percentile_sorted(ordered: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), on sorted values."""
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Metrics:
    """Running figures over classification results; thread-safe, a few microseconds per record."""

    def __init__(self, reservoir_size: int = RESERVOIR_SIZE, seed: int = 0, live_memory: bool = True) -> None:
        """``live_memory``: read this process's MLX peak for results without peak_memory_mb; off when
        summarizing a log written by another process."""
        self._live_memory = live_memory
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._reservoir_size = reservoir_size
        # Latency per query (a call's time over the texts it answered: the headline) and per call (the time
        # of the whole batch the query came in), sampled in pairs.
        self._latencies: list[float] = []
        self._call_latencies: list[float] = []
        self._latency_buckets = [0] * (len(LATENCY_EDGES_MS) + 1)
        self._latency_sum = self._call_latency_sum = 0.0
        self._latency_max = self._call_latency_max = 0.0
        self._batch_texts_sum = self._batch_texts_max = 0
        self._confidence_bins = [0] * CONFIDENCE_BINS
        self._intents: Counter[str] = Counter()
        self._tiers: Counter[str] = Counter()
        self._langs: Counter[str] = Counter()
        self._models: Counter[str] = Counter()
        self._tier_intents: dict[str, Counter[str]] = {}
        self._reasons: Counter[str] = Counter()
        self._absent: dict[str, dict[str, Any]] = {}
        self._count = self._fallbacks = self._warming = self._passed_over = self._invalid_json = self._cached = 0
        self._labelled = self._correct = 0
        self._peak_memory_mb: float | None = None
        self._log_write_failures = 0

    def record_log_failures(self, records: int) -> None:
        """Count answers given whose log record could not be written (ClassificationLog.write_many)."""
        if not records:
            return
        with self._lock:
            self._log_write_failures += records

    @property
    def log_write_failures(self) -> int:
        """Answers given whose log record was lost; cheap (read on every /metrics scrape)."""
        return self._log_write_failures

    def record(self, result: Mapping[str, Any], lang: str | None = None, label: str | None = None) -> None:
        """Count one result: primary_intent, confidence, tier and latency_ms (the call's) are required;
        latency_per_query_ms and batch_texts (else latency_ms and 1: a record of one text per call), model,
        fallbacks, cached, valid_json (True if absent) and peak_memory_mb (read from MLX if absent) are
        optional.  Run-time fallback reasons are counted as "tier: reason"; a tier absent here is listed
        once in absent_tiers and is not a fallback."""
        intent = str(result["primary_intent"])
        confidence = float(result["confidence"])
        tier = str(result["tier"])
        model = str(result.get("model") or "(none)")
        call_latency = float(result["latency_ms"])
        per_query = result.get("latency_per_query_ms")
        latency = call_latency if per_query is None else float(per_query)
        batch = int(result.get("batch_texts") or 1)
        # Bins first: a bad value raises here, before anything is counted.
        conf_bin = min(max(int(confidence * CONFIDENCE_BINS), 0), CONFIDENCE_BINS - 1)
        latency_bucket = bisect.bisect_right(LATENCY_EDGES_MS, latency)
        fallbacks = list(result.get("fallbacks") or ())
        absent = [f for f in fallbacks if is_absent(f)]
        reasons = [f"{f.get('tier', '?')}: {f.get('reason', '?')}" for f in fallbacks if runtime_fallback([f])]
        memory = result.get("peak_memory_mb")
        if memory is not None:
            memory = float(memory)
        elif self._live_memory:
            memory = peak_memory_mb()
        with self._lock:
            n = self._count = self._count + 1
            self._intents[intent] += 1
            self._tiers[tier] += 1
            self._langs[lang or "unknown"] += 1
            self._models[model] += 1
            self._tier_intents.setdefault(tier, Counter())[intent] += 1
            self._confidence_bins[conf_bin] += 1
            self._latency_buckets[latency_bucket] += 1
            self._latency_sum += latency
            self._latency_max = max(self._latency_max, latency)
            self._call_latency_sum += call_latency
            self._call_latency_max = max(self._call_latency_max, call_latency)
            self._batch_texts_sum += batch
            self._batch_texts_max = max(self._batch_texts_max, batch)
            if len(self._latencies) < self._reservoir_size:
                self._latencies.append(latency)
                self._call_latencies.append(call_latency)
            else:  # Algorithm R: every latency seen so far stays in the sample with equal probability
                slot = self._random.randrange(n)
                if slot < self._reservoir_size:
                    self._latencies[slot] = latency
                    self._call_latencies[slot] = call_latency
            for f in absent:
                name = str(f.get("tier", "?"))
                if name in self._absent or len(self._absent) < MAX_REASONS:
                    seen = self._absent.setdefault(name, {"kind": f.get("kind"), "reason": f.get("reason"), "count": 0})
                    seen["count"] += 1
            self._passed_over += bool(fallbacks)
            self._warming += any(map(is_warming, fallbacks))
            if reasons:
                self._fallbacks += 1
                for reason in reasons:
                    known = reason in self._reasons or len(self._reasons) < MAX_REASONS
                    self._reasons[reason if known else "(other)"] += 1
            self._invalid_json += not result.get("valid_json", True)
            self._cached += bool(result.get("cached", False))
            if label is not None:
                self._labelled += 1
                self._correct += intent == label
            if memory is not None and (self._peak_memory_mb is None or memory > self._peak_memory_mb):
                self._peak_memory_mb = memory

    def snapshot(self) -> dict[str, Any]:
        """A plain JSON-able summary; rates and percentiles are None when there is nothing to divide."""
        with self._lock:
            n = self._count
            ordered, calls = sorted(self._latencies), sorted(self._call_latencies)
            return {
                "count": n,
                "by_intent": dict(self._intents),
                "by_tier": dict(self._tiers),
                "by_lang": dict(self._langs),
                "by_model": dict(self._models),
                "by_tier_intent": {tier: dict(c) for tier, c in self._tier_intents.items()},
                # Per query (the headline): each query's share of the call that answered it.
                "latency_ms": {
                    "per": "query",
                    "p50": percentile_sorted(ordered, 50),
                    "p95": percentile_sorted(ordered, 95),
                    "p99": percentile_sorted(ordered, 99),
                    "mean": self._latency_sum / n if n else None,
                    "max": self._latency_max if n else None,
                    "edges": list(LATENCY_EDGES_MS),
                    "counts": list(self._latency_buckets),
                },
                # Per call: the time of the whole batch each query came in (counted once per query).
                "latency_per_call_ms": {
                    "p50": percentile_sorted(calls, 50),
                    "p95": percentile_sorted(calls, 95),
                    "p99": percentile_sorted(calls, 99),
                    "mean": self._call_latency_sum / n if n else None,
                    "max": self._call_latency_max if n else None,
                },
                "batch_texts": {"mean": self._batch_texts_sum / n if n else None, "max": self._batch_texts_max or None},
                # Run-time fallbacks only; tiers absent here are listed once, apart.
                "fallback": {
                    "count": self._fallbacks,
                    "rate": _rate(self._fallbacks, n),
                    "reasons": dict(self._reasons.most_common()),
                    "absent_tiers": {name: dict(seen) for name, seen in self._absent.items()},
                    "passed_over": {"count": self._passed_over, "rate": _rate(self._passed_over, n)},
                    # Answered while the server was still loading a tier above (not fallbacks).
                    "warming": {"count": self._warming, "rate": _rate(self._warming, n)},
                },
                "valid_json_rate": _rate(n - self._invalid_json, n),
                "confidence": {
                    "edges": [i / CONFIDENCE_BINS for i in range(CONFIDENCE_BINS + 1)],
                    "counts": list(self._confidence_bins),
                },
                "cache": {"hits": self._cached, "rate": _rate(self._cached, n)},
                "peak_memory_mb": self._peak_memory_mb,
                "log_write_failures": self._log_write_failures,
                "accuracy": {
                    "labelled": self._labelled,
                    "correct": self._correct,
                    "rate": _rate(self._correct, self._labelled),
                },
            }


def log_record(result: Mapping[str, Any], text: str, lang: str | None, label: str | None = None) -> dict[str, Any]:
    """The log line for one classification: the result fields plus ts, text, lang, label, peak_memory_mb."""
    ts = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    record = {"ts": ts, **result, "text": text, "lang": lang}
    if label is not None:
        record["label"] = label
    record.setdefault("peak_memory_mb", peak_memory_mb())
    return record


class LogError(ValueError):
    """A classification log that cannot be read: corruption before the last line, or no such file."""


# Every record starts with these bytes (log_record puts ts first; write_many writes compact JSON), so a file
# that does not is no classification log, and a torn-tail repair would cut into someone else's data.
LOG_START = b'{"ts":"'


def log_problem(head: bytes) -> str | None:
    """Why a file whose first bytes are ``head`` is not a classification log (None if it is one, or is empty).
    A text file, an image, the feedback store or a JSONL input would each lose their tail to the repair."""
    if head[: len(LOG_START)] == LOG_START[: len(head)]:
        return None
    return f"not a classification log (its lines would start with {LOG_START.decode()}...)"


def check_log_file(path: Path | str) -> None:
    """Raise LogError if ``path`` exists and is not a classification log, before anything opens it to append."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LOG_START))
    except FileNotFoundError:
        return
    except OSError as e:
        raise LogError(f"cannot read log {path}: {e.strerror or e}") from None
    if (problem := log_problem(head)) is not None:
        raise LogError(f"{path}: {problem}; refusing to append to it")


class LogRecords(list):
    """The records of a log; ``skipped`` counts the torn trailing line left by a crash (0 or 1)."""

    skipped: int = 0


class ClassificationLog:
    """Append-only JSON-lines writer that loses no completed line in a crash, even SIGKILL.

    Each record goes out as one ``os.write`` of the whole line on an O_APPEND descriptor, then ``fsync``.
    Opening a log whose last line was torn by a crash first cuts that fragment off (or, if it is a whole
    record only missing its newline, ends it), so new records never glue onto it.  A file that is not a
    log (``log_problem``) is refused (LogError) and left as it was.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.failures = 0  # records that could not be written (their answers were given)
        self.error: str | None = None  # why the last one could not
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)  # travellers' texts: owner only
        try:
            if (problem := log_problem(os.pread(self._fd, len(LOG_START), 0))) is not None:
                raise LogError(f"{self.path}: {problem}; refusing to append to it")
            self._repair_tail()
        except BaseException:
            os.close(self._fd)
            raise

    def _repair_tail(self) -> None:
        repair_tail(self._fd)

    def write(self, record: Mapping[str, Any]) -> int:
        """Append one record as one line and fsync; 1 if it could not be written, else 0 (see write_many)."""
        return self.write_many([record])

    def write_many(self, records: list[Mapping[str, Any]]) -> int:
        """Append whole lines with one write and one fsync (a batch costs one fsync, not one per line); return
        how many records could not be written.

        Never raises for the data or the disk, since the answers are already computed: text that is not
        UTF-8 (a lone surrogate, as JSON's "\\ud800" reads) is written as its JSON escape, a record JSON cannot
        hold is left out, and a failed write (a full disk) is cut back off, so the log keeps whole lines only.
        Lost records are counted in ``failures`` and warned about once per log, never once per line."""
        lines, why = [], ""
        for record in records:
            try:
                line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
            except (TypeError, ValueError) as e:  # an object JSON cannot write, a circular reference
                why = f"a record JSON cannot hold ({type(e).__name__}: {e})"
                continue
            lines.append(line.encode("utf-8", "backslashreplace"))  # a lone surrogate back to its JSON escape
        with self._lock:
            lost = len(records) - len(lines)
            if lines:
                data, start = b"".join(lines), None
                try:
                    start = os.fstat(self._fd).st_size
                    view = memoryview(data)
                    while view:  # a regular file takes the whole line at once; loop only for the rare short write
                        view = view[os.write(self._fd, view) :]
                    os.fsync(self._fd)
                except OSError as e:
                    self._cut(start, len(data))
                    lost, why = len(records), e.strerror or str(e)
            if lost:
                self._failed(lost, why)
        return lost

    def _cut(self, start: int | None, size: int) -> None:
        """Take what a failed write of ``size`` bytes at ``start`` left back off (best effort), so the log keeps
        whole lines; not if the file grew past it (another writer's lines may follow)."""
        if start is None:
            return
        try:
            if start < os.fstat(self._fd).st_size <= start + size:
                os.ftruncate(self._fd, start)
        except OSError:
            pass  # the next open's repair_tail cuts a torn line off

    def _failed(self, records: int, why: str) -> None:
        self.failures += records
        self.error = why
        warn_once(
            ("log", str(self.path)),
            f"cannot write the classification log {self.path}: {why}; answers are still given, their lost "
            "records are counted (log_write_failures)",
        )

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> ClassificationLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: Path | str) -> LogRecords:
    """Every record of a log, in order.  A torn or invalid last line (a crash mid-write) is skipped and
    counted in ``.skipped``; an invalid line before it raises LogError naming the line."""
    path = Path(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise LogError(f"cannot read log {path}: {e.strerror or e}") from None
    records = LogRecords()
    try:
        for number, record in iter_jsonl(lines, str(path)):
            if not isinstance(record, dict):
                raise JSONLError(str(path), number, f"expected a JSON object, got {type(record).__name__}")
            records.append(record)
    except JSONLError as e:
        if any(line.strip() for line in lines[e.line :]):
            why = f"corrupt record ({e.reason}); only a torn last line is tolerated"
            raise LogError(f"{path}:{e.line}: {why}") from None
        records.skipped = 1
    return records
