"""mlx_intent.jsonl: the shared JSONL reader (line numbers, named errors) and the torn-tail repair."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_intent.errors import InputError
from mlx_intent.jsonl import JSONLError, iter_jsonl, read_jsonl, repair_tail

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One file, rewritten by each example (a function-scoped tmp_path would be shared by them anyway)."""
    return tmp_path_factory.mktemp("jsonl") / "in.jsonl"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def repair_file(path: Path) -> bool:
    """``repair_tail`` of the file at ``path``, through a descriptor of its own, as the log's writers hold one."""
    fd = os.open(path, os.O_RDWR)
    try:
        return repair_tail(fd)
    finally:
        os.close(fd)


def test_values_with_the_numbers_of_their_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \r\n[1, 2]\n"text"\r\n7')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, [1, 2]), (5, "text"), (6, 7)]
    assert list(read_jsonl(str(path))) == list(iter_jsonl(path.read_bytes().split(b"\n"), str(path)))


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"{not json", "not valid JSON (Expecting property name enclosed in double quotes)"),
        (b'{"text": "caf\xe9"}', "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON (RecursionError"),
        (b"1" * 5000, "not valid JSON (ValueError"),  # past Python's integer digit limit
    ],
)
def test_a_bad_line_is_named(tmp_path, line, reason):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n' + line + b'\n{"b": 2}\n')
    reader = read_jsonl(path)
    assert next(reader) == (1, {"a": 1})
    with pytest.raises(JSONLError) as e:
        next(reader)
    assert isinstance(e.value, InputError)  # exit code 2 on the command line
    assert (e.value.source, e.value.line) == (str(path), 3) and e.value.reason.startswith(reason)
    assert str(e.value).startswith(f"{path}:3: {reason}")


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"a": 1}\n{"b"\n')))
    reader = read_jsonl("-")
    assert next(reader) == (1, {"a": 1})
    with pytest.raises(JSONLError, match=r"^-:2: not valid JSON"):
        next(reader)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=200)
    | st.lists(
        st.sampled_from(
            [b"{", b"}", b"[", b"]", b'"', b"\n", b"1", b":", b",", b"\xff", b"\xc3", b"\xa9", b" ", b"null"]
        )
    ).map(b"".join)
)
def test_any_bytes_give_values_or_the_named_error(scratch, data):
    """Arbitrary bytes: values of the lines that are JSON, in order, or JSONLError at the first that is not;
    never another exception."""
    lines = data.split(b"\n")
    got = []
    try:
        for number, value in read_jsonl(write(scratch, data)):
            got.append((number, value))
    except JSONLError as e:
        assert 1 <= e.line <= len(lines) and lines[e.line - 1].strip()
        assert [n for n, _ in got] == [n for n in range(1, e.line) if lines[n - 1].strip()]
    else:
        assert [n for n, _ in got] == [n for n in range(1, len(lines) + 1) if lines[n - 1].strip()]
    for number, value in got:
        assert json.dumps(value, sort_keys=True) == json.dumps(
            json.loads(lines[number - 1].decode("utf-8")), sort_keys=True
        )


@settings(max_examples=200, deadline=None)
@given(st.lists(JSON_VALUES, max_size=4), st.binary(max_size=40))
def test_repair_keeps_whole_lines_and_cuts_a_torn_tail(scratch, values, tail):
    """Whole lines stay; a last line that is a JSON object is ended, anything else after the last newline
    is cut off; the file then ends with a newline (or is empty) and every line reads back."""
    body = b"".join(json.dumps(v).encode() + b"\n" for v in values)
    tail = tail.replace(b"\n", b"")
    path = write(scratch, body + tail)
    changed = repair_file(path)
    try:
        whole = isinstance(json.loads(tail.decode("utf-8")), dict)
    except ValueError:
        whole = False
    expected = body + tail + b"\n" if whole else body
    assert path.read_bytes() == expected and changed == bool(tail)
    assert [v for _, v in read_jsonl(path)] == [json.loads(line) for line in expected.split(b"\n") if line.strip()]
    assert repair_file(path) is False  # repaired once, nothing left to do


def test_repair_reads_a_long_last_line_backwards(tmp_path):
    path = tmp_path / "log.jsonl"
    long_record = json.dumps({"text": "x" * 200_000}).encode()
    path.write_bytes(b'{"i": 0}\n' + long_record[:-1])  # torn, beyond several 64 KiB blocks
    assert repair_file(path) and path.read_bytes() == b'{"i": 0}\n'
    path.write_bytes(b'{"i": 0}\n' + long_record)  # whole, only its newline missing
    assert repair_file(path) and path.read_bytes() == b'{"i": 0}\n' + long_record + b"\n"
    path.write_bytes(long_record[:-1])  # a single torn line and nothing before it
    assert repair_file(path) and path.read_bytes() == b""


def test_repair_on_an_append_descriptor(tmp_path):
    """The classification log's descriptor is O_APPEND: the newline still lands at the end."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": 1}')
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        assert repair_tail(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b'{"i": 0}\n{"i": 1}\n'


def test_the_callers_share_the_reader_and_the_repair(tmp_path):
    """classify --input/--resume, read_labelled, read_log and the benchmarks read through it, each keeping
    its own checks; --resume and the log repair a tail the same way."""
    import importlib.util

    from mlx_intent.batch_io import done_ids, read_lines
    from mlx_intent.evaluation.data import read_labelled
    from mlx_intent.metrics import LogError, read_log
    from mlx_intent.schema import INTENTS

    spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).parents[1] / "benchmarks/common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    bench_read = common.read_jsonl

    path = tmp_path / "in.jsonl"
    first = json.dumps({"id": "1", "text": "ferry", "primary_intent": INTENTS[0]}).encode()
    path.write_bytes(first + b'\n\n{"text": "caf\xe9"}\n')
    for read in (lambda p: list(read_lines(str(p), set())), read_labelled, bench_read):
        with pytest.raises(JSONLError, match=r"in\.jsonl:3: not valid UTF-8"):
            read(path)
    with pytest.raises(LogError, match=r"in\.jsonl:1: corrupt record \(not valid JSON"):
        read_log(write(path, b'{"i": 0\n{"i": 1}\n'))
    assert read_log(write(path, b'{"i": 0}\n{"i": 1')).skipped == 1
    path.write_bytes(b'{"id": "1"}\n{"id": "2"}')  # a whole record that only lacks its newline: kept
    assert done_ids(path) == {json.dumps("1"), json.dumps("2")} and path.read_bytes() == b'{"id": "1"}\n{"id": "2"}\n'
