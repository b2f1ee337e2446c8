"""The hostile probe of issue 26 ("nothing lost, nothing hangs"): each finding, injected as a careless or
malicious user would cause it, gives a clear refusal or a whole answer and loses nothing.  Numbers in the
section titles are the issue's findings."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_intent import chain as chain_module
from mlx_intent.cli.main import main
from mlx_intent.errors import EXIT_INPUT
from mlx_intent.metrics import ClassificationLog, LogError

KEYWORD = ["--chain", "keyword"]

pytestmark = pytest.mark.usefixtures("clean_settings")  # conftest: no stray .env or MLX_INTENT_* setting


@pytest.fixture
def no_run(monkeypatch):
    """Any chain being built fails the test: what is checked must be checked before the run."""

    def build(*args, **kwargs):
        raise AssertionError("the chain was built: the run started before the check")

    monkeypatch.setattr(chain_module, "build_chain", build)
    monkeypatch.setattr("mlx_intent.evaluation.run.build_chain", build)


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def assert_clean_error(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def queries(path: Path, n: int = 3) -> Path:
    return write_jsonl(path, [{"id": f"q{i}", "text": f"Where can I eat fish near stop {i}?"} for i in range(n)])


def labelled(path: Path) -> Path:
    return write_jsonl(
        path,
        [
            {"id": "a", "text": "Where can I eat fish?", "lang": "en", "primary_intent": "restaurant"},
            {"id": "b", "text": "Merhaba!", "lang": "tr", "primary_intent": "greeting"},
        ],
    )


def ids_of(path: Path) -> list:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


# ---- 1: --log onto a file that is not a classification log ------------------------------------------------


def _sqlite_store(path: Path) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
    return path


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


NOT_LOGS = {
    "text without a final newline": lambda p: _written(p, b"line one\nline two"),
    "png": lambda p: _written(p, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
    "sqlite store": _sqlite_store,
    "queries": lambda p: queries(p),
}


@pytest.mark.parametrize("case", NOT_LOGS)
def test_log_refuses_a_file_that_is_not_a_log_and_leaves_it_whole(tmp_path, no_run, case):
    path = NOT_LOGS[case](tmp_path / "victim")
    before = path.read_bytes()
    result = invoke("classify", *KEYWORD, "--log", str(path), "hello")
    assert_clean_error(result, EXIT_INPUT, "not a classification log")
    with pytest.raises(LogError, match="not a classification log"):
        ClassificationLog(path)
    assert path.read_bytes() == before


def test_log_refuses_the_feedback_store(tmp_path, no_run):
    home = tmp_path / "h"
    home.mkdir()
    store = home / "feedback.db"
    result = invoke("classify", *KEYWORD, "--home", str(home), "--log", str(store), "hello")
    assert_clean_error(result, EXIT_INPUT, "is the feedback store")
    assert not store.exists()


def test_a_log_with_a_torn_tail_is_still_repaired(tmp_path):
    log = tmp_path / "c.log"
    log.write_bytes(b'{"ts":"2026-01-01T00:00:00.000+00:00","primary_intent":"general"}\n{"ts":"2026-01-')
    with ClassificationLog(log) as opened:
        opened.write({"ts": "2026-01-02T00:00:00.000+00:00", "primary_intent": "greeting"})
    assert [json.loads(line)["primary_intent"] for line in log.read_text().splitlines()] == ["general", "greeting"]


# ---- 7: eval / compare outputs onto each other or onto the data --------------------------------------------


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_eval_refuses_report_equal_to_predictions(tmp_path, no_run, force):
    data = labelled(tmp_path / "tiny.jsonl")
    report = tmp_path / "r.md"
    result = invoke("eval", str(data), *KEYWORD, "--report", str(report), "--predictions", str(report), *force)
    assert_clean_error(result, EXIT_INPUT, "--report and --predictions are one file")
    assert not report.exists()


@pytest.mark.parametrize("command", ["eval", "compare"])
@pytest.mark.parametrize("what", ["--report", "--predictions"])
def test_eval_and_compare_never_overwrite_the_data(tmp_path, no_run, command, what):
    data = labelled(tmp_path / "tiny.jsonl")
    before = data.read_bytes()
    if command == "compare" and what == "--predictions":
        pytest.skip("compare writes no predictions")
    args = ["eval", str(data), *KEYWORD] if command == "eval" else ["compare", "keyword", "general", str(data)]
    outputs = ["--report", str(data)] if what == "--report" else ["--report", str(tmp_path / "r.md"), what, str(data)]
    result = invoke(*args, *outputs, "--force")
    assert_clean_error(result, EXIT_INPUT, f"{what} {data} is the data")
    assert data.read_bytes() == before
