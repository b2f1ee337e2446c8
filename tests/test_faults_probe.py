"""The hostile probe of issue 26 ("nothing lost, nothing hangs"): each finding, injected as a careless or
malicious user would cause it, gives a clear refusal or a whole answer and loses nothing.  Numbers in the
section titles are the issue's findings."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_faults_cli import assert_clean_error, invoke, write_jsonl

from mlx_intent import batch_io
from mlx_intent.errors import EXIT_ERROR, EXIT_INPUT
from mlx_intent.metrics import ClassificationLog, LogError
from mlx_intent.settings import settings_home

WAIT_S = 180  # a cap on waiting for a state, never an assertion about speed

KEYWORD = ["--chain", "keyword"]

pytestmark = pytest.mark.usefixtures("clean_settings")  # conftest: no stray .env or MLX_INTENT_* setting


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


# ---- 2: --log equal to --input or --output ---------------------------------------------------------------


@pytest.mark.parametrize("link", ["same path", "symlink", "hard link"])
@pytest.mark.parametrize("other", ["--input", "--output"])
def test_log_equal_to_input_or_output_is_refused(tmp_path, no_run, link, other):
    source = queries(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    target = source if other == "--input" else out
    if other == "--output" and link != "same path":
        out.write_text("")  # a link needs a file to point at
    log = {"same path": target, "symlink": tmp_path / "log-link", "hard link": tmp_path / "log-hard"}[link]
    if link == "symlink":
        log.symlink_to(target)
    elif link == "hard link":
        os.link(target, log)
    before = source.read_bytes()
    result = invoke("classify", *KEYWORD, "--input", str(source), "--output", str(out), "--log", str(log))
    assert_clean_error(result, EXIT_INPUT, "--log", "is the " + other[2:])
    assert source.read_bytes() == before
    assert not out.exists() or out.read_bytes() == b""


# ---- 3: two runs writing one --output; --resume drops garbled lines --------------------------------------


def test_a_second_run_on_a_locked_output_is_refused_in_one_line(tmp_path):
    source = queries(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "q0", "primary_intent": "restaurant"}\n')
    with open(out, "a") as held:  # another run, writing it now
        fcntl.flock(held, fcntl.LOCK_EX)
        for resume in ([], ["--resume"]):
            result = invoke("classify", *KEYWORD, "--input", str(source), "--output", str(out), *resume)
            assert_clean_error(result, EXIT_ERROR, "is being written by another run")
            assert len(result.output.strip().splitlines()) == 1
    assert out.read_text() == '{"id": "q0", "primary_intent": "restaurant"}\n'
    result = invoke("classify", *KEYWORD, "--input", str(source), "--output", str(out), "--resume")
    assert result.exit_code == 0, result.output
    assert sorted(ids_of(out)) == ["q0", "q1", "q2"]


def test_resume_drops_garbled_and_repeated_lines(tmp_path):
    source = queries(tmp_path / "in.jsonl", 4)
    out = tmp_path / "out.jsonl"
    out.write_text(
        '{"id": "q0", "primary_intent": "restaurant"}\n'
        '{"id": "q1", "prim{"id": "q2", "primary_intent": "restaurant"}\n'  # two writers' lines, interleaved
        '{"id": "q0", "primary_intent": "restaurant"}\n'  # a batch written twice
        "not json at all\n"
    )
    result = invoke("classify", *KEYWORD, "--input", str(source), "--output", str(out), "--resume")
    assert result.exit_code == 0, result.output
    assert "dropped 3 unreadable or repeated lines" in result.output
    lines = out.read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert sorted(ids_of(out)) == ["q0", "q1", "q2", "q3"]


# ---- 4: Ctrl-C while a batch is being written -------------------------------------------------------------


def test_ctrl_c_during_a_write_writes_the_batch_once_and_resume_finishes(tmp_path, monkeypatch):
    source = queries(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out.jsonl"
    write_all, calls = batch_io.write_all, []

    def interrupted(fd, data, offset=None):
        calls.append(len(data))
        if len(calls) == 2:  # the second batch: half of it reaches the file, then Ctrl-C
            write_all(fd, data[: len(data) // 2])
            raise KeyboardInterrupt
        write_all(fd, data, offset)

    monkeypatch.setattr(batch_io, "write_all", interrupted)
    args = ["classify", *KEYWORD, "--batch-size", "4", "--input", str(source), "--output", str(out)]
    result = invoke(*args)
    assert result.exit_code == 1, result.output  # click's Abort
    assert len(calls) == 2
    monkeypatch.undo()
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    ids = ids_of(out)
    assert sorted(ids) == sorted(f"q{i}" for i in range(20)) and len(ids) == len(set(ids))


# ---- 7: eval / compare outputs onto each other or onto the data --------------------------------------------


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_eval_refuses_report_equal_to_predictions(tmp_path, no_run, force):
    data = labelled(tmp_path / "tiny.jsonl")
    report = tmp_path / "r.md"
    result = invoke("eval", str(data), *KEYWORD, "--report", str(report), "--predictions", str(report), *force)
    assert_clean_error(result, EXIT_INPUT, "--report and --predictions are one file")
    assert not report.exists()


@pytest.mark.parametrize(
    ("command", "what"), [("eval", "--report"), ("eval", "--predictions"), ("compare", "--report")]
)  # compare writes no predictions
def test_eval_and_compare_never_overwrite_the_data(tmp_path, no_run, command, what):
    data = labelled(tmp_path / "tiny.jsonl")
    before = data.read_bytes()
    args = ["eval", str(data), *KEYWORD] if command == "eval" else ["compare", "keyword", "general", str(data)]
    outputs = ["--report", str(data)] if what == "--report" else ["--report", str(tmp_path / "r.md"), what, str(data)]
    result = invoke(*args, *outputs, "--force")
    assert_clean_error(result, EXIT_INPUT, f"{what} {data} is the data")
    assert data.read_bytes() == before


# ---- 17: non-finite ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ident", ["1e400", "-1e400", "NaN", "Infinity", "[1, 2e400]"])
def test_a_non_finite_id_is_refused_naming_the_line(tmp_path, ident):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "hello"}\n{"id": ' + ident + ', "text": "hello again"}\n')
    out = tmp_path / "out.jsonl"
    result = invoke("classify", *KEYWORD, "--input", str(source), "--output", str(out))
    assert_clean_error(result, EXIT_INPUT, "in.jsonl:2: id", "not a finite number")
    assert not out.exists() or "Infinity" not in out.read_text()


# ---- 18: bad input is refused before any work ----------------------------------------------------------------


def test_a_duplicate_id_late_in_a_file_is_refused_before_any_line_is_classified(tmp_path):
    rows = [{"id": i, "text": f"hello {i}"} for i in (1, 2, 3, 1)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    result = invoke("classify", *KEYWORD, "--batch-size", "1", "--input", str(source), "--output", str(out))
    assert_clean_error(result, EXIT_INPUT, "in.jsonl:4: id 1 is also the id of line 1")
    assert not out.exists() or out.read_text() == ""


# ---- 19: a lone surrogate alone; a dangling symlink as --output ------------------------------------------------


def test_a_lone_surrogate_alone_is_named_as_one(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "\\ud800"}\n')
    result = invoke("classify", *KEYWORD, "--input", str(source), "--output", str(tmp_path / "out.jsonl"))
    assert_clean_error(result, EXIT_INPUT, "in.jsonl:1: text holds a lone surrogate")


def test_a_dangling_symlink_output_is_refused_before_any_work(tmp_path, no_run):
    source = queries(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    out.symlink_to(tmp_path / "no" / "such" / "file.jsonl")
    result = invoke("classify", *KEYWORD, "--input", str(source), "--output", str(out))
    assert_clean_error(result, EXIT_INPUT, "--output", "does not exist")
    assert "lines written before" not in result.output


# ---- 20: exit codes as the README's table says --------------------------------------------------------------


@pytest.mark.parametrize(
    "args, env",
    [
        (["--margin", "2"], {}),
        (["--batch-size", "0"], {}),
        ([], {"MLX_INTENT_MIN_CONFIDENCE": "abc"}),
    ],
)
def test_an_invalid_setting_is_bad_usage(no_run, monkeypatch, args, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert_clean_error(invoke("classify", *KEYWORD, *args, "hello"), EXIT_INPUT)


def test_serve_with_a_bad_host_is_bad_usage_not_an_unknown_model(no_run, monkeypatch):
    import socket

    resolve = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "no-such-host.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)  # no resolver is asked: loopback only
    result = invoke("serve", *KEYWORD, "--host", "no-such-host.invalid", "--port", "0")
    assert_clean_error(result, EXIT_INPUT, "--host 'no-such-host.invalid' is not an address")


def test_serve_on_a_port_in_use_is_an_error_in_words(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke("serve", *KEYWORD, "--no-record", "--port", str(port))
    assert_clean_error(result, EXIT_ERROR, f"cannot listen on 127.0.0.1:{port}")


# ---- 21: strict booleans in /v1/feedback ------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    field=st.sampled_from(["correct", "replace"]),
    value=st.one_of(
        st.sampled_from(["yes", "on", "true", "1", "y", "t", 1, 0, 1.0, "no", "off", "false"]),
        st.integers(),
        st.text(max_size=5),
    ),
)
def test_feedback_takes_only_json_booleans(field, value):
    from pydantic import ValidationError

    from mlx_intent.serve.schemas import FeedbackRequest

    with pytest.raises(ValidationError):
        FeedbackRequest.model_validate({"id": "x", "primary_intent": "restaurant", field: value})
    assert getattr(FeedbackRequest.model_validate({"id": "x", field: True}), field) is True


# ---- 6: models convert --name of a name the home uses for itself ------------------------------------------------


@pytest.mark.parametrize(
    "name", ["feedback.db", "feedback.db-wal", "Feedback.DB-shm", "calibration", "Calibration", "adapters", "x.source"]
)
def test_convert_refuses_every_name_the_home_uses_for_itself(tmp_path, name):
    home = tmp_path / "h"
    (home / "calibration").mkdir(parents=True)
    (home / "calibration" / "keyword.json").write_text("{}")
    result = invoke(
        "models", "convert", "--gguf", str(tmp_path / "none.gguf"), "--name", name, "--force", "--home", str(home)
    )
    assert_clean_error(result, EXIT_INPUT, "not one the models folder uses for itself")
    assert (home / "calibration" / "keyword.json").read_text() == "{}"
    assert sorted(p.name for p in home.iterdir()) == ["calibration"]


# ---- 12: operating-system errors are sentences, not tracebacks ---------------------------------------------------


@pytest.fixture
def store_home(tmp_path) -> Path:
    from mlx_intent.feedback.store import open_store

    home = tmp_path / "h"
    open_store(home).close()
    shown = invoke("classify", *KEYWORD, "--record", "--home", str(home), "Where can I eat fish?")
    added = invoke("feedback", "add", json.loads(shown.stdout)["id"], "--correct", "--home", str(home))
    assert added.exit_code == 0, added.output
    return home


def test_feedback_export_into_a_missing_folder_is_refused(tmp_path, store_home):
    result = invoke("feedback", "export", "-o", str(tmp_path / "no" / "x.jsonl"), "--home", str(store_home))
    assert_clean_error(result, EXIT_INPUT, "--output", "does not exist")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full is Linux's always-full device")
def test_feedback_export_onto_a_full_disk_is_a_sentence(store_home):
    result = invoke("feedback", "export", "-o", "/dev/full", "--home", str(store_home))
    assert_clean_error(result, EXIT_ERROR, "cannot write /dev/full", "No space left on device")


def test_feedback_export_that_fails_leaves_the_old_file_and_is_owner_only(tmp_path, store_home, monkeypatch):
    out = tmp_path / "export.jsonl"
    out.write_text("an earlier export\n")
    out.chmod(0o664)

    def full(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        result = invoke("feedback", "export", "-o", str(out), "--home", str(store_home))
    assert_clean_error(result, EXIT_ERROR, f"cannot write {out}", "No space left on device")
    assert out.read_text() == "an earlier export\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    result = invoke("feedback", "export", "-o", str(out), "--home", str(store_home))
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o600  # 16: owner-only, as the help says, whatever mode it had


def test_a_read_only_models_folder_is_a_sentence(tmp_path, monkeypatch):
    """Tests run as root here, where chmod cannot make a folder read-only: the write fails as EROFS would."""
    from mlx_intent import calibration

    def read_only(path, record):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(calibration, "write", read_only)
    data = labelled(tmp_path / "tiny.jsonl")
    result = invoke("calibrate", "keyword", "--data", str(data), "--force", "--home", str(tmp_path / "h"))
    assert_clean_error(result, EXIT_ERROR, "cannot write", "Read-only file system")


def test_a_conversion_into_a_read_only_models_folder_is_a_sentence(tmp_path, monkeypatch):
    from mlx_intent.models import gguf

    def read_only(path, out, progress=None):
        raise OSError(30, "Read-only file system", str(out.parent))

    monkeypatch.setattr(gguf, "convert_gguf", read_only)
    result = invoke("models", "convert", "--gguf", str(tmp_path / "x.gguf"), "--name", "x", "--home", str(tmp_path))
    assert_clean_error(result, EXIT_ERROR, f"cannot write {tmp_path}", "Read-only file system")


def test_convert_name_of_300_characters_is_refused(tmp_path):
    result = invoke(
        "models", "convert", "--gguf", str(tmp_path / "x.gguf"), "--name", "m" * 300, "--home", str(tmp_path)
    )
    assert_clean_error(result, EXIT_INPUT, "at most 100")


# ---- 5: a diverged or useless training run never replaces the model in use -------------------------------------


def _rows(n_per_intent: int) -> list[dict]:
    from mlx_intent.evaluation.data import DATA_DIR, read_labelled

    rows, counts = [], {}
    for row in read_labelled(DATA_DIR / "train.jsonl"):
        if counts.get(row["primary_intent"], 0) < n_per_intent:
            counts[row["primary_intent"]] = counts.get(row["primary_intent"], 0) + 1
            rows.append(row)
    return rows


def test_a_diverged_encoder_head_is_not_installed(tmp_path):
    from mlx_intent.tuner import TrainingError
    from mlx_intent.tuner.encoder import train_encoder

    head = tmp_path / "e5-small"
    head.mkdir()
    (head / "head.json").write_text('{"the": "good head"}')
    with pytest.raises(TrainingError, match="NaN or infinity"):
        train_encoder(
            _rows(1), [], tuned_layers=0, epochs=1, batch_size=1, learning_rate=1e30, out_dir=head, report=print
        , home=settings_home())
    assert (head / "head.json").read_text() == '{"the": "good head"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e5-small"]  # no staging folder, no .previous


def test_a_diverged_adapter_is_not_installed(bundled, tmp_path, monkeypatch):
    import mlx.core as mx
    import mlx_lm.tuner.trainer as trainer

    from mlx_intent.tuner import TrainingError
    from mlx_intent.tuner.train import train_adapter

    def diverged(*args, **kwargs):  # what --learning-rate 1e30 leaves: loss nan, weights nan
        mx.save_safetensors(kwargs["args"].adapter_file, {"lora_a": mx.full((4, 4), float("nan"))})

    monkeypatch.setattr(trainer, "train", diverged)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapters.safetensors").write_text("the good adapter")
    data = write_jsonl(tmp_path / "rows.jsonl", _rows(1))
    with pytest.raises(TrainingError, match="NaN or infinity"):
        train_adapter("smollm2-135m", data, iters=1, batch_size=2, out_dir=out, report=print, home=settings_home())
    assert (out / "adapters.safetensors").read_text() == "the good adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "rows.jsonl"]


def test_a_head_no_better_than_chance_is_refused():
    from mlx_intent.tuner import TrainingError, check_better_than_chance

    with pytest.raises(TrainingError, match="no better than chance"):
        check_better_than_chance(0.05)
    check_better_than_chance(0.9)


def test_encoder_training_needs_rows_of_every_intent(tmp_path, monkeypatch):
    import mlx_intent.encoder as encoder
    import mlx_intent.tuner.encoder as tuner_encoder

    def trained(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(tuner_encoder, "train_encoder", trained)
    monkeypatch.setattr(encoder, "HEAD_DIR", tmp_path / "no-head")
    data = write_jsonl(tmp_path / "three.jsonl", _rows(1)[:3])
    result = invoke("train", "e5-small", "--data", str(data), "--home", str(tmp_path / "h"))
    assert_clean_error(result, EXIT_INPUT, "needs at least 5 training rows of every intent")


def test_a_second_force_keeps_the_first_model_replaced(tmp_path):
    from mlx_intent.tuner import install, original_dir, previous_dir

    out = tmp_path / "e5-small"
    for text in ("shipped", "second", "third", "fourth"):
        new = tmp_path / f".{text}.partial"
        new.mkdir()
        (new / "head.json").write_text(text)
        install(new, out)
    assert (out / "head.json").read_text() == "fourth"
    assert (previous_dir(out) / "head.json").read_text() == "third"
    assert (original_dir(out) / "head.json").read_text() == "shipped"


# ---- 8: a crafted GGUF whose numbers do not fit its tensors; bounded reasons ----------------------------------


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("llama.embedding_length", 7, "has shape (3, 32), the metadata says (3, 7)"),
        ("llama.block_count", 1000, "the metadata says 1000 layers"),
        ("llama.block_count", 2, "needs 9 tensors the file does not hold"),
        ("llama.feed_forward_length", 48, "the metadata says (48, 32)"),
    ],
)
def test_a_gguf_whose_numbers_do_not_fit_its_tensors_is_a_gguf_error(tmp_path, key, value, words):
    from test_faults_cli import llama_gguf, patched

    from mlx_intent.models import gguf

    path = patched(llama_gguf(tmp_path / "crafted.gguf"), key, "<I", value)
    with pytest.raises(gguf.GGUFError, match=words.replace("(", r"\(").replace(")", r"\)")):
        gguf.convert_gguf(path, tmp_path / "out")
    result = invoke("models", "convert", "--gguf", str(path), "--name", "crafted", "--home", str(tmp_path / "h"))
    assert_clean_error(result, EXIT_ERROR, words)
    assert not (tmp_path / "h" / "crafted").exists()


def test_a_converted_folder_whose_config_does_not_fit_is_refused_at_load(tmp_path):
    from test_faults_cli import llama_gguf

    from mlx_intent.models import gguf, loading

    home = tmp_path / "h"
    out = gguf.convert_gguf(llama_gguf(tmp_path / "ok.gguf"), home / "smollm2-135m")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "hidden_size": 7}))
    with pytest.raises(gguf.GGUFError, match=r"model.embed_tokens.weight has shape \(3, 32\)"):
        loading.load("smollm2-135m", home=home)


def test_a_huge_load_failure_reason_is_bounded_in_the_answer():
    from mlx_intent.chain import Chain, Kind, Tier, keyword_tier
    from mlx_intent.results import MAX_REASON_CHARS, PassOver, Reason

    def load():
        raise PassOver(Reason.LOAD_FAILED, "load failed: ValueError: Missing 8730 parameters: " + "x." * 190_000)

    crafted = Tier("crafted", lambda texts: [], load, model="crafted", kind=Kind.LLM)
    chain = Chain([crafted, keyword_tier(home=settings_home())])
    result = chain.classify("Where can I eat fish?")
    [entry] = result["fallbacks"]
    assert entry["kind"] == "load_failed" and len(entry["reason"]) <= MAX_REASON_CHARS
    assert len(json.dumps(result)) < 4 * MAX_REASON_CHARS


# ---- the server: 14, 15, 22 (and 10's 503 for feedback) ----------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A keyword-tier app that records, through starlette's test client (no socket), and its chain."""
    from fastapi.testclient import TestClient

    from mlx_intent.chain import build_chain
    from mlx_intent.feedback.store import open_store
    from mlx_intent.serve.app import create_app
    from mlx_intent.settings import Settings

    settings = Settings(chain=("keyword",))
    chain = build_chain(settings, store=open_store(tmp_path_factory.mktemp("served")))
    app = create_app(settings, chain)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client, chain


