"""JSON lines: the one reader every JSONL input goes through, and the one repair of a torn last line.

``read_jsonl`` yields ``(line number, value)`` for every line that is not blank and stops at the first
line that is not UTF-8 JSON with a ``JSONLError`` naming the file and the line.  What a value must be
(an object, with a "text"...) is the caller's to check, with its own words: ``classify --input``,
``read_labelled``, ``read_log`` and the benchmarks each keep theirs.

``repair_tail`` readies a JSONL file that was being appended to when a process died, so the next
record does not glue onto a fragment: a torn last line is cut off; a whole last record that only
lacks its newline is ended.  The classification log and ``classify --resume`` use it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from mlx_intent.errors import InputError

_BLOCK = 1 << 16


class JSONLError(InputError):
    """A line that is not UTF-8 JSON: ``source`` (a path, or ``-``), ``line`` (1-based) and ``reason``."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        super().__init__(f"{source}:{line}: {reason}")
        self.source, self.line, self.reason = source, line, reason


def parse_line(raw: bytes, source: str, line: int) -> object:
    """The JSON value of one line (bytes, newline or not); JSONLError names the line otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONLError(source, line, "not valid UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONLError(source, line, f"not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # an integer past Python's digit limit, nesting too deep
        raise JSONLError(source, line, f"not valid JSON ({type(e).__name__}: {e})") from None


def iter_jsonl(lines: Iterable[bytes], source: str) -> Iterator[tuple[int, object]]:
    """(line number, value) for each line of ``lines`` that is not blank; line numbers count every line."""
    for number, raw in enumerate(lines, 1):
        if raw.strip():
            yield number, parse_line(raw, source, number)


def read_jsonl(path: Path | str) -> Iterator[tuple[int, object]]:
    """``iter_jsonl`` over a file, or stdin for ``-``; the file is read lazily and closed at the end.
    A file that cannot be opened raises OSError (callers word it)."""
    source = str(path)
    stream = sys.stdin.buffer if source == "-" else open(path, "rb")  # noqa: SIM115
    with stream:
        yield from iter_jsonl(stream, source)


def repair_tail(fd: int) -> bool:
    """Make the file open (read-write) on ``fd`` end with a whole line; True if it changed it.

    The last line's bytes are read backwards in blocks (a log may be large).  A last line that parses as
    a JSON object is a whole record missing its newline: the newline is added.  Anything else is a
    fragment of a record cut by a crash: it is truncated away.  The change is fsynced."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return False
    start = size
    while start > 0:
        block = max(0, start - _BLOCK)
        newline = os.pread(fd, start - block, block).rfind(b"\n")
        if newline >= 0:
            start = block + newline + 1
            break
        start = block
    try:
        whole = isinstance(parse_line(os.pread(fd, size - start, start), "", 0), dict)
    except JSONLError:
        whole = False
    if whole:
        os.pwrite(fd, b"\n", size)  # at the end, with or without O_APPEND
    else:
        os.ftruncate(fd, start)
    os.fsync(fd)
    return True
