"""mlx_intent.batch_io on its own: what --resume keeps of any output file, how ids compare, and the notes a
caller is given (the library prints nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_intent.batch_io import done_ids, id_key, query_text, read_lines
from mlx_intent.errors import InputError
from mlx_intent.normalize import MAX_TEXT_CHARS

IDS = st.sampled_from(["a", "b", 1, 2, "2", None, 1.5])
WHOLE = st.builds(lambda i: json.dumps({"id": i, "primary_intent": "greeting"}), IDS)
GARBLE = st.text(alphabet='x{}":, 1', max_size=14)  # two writers' interleaved bytes, a foreign line


def ident(line: str) -> str | None:
    """The oracle: the id_key of a line that is a JSON object with an id, else None."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return id_key(value["id"]) if isinstance(value, dict) and "id" in value else None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("batch_io") / "out.jsonl"


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(WHOLE | GARBLE, max_size=8), tail=WHOLE | WHOLE.map(lambda s: s[: len(s) // 2]) | GARBLE)
def test_resume_keeps_each_id_once_whole_and_a_second_pass_changes_nothing(scratch, lines, tail):
    data = "".join(line + "\n" for line in lines) + tail
    scratch.write_text(data, encoding="utf-8")
    notes: list[str] = []
    ids = done_ids(scratch, report=notes.append)
    expected = [k for k in map(ident, [*lines, tail]) if k is not None]
    assert ids == set(expected)
    kept = scratch.read_text(encoding="utf-8").splitlines()
    assert [ident(line) for line in kept] == list(dict.fromkeys(expected))  # whole lines, each id once, in order
    assert all(note.startswith("note: --resume dropped ") for note in notes) and len(notes) <= 1
    before = scratch.read_bytes()
    assert done_ids(scratch, report=notes.append) == ids and scratch.read_bytes() == before and len(notes) <= 1


def test_ids_compare_as_json_values(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = [{"id": 2, "text": "ferry"}, {"id": "2", "text": "taxi"}, {"text": "tram"}, {"id": None, "text": "bus"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert [line.id for line in read_lines(str(path), set())] == [2, "2", "3", None]  # no id: the line number
    assert [line.id for line in read_lines(str(path), {id_key(2), id_key(None)})] == ["2", "3"]
    path.write_text(json.dumps({"id": "2", "text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r':2: id "2" is also the id of line 1 \(a line without an id gets'):
        list(read_lines(str(path), set()))


def test_a_cut_text_is_reported_to_the_caller_not_printed(capsys):
    notes: list[str] = []
    long = "ferry " * MAX_TEXT_CHARS
    assert query_text(long, "in.jsonl:3: ", notes.append) == long[:MAX_TEXT_CHARS]
    assert notes == [f"warning: in.jsonl:3: text of {len(long)} characters cut to its first {MAX_TEXT_CHARS}"]
    assert query_text(long) == long[:MAX_TEXT_CHARS]  # no report: said to no one
    assert capsys.readouterr() == ("", "")