def test_a_request_head_over_the_bound_is_refused_whole(served):
    client, _ = served
    for size in (20_000, 30_000, 70_000):
        r = client.post("/v1/classify", json={"text": "hello"}, headers={"X-Padding": "a" * size})
        assert r.status_code == 431, (size, r.status_code)
        assert r.json()["error"].startswith("request head over")
    assert client.post("/v1/classify", json={"text": "hello"}, headers={"X-Padding": "a" * 1000}).status_code == 200


def test_error_bodies_name_no_path_no_exception_and_no_allowed_host(served, monkeypatch):
    from mlx_intent.feedback import store as feedback_store

    client, chain = served
    refused = client.get("/healthz", headers={"Host": "rebound.example"})
    assert refused.status_code == 400 and refused.json()["detail"] is None
    assert "127.0.0.1" not in refused.text and "localhost" not in refused.text
    unknown = client.post("/v1/feedback", json={"id": "nope", "correct": True})
    assert unknown.status_code == 404 and str(chain.store.path) not in unknown.text
    assert "feedback.db" not in unknown.text

    def broken(*args, **kwargs):
        raise RuntimeError(f"secret detail at {chain.store.path}")

    monkeypatch.setattr(feedback_store, "add_feedback", broken)
    crashed = client.post("/v1/feedback", json={"id": "x", "correct": True})
    assert crashed.status_code == 500
    assert "RuntimeError" not in crashed.text and "secret" not in crashed.text and "feedback.db" not in crashed.text


