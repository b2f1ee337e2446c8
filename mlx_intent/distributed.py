"""``classify --distributed`` and ``eval --distributed``: independent copies of the chain, one per rank of
``mlx.launch``, each on its share of the lines, gathered at the end (the way mlx-lm's own evaluation uses
``mlx.distributed``; a 3B model fits on every Mac, so nothing is split).

- Shares are deterministic: the input's consecutive batches of ``--batch-size`` lines are dealt round-robin
  (batch b to rank b mod N), so every rank sees exactly the batches one process would, and a result differs
  from one process's only in its timing fields (``latency_ms``, ``latency_per_query_ms``).
- Every rank reads the whole input (it must be the same file on every machine: ranks compare its digest), and
  writes its results to its own part file ``OUT.rank-K-of-N.part``, flushed per batch, so ``--resume`` after
  any rank was killed redoes only what no part file holds.
- The ranks move in steps of a few batches and add up their line counts after each (rank 0's progress bar
  shows the whole job); rank 0 sizes the steps so a step takes about ``STEP_SECONDS``, since one ``all_sum``
  costs milliseconds over TCP.
- At the end, the ranks hand rank 0 their outcome and part files through the collectives (no shared disk is
  needed); rank 0 writes ``OUT`` in input order, as one process would, and reports the job: a rank that failed
  is named, and its share is left in its part file to resume.  The other ranks exit 0 once rank 0 has their
  results, so ``mlx.launch`` never stops rank 0 before it has said what happened.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mlx_intent.batch_io import Report, answer_lines, done_ids, id_key, lines_by_id, read_lines
from mlx_intent.errors import EXIT_ERROR, InputError, UserError

STEP_SECONDS = 0.5  # the work between two line counts: progress stays live, the all_sum stays cheap
CHUNK_BYTES = 1 << 24  # part files travel to rank 0 in rounds of this many bytes per rank


def init(enabled: bool):
    """The group of ``mlx.launch``'s ranks, or None when not ``enabled`` or alone (then nothing changes)."""
    if not enabled:
        return None
    import mlx.core as mx

    group = mx.distributed.init()
    return group if group.size() > 1 else None


def who(group) -> str:
    return f"rank {group.rank()} of {group.size()}"


