"""JSONL batches of queries and answers: read an input (checked line by line), resume an output, write answers.

``classify --input`` and ``classify --distributed`` (mlx_intent.distributed) share these, so one process and
the ranks of a distributed run read, refuse, resume and write exactly the same lines.  Nothing here prints:
what a user should be told goes through the ``report`` callable the caller passes (the CLI echoes it).
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from mlx_intent.context import context_problem
from mlx_intent.errors import InputError, UserError
from mlx_intent.jsonl import JSONLError, parse_line, read_jsonl, repair_tail
from mlx_intent.normalize import MAX_TEXT_CHARS, text_problem
from mlx_intent.results import FeedbackError, check_user
from mlx_intent.schema import KEYS

Report = Callable[[str], None]

ANSWER_KEYS = KEYS  # the answer's keys, from the schema
# latency_ms is the batch call's time (batch_texts queries at once); latency_per_query_ms each query's share.
OUTPUT_KEYS = (
    "id",
    *ANSWER_KEYS,
    "ambiguous",
    "model",
    "tier",
    "latency_ms",
    "latency_per_query_ms",
    "batch_texts",
    "context_used",
)


class Line(NamedTuple):
    """One query of an input file: its line number, id (the line's JSON value), text, user and earlier turns."""

    number: int
    id: object
    text: str
    user: str | None
    context: tuple[str, ...]


def output_row(ident, result: dict) -> dict:
    """One output line: the id, then OUTPUT_KEYS of the chain's result."""
    return {"id": ident, **{k: result[k] for k in OUTPUT_KEYS[1:]}}


def id_key(ident) -> str:
    """How ids compare: as JSON values (``2`` is not ``"2"``, ``null`` is not ``"None"``)."""
    return json.dumps(ident, ensure_ascii=False, sort_keys=True)


def query_text(text: str, where: str = "", report: Report | None = None) -> str:
    """The text the chain is given, by the server's rule: cut to MAX_TEXT_CHARS, with a note to ``report`` (if
    given), before any tier tokenizes it (the server refuses longer texts), and refused when no tier could read
    it (text_problem)."""
    if len(text) > MAX_TEXT_CHARS:
        if report is not None:
            report(f"warning: {where}text of {len(text)} characters cut to its first {MAX_TEXT_CHARS}")
        text = text[:MAX_TEXT_CHARS]
    if (problem := text_problem(text)) is not None:
        raise InputError(f"{where}{problem}")
    return text


def context_turns(turns, where: str = "", report: Report | None = None) -> tuple[str, ...]:
    """Earlier turns (``--context``, a line's ``"context"``) by the rule of a text (each cut and refused as
    ``query_text`` does) and of the server's ``context`` (mlx_intent.context.context_problem: at most 5 texts)."""
    if isinstance(turns, (list, tuple)):
        turns = [
            query_text(t, f"{where}context turn {i}: ", report) if isinstance(t, str) else t
            for i, t in enumerate(turns, 1)
        ]
    if (problem := context_problem(turns)) is not None:
        raise InputError(f"{where}{problem}")
    return tuple(turns)


def read_lines(path: str, done: set[str], user: str | None = None, report: Report | None = None) -> Iterator[Line]:
    """The queries of a JSONL file or '-' (stdin); stop with a clear error naming the line at the first
    malformed one (mlx_intent.jsonl for UTF-8 and JSON), or at an id that an earlier line already has (naming
    both), or that JSON cannot write (1e400 reads as infinity).  The id is the line's JSON value; a line without
    one gets its line number, as a string; a line's ``user`` (else ``user``) names whose thresholds apply, its
    ``context`` its earlier turns.  Lines whose ``id_key`` is in ``done`` are skipped; cut texts are said to
    ``report`` (None: a first pass that only checks)."""
    seen: dict[str, int] = {}
    for n, obj in read_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InputError(f'{path}:{n}: expected an object with a string "text"')
        text = query_text(obj["text"], f"{path}:{n}: ", report)
        context = context_turns(obj["context"], f"{path}:{n}: ", report) if obj.get("context") is not None else ()
        ident = obj["id"] if "id" in obj else str(n)
        try:
            json.dumps(ident, allow_nan=False)
        except ValueError:
            raise InputError(f"{path}:{n}: id {ident!r} is not a finite number (JSON cannot write it)") from None
        key = id_key(ident)
        if key in seen:
            raise InputError(
                f"{path}:{n}: id {key} is also the id of line {seen[key]}"
                + ("" if "id" in obj else " (a line without an id gets its line number)")
                + "; ids must be unique"
            )
        seen[key] = n
        try:
            who = check_user(obj["user"]) if obj.get("user") is not None else user
        except FeedbackError as e:
            raise InputError(f"{path}:{n}: {e}") from None
        if key not in done:
            yield Line(n, ident, text, who, context)


def open_output(output: Path, resume: bool) -> int:
    """A descriptor on ``output``, locked for this run alone (another run writing it is refused in words, not
    left to garble its lines), emptied unless ``resume``, positioned at its end."""
    fd = os.open(output, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"--output {output} is being written by another run; wait for it to end") from None
    if not resume and stat.S_ISREG(os.fstat(fd).st_mode):
        os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def done_ids(output: Path, fd: int | None = None, report: Report | None = None) -> set[str]:
    """The ``id_key`` of the ids already written to ``output`` (through ``fd``, this run's locked descriptor,
    else opened here), which is made to hold each once, whole: its tail is repaired first
    (mlx_intent.jsonl.repair_tail: a fragment is cut off and its query redone, a whole record missing its newline
    is ended and counts), then unreadable lines (two writers' garble) and repeated ids (a batch written twice)
    are dropped, with a note to ``report``.  The lines kept are rewritten in place, in order; a crash during that
    leaves whole lines and fragments, which the next --resume drops again."""
    if fd is None:
        if not output.is_file():
            return set()
        fd = os.open(output, os.O_RDWR)
        try:
            return done_ids(output, fd, report)
        finally:
            os.close(fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return set()
    repair_tail(fd)
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    kept: dict[str, bytes] = {}
    for key, raw in lines_by_id(data, str(output)):
        kept.setdefault(key, raw + b"\n")
    clean = b"".join(kept.values())
    if clean != data:
        dropped = data.count(b"\n") - len(kept)
        write_all(fd, clean, 0)
        os.ftruncate(fd, len(clean))
        os.fsync(fd)
        if report is not None:
            report(f"note: --resume dropped {dropped} unreadable or repeated lines of {output}")
    os.lseek(fd, 0, os.SEEK_END)
    return set(kept)


def write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    """Write all of ``data`` (at ``offset``, else at the descriptor's position), looping over short writes."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        offset = None if offset is None else offset + n


def lines_by_id(data: bytes, where: str) -> Iterator[tuple[str, bytes]]:
    """(``id_key``, line) of each line of JSONL ``data`` that holds an id; torn or foreign lines are skipped."""
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            yield id_key(parse_line(raw, where, n)["id"]), raw
        except (JSONLError, KeyError, TypeError):
            continue


def answer_lines(chain, batch: list[Line], record: bool = False) -> str:
    """The output lines of a batch of ``read_lines`` lines, classified together (with ``record``: the id of
    each result, which feedback refers to)."""
    results = chain.classify_batch(
        [b.text for b in batch], users=[b.user for b in batch], contexts=[b.context for b in batch]
    )
    rows = [
        output_row(line.id, res) | ({"result_id": res["id"]} if record else {}) for line, res in zip(batch, results)
    ]
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