def test_feedback_to_a_locked_store_is_a_503_with_retry_after(served, monkeypatch):
    from mlx_intent.feedback import store as feedback_store

    client, chain = served

    def locked(*args, **kwargs):
        raise feedback_store.StoreError(f"{chain.store.path}: database is locked")

    monkeypatch.setattr(feedback_store, "add_feedback", locked)
    r = client.post("/v1/feedback", json={"id": "x", "correct": True})
    assert r.status_code == 503 and r.headers["Retry-After"] and "feedback.db" not in r.text


@pytest.mark.parametrize("field", [{"user": "alice"}, {"session": "trip-42"}, {"context": ["Where can I eat?"]}])
def test_the_stream_refuses_what_it_does_not_honour(served, field):
    client, _ = served
    r = client.post("/v1/classify/stream", json={"text": "what about Balat?", **field})
    assert r.status_code == 422, r.text


# ---- 16: an optional bearer token for the feedback and the read-outs ------------------------------------------------


def test_a_token_guards_feedback_metrics_and_models_but_not_classify(tmp_path):
    from fastapi.testclient import TestClient

    from mlx_intent.chain import build_chain
    from mlx_intent.feedback.store import open_store
    from mlx_intent.serve.app import create_app
    from mlx_intent.settings import Settings

    settings = Settings(chain=("keyword",))
    chain = build_chain(settings, store=open_store(tmp_path))
    app = create_app(settings, chain, token="s3cret")
    with TestClient(app, base_url="http://127.0.0.1") as client:
        answer = client.post("/v1/classify", json={"text": "Where can I eat fish?"})
        assert answer.status_code == 200 and client.get("/healthz").status_code == 200
        body = {"id": answer.json()["id"], "primary_intent": "shopping"}
        for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = client.post("/v1/feedback", json=body, headers=auth)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", auth
            assert client.get("/metrics", headers=auth).status_code == 401
            assert client.get("/v1/models", headers=auth).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/feedback", json=body, headers=good).status_code == 201
        assert client.get("/metrics", headers=good).status_code == 200
        assert client.get("/v1/models", headers=good).status_code == 200