def owner(index: int, batch_size: int, size: int) -> int:
    """The rank that classifies the input's record ``index`` (0-based): batches dealt round-robin."""
    return (index // batch_size) % size


def part_path(output: Path, rank: int, size: int) -> Path:
    return output.with_name(f"{output.name}.rank-{rank}-of-{size}.part")


# ---- collectives --------------------------------------------------------------------------------


def _collective(group, op: Callable, values: np.ndarray) -> np.ndarray:
    """Run ``op`` (an mx.distributed collective) on the CPU stream; a lost peer becomes a UserError naming us."""
    import mlx.core as mx

    try:
        return np.array(op(mx.array(values), group=group, stream=mx.cpu))
    except RuntimeError as e:
        raise UserError(
            f"{who(group)}: lost the connection to the other ranks ({e}); what this rank classified is kept "
            "in its part file: run the same command again with --resume"
        ) from None


def all_sum(group, values: list[int]) -> list[int]:
    import mlx.core as mx

    return _collective(group, mx.distributed.all_sum, np.asarray(values, dtype=np.int64)).tolist()


def gather_bytes(group, data: bytes, keep: bool = True) -> list[bytes] | None:
    """Every rank's ``data``, in rank order, on the ranks that ``keep`` them (all_gather of padded byte
    arrays, in rounds of CHUNK_BYTES per rank so a large part file never needs N copies in memory)."""
    import mlx.core as mx

    size = group.size()
    lengths = all_sum(group, [len(data) if k == group.rank() else 0 for k in range(size)])
    out = [bytearray() for _ in range(size)]
    for start in range(0, max(lengths), CHUNK_BYTES):
        width = min(CHUNK_BYTES, max(lengths) - start)
        buf = np.zeros(width, dtype=np.uint8)
        piece = np.frombuffer(data[start : start + width], dtype=np.uint8)
        buf[: len(piece)] = piece
        rows = _collective(group, mx.distributed.all_gather, buf)
        if keep:
            for k in range(size):
                out[k] += rows[k * width : k * width + max(0, min(width, lengths[k] - start))].tobytes()
    return [bytes(b) for b in out] if keep else None


def broadcast_json(group, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    data = json.dumps(value).encode() if group.rank() == 0 else b""
    return json.loads(gather_bytes(group, data)[0])


def gather_json(group, value: Any, keep_all: bool = False) -> list | None:
    """Every rank's ``value`` on rank 0 (on every rank with ``keep_all``)."""
    parts = gather_bytes(group, json.dumps(value).encode(), keep=keep_all or group.rank() == 0)
    return None if parts is None else [json.loads(p) for p in parts]


class Lockstep:
    """The ranks' line counts, added up every few batches: rank 0's bar shows the whole job's lines.

    ``step(n)`` after each batch of n lines; ``finish()`` when this rank has no more work: it keeps joining
    the counts until no rank has any, so every rank leaves at the same count.  How many batches the next
    step holds is agreed in the same all_sum: the mean of what the working ranks propose, each from its own
    time per batch, so a step takes about STEP_SECONDS."""

    def __init__(self, group, bar) -> None:
        self.group, self.bar = group, bar
        self.lines = self.batches = 0
        self.every = 1
        self.since = time.perf_counter()

    def step(self, n: int) -> None:
        self.lines += n
        self.batches += 1
        if self.batches >= self.every:
            self._sync(active=1)

    def finish(self) -> None:
        while self._sync(active=0):
            pass

    def _sync(self, active: int) -> bool:
        per_batch = (time.perf_counter() - self.since) / max(self.batches, 1)
        proposal = max(1, min(4096, int(STEP_SECONDS / max(per_batch, 1e-6)))) if self.batches else 0
        lines, still, proposed, proposers = all_sum(self.group, [self.lines, active, proposal, proposal > 0])
        self.bar.update(lines)
        if proposers:
            self.every = max(1, proposed // proposers)
        self.lines = self.batches = 0
        self.since = time.perf_counter()
        return still > 0


def progress_bar(group, total: int | None = None, desc: str | None = None):
    """Rank 0's bar of the whole job; the others are quiet.  Under ``mlx.launch`` a rank's stderr is a pipe,
    so rank 0 also shows it when the launcher's terminal has a size (it passes COLUMNS on then)."""
    from tqdm import tqdm

    shown = group.rank() == 0 and (sys.stderr.isatty() or "COLUMNS" in os.environ)
    return tqdm(total=total, unit="q", desc=desc, disable=not shown)


# ---- classify --input --distributed -------------------------------------------------------------


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _check(group, input_path: str, output: Path, resume: bool) -> None:
    """What one process checks, plus what a distributed run needs: a file (not stdin) that is the same on
    every rank, and on --resume no part files of a run with another number of ranks."""
    if input_path == "-":
        raise InputError("--distributed needs --input FILE, which every rank reads (not stdin)")
    if not Path(input_path).is_file():
        raise InputError(f"{who(group)}: {input_path}: no such file")
    if output.exists() and os.path.samefile(input_path, output):
        raise InputError(f"--output {output} is the --input file {input_path}; writing it would erase the queries")
    if resume and output.parent.is_dir():
        ours = re.compile(re.escape(output.name) + r"\.rank-\d+-of-(\d+)\.part")
        others = sorted(
            p.name for p in output.parent.iterdir() if (m := ours.fullmatch(p.name)) and int(m[1]) != group.size()
        )
        if others:
            raise InputError(
                f"{who(group)}: {others[0]} is from a run with another number of ranks: resume it with that "
                "many ranks, or delete it"
            )


def _agree(group, input_path: str) -> None:
    """Every rank reads the same input, or the shares would not fit together: compare digests."""
    digests = gather_json(group, _digest(input_path), keep_all=True)
    odd = [k for k, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise InputError(
            f"{who(group)}: --input {input_path} differs on rank(s) {', '.join(map(str, odd))} from rank 0's; "
            "every machine needs the same file"
        )


def my_batches(
    records: Iterable[tuple], rank: int, size: int, batch_size: int, skip: Callable[[object], bool]
) -> Iterator[list[tuple]]:
    """This rank's batches of ``records`` (every record of the input, in order), less those ``skip`` says are
    done.  A bad line (InputError from ``records``) ends them: the lines before it are yielded first, and every
    rank meets the same line, as one process would."""
    batch: list[tuple] = []
    try:
        for index, record in enumerate(records):
            if index % batch_size == 0 and batch:
                yield batch
                batch = []
            if owner(index, batch_size, size) == rank and not skip(record[1]):
                batch.append(record)
    except InputError:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def classify_file(
    group,
    input_path: str,
    output: Path,
    resume: bool,
    chain,
    batch_size: int,
    user: str | None = None,
    report: Report | None = None,
) -> None:
    """``classify --input --output [--resume]`` over the ranks of ``group``; OUT ends as one process writes it.

    One process's reader, resume and output rows (mlx_intent.batch_io) are used as they are, so a distributed
    run reads, refuses and writes exactly what one process does; ``report`` gets the same notes."""
    _check(group, input_path, output, resume)
    _agree(group, input_path)
    part = part_path(output, group.rank(), group.size())
    held = _hold(group, part)
    try:
        _classify_part(group, input_path, output, part, resume, chain, batch_size, user, report)
    finally:
        os.close(held)


def _hold(group, part: Path) -> int:
    """A descriptor holding an exclusive lock on this rank's ``part``, kept to the end of the run (its unlink
    included), so a run started while an earlier one's ranks still write (a killed launcher leaves them
    running) is refused on every rank, not left to find its part files unlinked under it."""
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        free = 1
    except BlockingIOError:
        free = 0
    if all_sum(group, [free])[0] < group.size():  # every rank learns it, or the others would wait on it
        os.close(fd)
        raise UserError(
            f"{who(group)}: {part.name} (or another rank's part file) is being written by an earlier run whose "
            "ranks are still running; wait for them to end, then --resume"
        )
    return fd


def _classify_part(
    group,
    input_path: str,
    output: Path,
    part: Path,
    resume: bool,
    chain,
    batch_size: int,
    user: str | None,
    report: Report | None,
) -> None:
    """The body of classify_file once this rank holds its part file."""
    rank, size = group.rank(), group.size()
    written = set(broadcast_json(group, sorted(done_ids(output, report=report)) if rank == 0 and resume else []))
    done = written | (done_ids(part, report=report) if resume else set())
    error: InputError | None = None  # a bad input line: every rank stops there
    failure: Exception | None = None  # this rank could not classify or write: it is named, the rest go on
    # backslashreplace, as one process writes: an id with a lone surrogate goes back to the escape it was read from
    mode = "a" if resume else "w"
    with open(part, mode, encoding="utf-8", errors="backslashreplace") as out, progress_bar(group) as bar:
        lock = Lockstep(group, bar)
        lines = read_lines(input_path, set(), user, report)
        batches = my_batches(lines, rank, size, batch_size, lambda i: id_key(i) in done)
        try:
            for batch in batches:
                try:
                    out.write(answer_lines(chain, batch))
                    out.flush()
                except Exception as e:
                    failure = e
                    if not isinstance(e, UserError):
                        traceback.print_exc()
                    break
                lock.step(len(batch))
        except InputError as e:
            error = e
        lock.finish()
    status = None
    if failure is not None:
        words = str(failure) if isinstance(failure, UserError) else f"{type(failure).__name__}: {failure}"
        status = {"error": words, "code": getattr(failure, "exit_code", EXIT_ERROR)}
    statuses = gather_json(group, status, keep_all=True)
    failed = [(k, s) for k, s in enumerate(statuses) if s is not None]
    if failed:
        if rank == 0:
            raise _failed(failed, size, output)
        return
    parts = gather_bytes(group, part.read_bytes(), keep=rank == 0)
    merge_error: Exception | None = None
    if rank == 0:
        try:
            _merge(parts, output, resume, written, read_lines(input_path, set(), report=report))
        except Exception as e:
            merge_error = e
    if all_sum(group, [merge_error is None])[0] == size:  # OUT is whole: the part files are done with
        part.unlink()
    if merge_error is not None:
        raise merge_error
    if error is not None and rank == 0:
        raise error


def _failed(failed: list[tuple[int, dict]], size: int, output: Path) -> UserError:
    """The job's error when ranks failed: each named with its error; their shares stay to resume."""
    named = "; ".join(f"rank {k} of {size} failed: {s['error']}" for k, s in failed)
    err = UserError(
        f"{named}; {output} is not written: every rank's results so far are kept in "
        f"{output.name}.rank-K-of-{size}.part on its machine, so the same command with --resume finishes the job"
    )
    err.exit_code = failed[0][1]["code"]
    return err


def _merge(parts: list[bytes], output: Path, resume: bool, written: set[str], records) -> None:
    """Rank 0 writes OUT in input order from every rank's part file (after what OUT already holds, on
    --resume, as one process appends): the lines up to a bad input line, each id once."""
    lines: dict[str, bytes] = {}
    for data in parts:
        for k, raw in lines_by_id(data, "part"):  # a torn line is skipped: redone since, its id has a whole line
            lines.setdefault(k, raw)
    with open(output, "ab" if resume else "wb") as out:
        try:
            for _, ident, *_ in records:
                k = id_key(ident)
                if k not in written:
                    if k not in lines:
                        raise RuntimeError(f"no rank has a result for id {k}")  # a broken invariant, not input
                    out.write(lines[k] + b"\n")
        except InputError:
            pass  # the error itself is raised once OUT is whole up to it
        out.flush()
        os.fsync(out.fileno())


# ---- eval --distributed -------------------------------------------------------------------------


def run_eval(group, chain, rows: list[dict], batch_size: int) -> dict[str, Any] | None:
    """``evaluation.run.run`` over the ranks: each runs its share of ``rows``, rank 0 gets the outcome of
    all of them, results in row order (so every metric is one process's); the other ranks get None.
    Timing and memory are the slowest rank's, the load average rank 0's."""
    from mlx_intent.evaluation.run import run

    rank, size = group.rank(), group.size()
    owners = [owner(i, batch_size, size) for i in range(len(rows))]
    mine = [row for row, k in zip(rows, owners) if k == rank]
    with progress_bar(group, total=len(rows), desc="eval") as bar:
        lock = Lockstep(group, bar)
        outcome = run(chain, mine, batch_size, progress=lock.step)
        lock.finish()
    outcomes = gather_json(group, outcome)
    if outcomes is None:
        return None
    queues = [iter(o["results"]) for o in outcomes]
    return {
        **outcomes[0],
        "results": [next(queues[k]) for k in owners],
        "wall_s": max(o["wall_s"] for o in outcomes),
        "peak_mlx_mb": max((o["peak_mlx_mb"] for o in outcomes if o["peak_mlx_mb"] is not None), default=None),
        "max_rss_mb": max(o["max_rss_mb"] for o in outcomes),
        "skipped": {k: v for o in outcomes for k, v in o["skipped"].items()},
        "absent": {k: v for o in outcomes for k, v in o["absent"].items()},
        "ranks": size,
    }


def free_ports(count: int = 2) -> int:
    """A port P with P .. P+count-1 free on loopback: for ``mlx.launch -n count --backend ring --starting-port P``
    on one machine (the tests and benchmarks/bench_distributed.py; the ring's ranks listen on them)."""
    import random
    import socket

    for _ in range(50):
        port = random.randrange(20000, 60000)
        try:
            for p in range(port, port + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no {count} free ports in a row on 127.0.0.1")