# ---- 9, 23: abandoned requests (a real loopback server) ------------------------------------------------------------

MAX_TOKENS = 2000  # a stream the stand-in writes to its end only if nobody stops it


class Model:
    """A model tier stand-in: answers `weather` once ``gate`` is open; streams a token every 10 ms, at most
    MAX_TOKENS, counting them."""

    def __init__(self) -> None:
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.tokens = 0

    def classify_batch(self, texts, mode=None, contexts=None):
        self.entered.set()
        self.gate.wait(WAIT_S)
        return [{"primary_intent": "weather", "confidence": 0.9, "all_intents": ["weather"]} for _ in texts]

    def stream(self, text):
        for _ in range(MAX_TOKENS):
            self.tokens += 1
            yield "x"
            time.sleep(0.01)
        yield {"primary_intent": "weather", "confidence": 0.9, "all_intents": ["weather"]}


def model_app(model: Model, log: Path | None = None):
    from mlx_intent.chain import Chain, Kind, Tier, keyword_tier
    from mlx_intent.serve.app import create_app
    from mlx_intent.settings import Settings

    tier = Tier("llm", lambda texts: model.classify_batch(texts), lambda: model, model="llm", kind=Kind.LLM)
    chain = Chain([tier, keyword_tier(home=settings_home())], log=ClassificationLog(log) if log else None)
    return create_app(Settings(chain=("keyword",)), chain, request_timeout_ms=600_000)


def send(port: int, path: str, body: dict) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    data = json.dumps(body).encode()
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return s


def test_an_abandoned_stream_frees_the_worker_at_once():
    from test_server import metric_samples, running, until, wait_ready

    model = Model()
    with running(model_app(model)) as (base, _):
        wait_ready(base)
        port = int(base.rsplit(":", 1)[1])
        streams = [send(port, "/v1/classify/stream", {"text": "Is it raining in Kadıköy?"}) for _ in range(3)]
        got = b""
        while b"event: token" not in got:  # the first stream is being written
            got += streams[0].recv(4096)
        for s in streams:  # three clients leave: one mid-stream, two queued behind it
            s.close()
        r = httpx.post(f"{base}/v1/classify", json={"text": "Will it rain tomorrow?"}, timeout=WAIT_S)
        assert r.status_code == 200 and r.json()["tier"] == "llm"  # the worker answered it, not the timeout
        assert model.tokens < MAX_TOKENS  # the abandoned stream was stopped, not written to its end
        abandoned = lambda: metric_samples(httpx.get(f"{base}/metrics").text)["mlx_intent_abandoned_requests_total"]  # noqa: E731
        until(lambda: abandoned() == 3, "the three streams counted as abandoned")


def test_an_abandoned_request_is_counted_apart_and_neither_logged_nor_kept(tmp_path):
    from test_server import metric_samples, running, until, wait_ready

    from mlx_intent.metrics import read_log

    model, log = Model(), tmp_path / "c.log"
    app = model_app(model, log)
    with running(app) as (base, _):
        wait_ready(base)
        port = int(base.rsplit(":", 1)[1])
        model.gate.clear()  # the worker holds the next request
        model.entered.clear()
        s = send(port, "/v1/classify", {"text": "Will it rain tomorrow?"})
        until(model.entered.is_set, "the request taken by the worker")
        s.close()  # the client leaves before its answer
        model.gate.set()
        samples = lambda: metric_samples(httpx.get(f"{base}/metrics").text)  # noqa: E731
        until(lambda: samples().get("mlx_intent_abandoned_requests_total", 0) == 1, "the abandoned request counted")
        counted = samples()
        assert counted.get('mlx_intent_http_requests_total{endpoint="/v1/classify",status="200"}', 0) == 0
        assert counted.get('mlx_intent_http_requests_total{endpoint="/v1/classify",status="499"}') == 1
        assert counted.get('mlx_intent_tiers_total{tier="llm"}', 0) == 0
    assert read_log(log) == []


# ---- 10: a feedback store locked by another process costs records, never answers ----------------------------------


def test_a_store_locked_by_another_process_costs_records_not_answers(tmp_path):
    from fastapi.testclient import TestClient
    from test_server import metric_samples

    from mlx_intent.chain import build_chain
    from mlx_intent.feedback.store import SERVE_BUSY_TIMEOUT_MS, open_store
    from mlx_intent.serve.app import create_app
    from mlx_intent.settings import Settings

    settings = Settings(chain=("keyword",))
    chain = build_chain(settings, store=open_store(tmp_path, busy_timeout_ms=SERVE_BUSY_TIMEOUT_MS))  # as serve does
    other = sqlite3.connect(chain.store.path, isolation_level=None)  # another process's connection
    other.execute("BEGIN EXCLUSIVE")
    try:
        with TestClient(create_app(settings, chain), base_url="http://127.0.0.1") as client:
            for text in ("Where can I eat fish?", "Is it raining?", "Merhaba!"):
                assert client.post("/v1/classify", json={"text": text}).status_code == 200
            r = client.post("/v1/feedback", json={"id": "x", "correct": True})
            assert r.status_code == 503 and r.headers["Retry-After"]
            metrics = client.get("/metrics")
            assert metrics.status_code == 200
            assert metric_samples(metrics.text)["mlx_intent_feedback_results_lost"] == 3
    finally:
        other.execute("ROLLBACK")
        other.close()


# ---- 13: idle connections deny no service -----------------------------------------------------------------------


def test_idle_connections_do_not_deny_a_client_that_sends_a_request():
    from test_server import running, wait_ready

    with running(model_app(Model()), limit_concurrency=4) as (base, _):
        wait_ready(base)
        port = int(base.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) for _ in range(8)]
        try:
            r = httpx.post(f"{base}/v1/classify", json={"text": "Will it rain tomorrow?"}, timeout=WAIT_S)
            assert r.status_code == 200 and r.json()["primary_intent"] == "weather"
            assert idle[0].recv(1) == b""  # the longest idle were closed to make room
        finally:
            for s in idle:
                s.close()


def test_a_connection_that_sends_nothing_is_closed_before_the_header_timeout():
    from test_server import running

    with running(model_app(Model()), header_timeout_s=100_000, first_byte_timeout_s=0.2) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
            assert s.recv(1) == b""  # closed by the server (a socket timeout here would fail the test)


def test_requests_over_the_limit_get_a_json_503_with_retry_after():
    from test_server import running, until, wait_ready

    model = Model()
    with running(model_app(model), limit_concurrency=1) as (base, _):
        wait_ready(base)
        port = int(base.rsplit(":", 1)[1])
        model.gate.clear()
        model.entered.clear()
        held = send(port, "/v1/classify", {"text": "Will it rain tomorrow?"})
        try:
            until(model.entered.is_set, "the request held by the worker")
            r = httpx.get(f"{base}/healthz", timeout=WAIT_S)
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert r.json()["error"] == "server busy: too many requests at once"
        finally:
            model.gate.set()
            held.close()


# ---- 24: a request sent on an idle keep-alive connection as the server stops ----------------------------------------


def test_a_request_on_an_idle_keep_alive_connection_during_shutdown_is_answered():
    import http.client

    from test_server import running, until, wait_ready

    def ask(s: socket.socket) -> http.client.HTTPResponse:
        body = json.dumps({"text": "Will it rain tomorrow?"}).encode()
        s.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        response = http.client.HTTPResponse(s)
        response.begin()
        response.read()
        return response

    def refused(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=WAIT_S).close()
        except ConnectionRefusedError:
            return True
        return False

    with running(model_app(Model()), shutdown_grace_s=WAIT_S) as (base, server):
        wait_ready(base)
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
            assert ask(s).status == 200  # kept alive, then idle
            server.should_exit = True  # what SIGTERM sets
            until(lambda: refused(port), "the server stopped listening (and shut its connections down)")
            assert ask(s).status == 200  # answered, not met by a closed socket
            assert s.recv(1) == b""  # and then closed


# ---- 11: classify --distributed resumed while an earlier run's ranks still write --------------------------------


def test_a_distributed_run_is_refused_while_an_earlier_runs_ranks_hold_their_part_files(tmp_path):
    import mlx.core as mx

    from mlx_intent import distributed as dist
    from mlx_intent.chain import build_chain
    from mlx_intent.errors import UserError
    from mlx_intent.settings import Settings

    group = mx.distributed.init()  # this process alone: the collectives still run
    source = queries(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out.jsonl"
    part = dist.part_path(out, group.rank(), group.size())
    part.write_text('{"id": "q0", "primary_intent": "restaurant"}\n')
    chain = build_chain(Settings(chain=("keyword",)))
    with open(part, "a") as earlier:  # an earlier run's rank, still writing after its launcher was killed
        fcntl.flock(earlier, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="is being written by an earlier run"):
            dist.classify_file(group, str(source), out, True, chain, 2)
        assert part.read_text() == '{"id": "q0", "primary_intent": "restaurant"}\n' and not out.exists()
    dist.classify_file(group, str(source), out, True, chain, 2)  # once it has ended, --resume finishes
    assert sorted(ids_of(out)) == [f"q{i}" for i in range(5)] and not part.exists()
