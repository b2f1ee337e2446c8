"""Faults a user (or a crash) can cause on the command line: each gives a clear message and the exit code of
mlx_intent/errors.py, never a traceback, and loses nothing.

Unwritable outputs fail before the run; crafted GGUF headers raise GGUFError only; training hyper-parameters
are range-checked; the CLI takes texts by the server's rule (format characters only: refused; longer than
MAX_TEXT_CHARS: cut); stale staging folders of killed conversions are removed; eval never overwrites a report
unless told to.  And what holds already, so it keeps holding: a classify killed with SIGKILL resumes with every
line exactly once, a truncated model or a missing tokenizer is a recorded fallback.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_intent
from mlx_intent import chain as chain_module
from mlx_intent import staging
from mlx_intent.cli.main import main
from mlx_intent.errors import EXIT_ERROR, EXIT_INPUT, UserError
from mlx_intent.models import gguf, hub, registry
from mlx_intent.models.gguf import GGUFError
from mlx_intent.normalize import MAX_TEXT_CHARS, text_problem
from mlx_intent.settings import SettingsError, load_settings, settings_home

ROOT = Path(mlx_intent.__file__).resolve().parent.parent
KEYWORD = ["--chain", "keyword"]


pytestmark = pytest.mark.usefixtures("clean_settings")  # conftest: no stray .env or MLX_INTENT_* setting


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def assert_clean_error(result, code: int, *words: str) -> None:
    """Exit ``code`` with a message (click's SystemExit), no traceback, and ``words`` in the output."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def labelled(path: Path) -> Path:
    return write_jsonl(
        path,
        [
            {"id": "a", "text": "Where can I eat fish?", "lang": "en", "primary_intent": "restaurant"},
            {"id": "b", "text": "Merhaba!", "lang": "tr", "primary_intent": "greeting"},
        ],
    )


# ---- 15: unwritable outputs fail before the run, a full disk is reported ------------------------------


def _outputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    queries = str(write_jsonl(tmp / "in.jsonl", [{"id": 1, "text": "hello"}]))
    data = str(labelled(tmp / "tiny.jsonl"))
    (tmp / "a-file").write_text("not a folder\n")
    log = tmp / "ok.log"
    log.write_text(json.dumps({"ts": 1, "primary_intent": "general", "tier": "general", "latency_ms": 1.0}) + "\n")
    return {
        "classify --output": (["classify", *KEYWORD, "--input", queries, "--output", "no/such/out.jsonl"], "--output"),
        "classify --output under a file": (
            ["classify", *KEYWORD, "--input", queries, "--output", "a-file/out.jsonl"],
            "a-file is not a folder",
        ),
        "classify --log": (["classify", *KEYWORD, "--log", "no/such/x.log", "hello"], "--log"),
        "eval --report": (["eval", data, *KEYWORD, "--report", "a-file/sub/r.md"], "--report"),
        "eval --predictions": (
            ["eval", data, *KEYWORD, "--report", "r.md", "--predictions", "no/such/p.jsonl"],
            "--predictions",
        ),
        "eval --log": (["eval", data, *KEYWORD, "--report", "r.md", "--log", "no/such/x.log"], "--log"),
        "compare --report": (["compare", "keyword", "general", data, "--report", "a-file/r.md"], "--report"),
        "stats --plot": (["stats", str(log), "--plot", "a-file/plots"], "--plot"),
    }


OUTPUT_CASES = [
    "classify --output",
    "classify --output under a file",
    "classify --log",
    "eval --report",
    "eval --predictions",
    "eval --log",
    "compare --report",
    "stats --plot",
]


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_unwritable_output_fails_before_the_run(tmp_path, no_run, case):
    args, words = _outputs(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_clean_error(invoke(*args), EXIT_INPUT, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no folder made


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full is Linux's always-full device")
def test_a_full_disk_is_reported_and_no_output_is_claimed(tmp_path):
    queries = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": f"hello {i}"} for i in range(20)])
    result = invoke("classify", *KEYWORD, "--input", str(queries), "--output", "/dev/full")
    assert_clean_error(result, EXIT_ERROR, "cannot write /dev/full", "No space left on device")
    assert "wrote" not in result.output
    data = labelled(tmp_path / "tiny.jsonl")
    result = invoke("eval", str(data), *KEYWORD, "--report", "r.md", "--predictions", "/dev/full", "--force")
    assert_clean_error(result, EXIT_ERROR, "cannot write /dev/full")


# ---- 15: crafted GGUF headers ------------------------------------------------------------------------


def llama_gguf(path: Path, drop: str | None = None) -> Path:
    """A tiny valid Llama GGUF (written by MLX): 3 tokens, one merge, one block, the required llama keys but
    ``drop``."""
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": "llama",
        "general.alignment": u32(32),
        "llama.block_count": u32(1),
        "llama.embedding_length": u32(32),
        "llama.feed_forward_length": u32(64),
        "llama.attention.head_count": u32(2),
        "llama.rope.freq_base": mx.array(10000.0),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.token_type": mx.array([1, 1, 3], dtype=mx.int32),
    }
    meta.pop(drop, None)
    tensors = {"token_embd.weight": mx.zeros((3, 32)), "output_norm.weight": mx.ones((32,))}
    for name, shape in BLOCK_SHAPES.items():  # one whole block: the shapes must fit the metadata (issue 26: 8)
        tensors[f"blk.0.{name}.weight"] = mx.zeros(shape)
    mx.save_gguf(str(path), tensors, meta)
    return path


BLOCK_SHAPES = {
    **{name: (32, 32) for name in ("attn_q", "attn_k", "attn_v", "attn_output")},
    "ffn_gate": (64, 32),
    "ffn_up": (64, 32),
    "ffn_down": (32, 64),
    "attn_norm": (32,),
    "ffn_norm": (32,),
}


def value_at(data: bytes, key: str) -> int:
    """Offset of the value of metadata ``key`` (after its name and its 4-byte type)."""
    name = key.encode()
    return data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4


def patched(path: Path, key: str, fmt: str, value: int, skip: int = 0) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, value_at(data, key) + skip, value)
    path.write_bytes(bytes(data))
    return path


CRAFTED = {
    # an int32 array (item type, then count) claiming 2**61 items: was a MemoryError / OverflowError
    "array count": (
        lambda p: patched(llama_gguf(p), "tokenizer.ggml.token_type", "<Q", 1 << 61, skip=4),
        "more than the file can hold",
    ),
    "string count": (
        lambda p: patched(llama_gguf(p), "tokenizer.ggml.tokens", "<Q", 1 << 40, skip=4),
        "more than the file can hold",
    ),
    "alignment 0": (lambda p: patched(llama_gguf(p), "general.alignment", "<I", 0), "general.alignment = 0"),
    "alignment 48": (lambda p: patched(llama_gguf(p), "general.alignment", "<I", 48), "power of two"),
    "missing block_count": (lambda p: llama_gguf(p, drop="llama.block_count"), "missing metadata llama.block_count"),
    "zero heads": (
        lambda p: patched(llama_gguf(p), "llama.attention.head_count", "<I", 0),
        "llama.attention.head_count is 0, expected a positive integer",
    ),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_gguf_header_is_a_gguf_error(tmp_path, case):
    make, words = CRAFTED[case]
    path = make(tmp_path / "crafted.gguf")
    out = tmp_path / "out"
    with pytest.raises(GGUFError, match=words.replace("(", r"\(")):
        gguf.convert_gguf(path, out)
    assert not out.exists() and not list(tmp_path.glob(".*.partial"))
    result = invoke("models", "convert", "--gguf", str(path), "--name", "crafted", "--home", str(tmp_path / "h"))
    assert_clean_error(result, EXIT_ERROR, f"Error: {path}", words)


def test_the_tiny_gguf_converts(tmp_path):
    """The base of the crafted cases is itself valid, so each case fails for its own flaw only."""
    out = gguf.convert_gguf(llama_gguf(tmp_path / "ok.gguf"), tmp_path / "ok")
    assert registry.is_mlx_folder(out)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    return llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 10_000),
)
def test_mutated_gguf_headers_raise_only_gguf_error(tiny_gguf, tmp_path, edits, cut):
    data = bytearray(tiny_gguf)
    for at, byte in edits:
        data[at % len(data)] = byte
    if cut is not None:
        data = data[: cut % len(data)]
    path = tmp_path / "mutated.gguf"
    path.write_bytes(bytes(data))
    try:
        header = gguf.read_header(path)
        gguf.check_supported(header, path)
        gguf.model_config(header.metadata, tied=True)
        gguf.tokenizer_config(header.metadata)
        gguf.build_tokenizer(header.metadata)
    except GGUFError:
        pass


# ---- 15: training ranges, eval data, .env errors, the models home -------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--batch-size", "0"],
        ["--epochs", "0"],
        ["--epochs", "-1"],
        ["--epochs", "nan"],
        ["--iters", "0"],
        ["--learning-rate", "0"],
        ["--learning-rate", "-0.1"],
        ["--learning-rate", "inf"],
        ["--rank", "0"],
        ["--num-layers", "0"],
    ],
)
def test_train_refuses_out_of_range_settings_before_training(tmp_path, monkeypatch, args):
    def trained(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr("mlx_intent.tuner.train.train_adapter", trained)
    result = invoke("train", "smollm2-135m", *args, "--home", str(tmp_path / "h"))
    assert_clean_error(result, EXIT_INPUT, f"Invalid value for '{args[0]}'")


def test_train_adapter_refuses_batch_size_0_before_loading_the_model(monkeypatch, tmp_path):
    from mlx_intent.errors import InputError
    from mlx_intent.models import loading
    from mlx_intent.tuner.train import train_adapter

    monkeypatch.setattr(loading, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    with pytest.raises(InputError, match="batch size must be at least 1"):
        train_adapter("smollm2-135m", labelled(tmp_path / "t.jsonl"), batch_size=0, home=settings_home())


@pytest.mark.parametrize(
    "row, field",
    [
        ({"all_intents": [["restaurant"], "general"]}, "all_intents"),
        ({"all_intents": [{"x": 1}]}, "all_intents"),
        ({"primary_intent": ["restaurant"]}, "primary_intent"),
        ({"lang": ["en"]}, "lang"),
    ],
)
def test_eval_names_the_line_of_a_malformed_label(tmp_path, no_run, row, field):
    good = {"id": "a", "text": "Where can I eat fish?", "lang": "en", "primary_intent": "restaurant"}
    data = write_jsonl(tmp_path / "bad.jsonl", [good, {**good, "id": "b", **row}])
    result = invoke("eval", str(data), *KEYWORD, "--report", str(tmp_path / "r.md"))
    assert_clean_error(result, EXIT_INPUT, "bad.jsonl:2:", field)


def test_env_error_names_the_line_but_never_shows_it(tmp_path):
    dotenv = tmp_path / "x.env"
    dotenv.write_text("LLM_MODEL=smollm2-135m\nHF_TOKEN hf_live_SECRET123\n")
    with pytest.raises(SettingsError) as e:
        load_settings(environ={}, dotenv=dotenv)
    assert "x.env:2:" in str(e.value) and "SECRET" not in str(e.value)
    result = invoke("classify", "--env-file", str(dotenv), *KEYWORD, "hello")
    assert result.exit_code != 0 and "x.env:2:" in result.output and "SECRET" not in result.output


def _leaf_commands(group, prefix=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _leaf_commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


COMMANDS = {" ".join(path): command for path, command in _leaf_commands(main) if path != ("stats",)}


@pytest.mark.parametrize("path", COMMANDS)
def test_every_command_takes_the_models_home_from_the_settings(path):
    """Every command but stats (which reads a log) reads --home / .env / MLX_INTENT_HOME one way: the home
    setting of settings.py, so convert writes where classify looks."""
    options = {opt for p in COMMANDS[path].params for opt in p.opts}
    assert {"--home", "--env-file"} <= options, path


def test_the_e5_tier_looks_in_the_home_of_the_settings(tmp_path, monkeypatch):
    """A folder in <home>/e5-small (``models pull e5-small`` writes it there) is what the e5-small tier loads,
    for a home from .env as from --home; here a broken one, so its load failure shows it was looked at."""
    home = tmp_path / "h"
    (home / "e5-small").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (home / "e5-small" / name).write_text("{}")
    (tmp_path / ".env").write_text(f"MLX_INTENT_HOME={home}\n")
    monkeypatch.delenv("MLX_INTENT_HOME")  # the environment would win over .env
    for extra in ([], ["--home", str(home)]):
        result = invoke("classify", "-v", "--chain", "e5-small,keyword", *extra, "Where can I eat fish?")
        assert result.exit_code == 0, result.output
        shown = json.loads(result.stdout)
        assert shown["tier"] == "keyword"
        assert [(f["tier"], f["kind"]) for f in shown["fallbacks"]] == [("e5-small", "load_failed")]


# ---- 16: the server's rule for texts, and its length limit ----------------------------------------------

FORMAT_ONLY = ["\u200b", "\ufeff", "\u200e\u200f", " \u200b\u2060 \u202a", "\u00ad", "\ud800"]


@pytest.mark.parametrize("text", FORMAT_ONLY, ids=lambda t: t.encode("unicode_escape").decode())
def test_format_characters_only_are_refused_as_by_the_server(tmp_path, text):
    result = invoke("classify", *KEYWORD, text) if text != "\ud800" else None
    if result is not None:
        assert_clean_error(result, EXIT_INPUT, "text is empty")
    queries = tmp_path / "in.jsonl"
    queries.write_text(json.dumps({"id": 1, "text": "hello"}) + "\n" + json.dumps({"id": 2, "text": text}) + "\n")
    result = invoke("classify", *KEYWORD, "--input", str(queries), "--output", str(tmp_path / "out.jsonl"))
    assert_clean_error(result, EXIT_INPUT, "in.jsonl:2: text")


def test_a_lone_surrogate_is_refused_as_by_the_server(tmp_path):
    queries = tmp_path / "in.jsonl"
    queries.write_text('{"id": 1, "text": "hello \\ud800"}\n')
    result = invoke("classify", *KEYWORD, "--input", str(queries), "--output", str(tmp_path / "out.jsonl"))
    assert_clean_error(result, EXIT_INPUT, "in.jsonl:1: text holds a lone surrogate")


@settings(max_examples=200, deadline=None)
@given(st.text(st.sampled_from(["a", "ş", " ", "\t", "\n", "\u200b", "\ufeff", "\u200e", "\x00", "\u2060", "é"])))
def test_the_cli_and_the_server_refuse_the_same_texts(text):
    from pydantic import ValidationError

    from mlx_intent.batch_io import query_text
    from mlx_intent.errors import InputError
    from mlx_intent.serve.schemas import ClassifyRequest

    try:
        ClassifyRequest(text=text)
        served = True
    except ValidationError:
        served = False
    try:
        query_text(text)
        taken = True
    except InputError:
        taken = False
    assert served == taken == (text_problem(text) is None)


def test_long_texts_are_cut_to_the_shared_limit_before_any_tier(tmp_path, monkeypatch):
    seen: list[int] = []
    classify_batch = chain_module.Chain.classify_batch

    def spy(self, texts, *args, **kwargs):
        seen.extend(len(t) for t in texts)
        return classify_batch(self, texts, *args, **kwargs)

    monkeypatch.setattr(chain_module.Chain, "classify_batch", spy)
    long = "Where can I eat fish in Kadıköy? " * 20_000  # 660,000 characters
    queries = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": "hello"}, {"id": 2, "text": long}])
    out = tmp_path / "out.jsonl"
    result = invoke("classify", *KEYWORD, "--input", str(queries), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert f"in.jsonl:2: text of {len(long)} characters cut to its first {MAX_TEXT_CHARS}" in result.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [1, 2]
    assert json.loads(out.read_text().splitlines()[1])["primary_intent"] == "restaurant"
    result = invoke("classify", *KEYWORD, long)
    assert result.exit_code == 0, result.output
    assert max(seen) == MAX_TEXT_CHARS


# ---- 16: stale staging folders ---------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _stale_and_live(folder: Path) -> tuple[list[Path], list[Path]]:
    """Staging folders as killed runs leave them (a dead pid; an old one without a pid), and live ones."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = [folder / f".smollm2-135m.{_dead_pid()}.abc123_x.partial", folder / ".llama-3.2-3b.k2j4h5g6.partial"]
    live = [folder / f".smollm2-135m.{os.getpid()}.zzz999qq.partial", folder / ".tinyllama.m3n4b5v6.partial"]
    for path in stale + live:
        (path / "part").mkdir(parents=True)
        (path / "part" / "model.safetensors").write_bytes(b"\0" * 1024)
    old = time.time() - staging.STALE_AFTER_S - 60
    os.utime(stale[1], (old, old))
    return stale, live


@pytest.mark.parametrize("command", ["models convert", "models pull", "train"])
def test_convert_pull_and_train_remove_stale_staging_folders(tmp_path, monkeypatch, command):
    home = tmp_path / "h"
    folder = home / "adapters" if command == "train" else home
    stale, live = _stale_and_live(folder)
    monkeypatch.setattr(hub, "pull", lambda name, from_source=False, home=None: home / name)

    def train_adapter(*args, **kwargs):
        raise UserError("not trained here")

    monkeypatch.setattr("mlx_intent.tuner.train.train_adapter", train_adapter)
    args = {
        "models convert": ["models", "convert", "--gguf", str(tmp_path / "none.gguf"), "--name", "x"],
        "models pull": ["models", "pull", "smollm2-135m"],
        "train": ["train", "smollm2-135m"],
    }[command]
    result = invoke(*args, "--home", str(home))
    for path in stale:
        assert not path.exists()
        assert f"note: removed {path}" in result.output
    assert all(path.exists() for path in live)


def test_a_staging_folder_is_kept_while_its_writer_lives_and_removed_once_it_is_killed(tmp_path):
    code = (
        "import sys; from pathlib import Path; from mlx_intent.staging import staging_dir;"
        "print(staging_dir(Path(sys.argv[1]) / 'model'), flush=True); sys.stdin.read()"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        path = Path(writer.stdout.readline().strip())
        assert path.parent == tmp_path and path.is_dir() and str(writer.pid) in path.name
        assert staging.clean_stale(tmp_path) == [] and path.is_dir()
    finally:
        writer.kill()
        writer.wait()
    assert staging.clean_stale(tmp_path) == [path] and not path.exists()


# ---- 16: eval never overwrites a report unless told to ------------------------------------------------------


def test_eval_refuses_to_overwrite_a_report_without_force(tmp_path):
    data = labelled(tmp_path / "tiny.jsonl")
    report = tmp_path / "r.md"
    report.write_text("a committed report\n")
    result = invoke("eval", str(data), *KEYWORD, "--report", str(report))
    assert_clean_error(result, EXIT_ERROR, f"--report {report} exists; use --force")
    assert report.read_text() == "a committed report\n"
    result = invoke("compare", "keyword", "general", str(data), "--report", str(report))
    assert_clean_error(result, EXIT_ERROR, "exists; use --force")
    assert report.read_text() == "a committed report\n"
    result = invoke("eval", str(data), *KEYWORD, "--report", str(report), "--force")
    assert result.exit_code == 0, result.output
    assert report.read_text().startswith("# Evaluation: keyword on tiny")


def test_eval_default_report_is_in_the_working_folder_never_in_benchmarks_reports(tmp_path):
    data = labelled(tmp_path / "tiny.jsonl")
    committed = ROOT / "benchmarks" / "reports" / "eval-tiny-keyword.md"
    result = invoke("eval", str(data), *KEYWORD)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval-tiny-keyword.md").is_file()
    assert not committed.exists()
    again = invoke("eval", str(data), *KEYWORD)
    assert_clean_error(again, EXIT_ERROR, "eval-tiny-keyword.md exists; use --force")


# ---- what holds today: kill -9 then --resume; a broken model is a recorded fallback ---------------------------


def test_classify_killed_with_sigkill_resumes_with_every_line_exactly_once(tmp_path):
    rows = [{"id": f"q{i}", "text": f"Where can I eat fish near stop {i}?"} for i in range(300)]
    queries = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_INTENT_") or k == "MLX_INTENT_HOME"}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "mlx_intent", "classify", *KEYWORD, "--output", str(out)]
    # The first run reads stdin, fed the first half only, so it is surely killed mid-run, after some output.
    first = subprocess.Popen([*command, "--input", "-"], stdin=subprocess.PIPE, env=env, cwd=tmp_path)
    lines = queries.read_bytes().splitlines(keepends=True)
    first.stdin.write(b"".join(lines[:150]))
    first.stdin.flush()
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_bytes().count(b"\n") < 100) and time.monotonic() < deadline:
        assert first.poll() is None, "the first run ended before it was killed"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    written = out.read_bytes().count(b"\n")
    assert 100 <= written < 300
    resumed = subprocess.run([*command, "--input", str(queries), "--resume"], env=env, cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0
    ids = [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(ids) == sorted(r["id"] for r in rows) and len(ids) == len(set(ids)) == 300


def _broken_copy(source: Path, home: Path, break_it) -> Path:
    """A models folder whose smollm2-135m links every file of ``source`` but the ones ``break_it`` replaces."""
    folder = home / "smollm2-135m"
    folder.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f)
    break_it(folder, source)
    return home


def _truncate_weights(folder: Path, source: Path) -> None:
    (folder / "model.safetensors").unlink()
    with open(source / "model.safetensors", "rb") as f:
        (folder / "model.safetensors").write_bytes(f.read(1 << 20))


def _drop_tokenizer(folder: Path, source: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


@pytest.mark.parametrize("break_it", [_truncate_weights, _drop_tokenizer], ids=["truncated weights", "no tokenizer"])
def test_a_broken_model_is_a_fallback_with_its_reason(tmp_path, bundled, models_home, break_it):
    home = _broken_copy(Path(models_home) / "smollm2-135m", tmp_path / "h", break_it)
    llm = ["--min-confidence", "0", "--latency-budget-ms", "600000", "--home", str(home)]
    result = invoke("classify", "-v", "--chain", "smollm2-135m,keyword", *llm, "Where can I eat fish?")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["tier"] == "keyword" and shown["primary_intent"] == "restaurant"
    [fallback] = shown["fallbacks"]
    assert (fallback["tier"], fallback["kind"]) == ("smollm2-135m", "load_failed")
    assert fallback["reason"].startswith("load failed: ")
    alone = invoke("classify", "--chain", "smollm2-135m", *llm, "Where can I eat fish?")
    assert alone.exit_code == 0 and "Traceback" not in alone.output
    assert json.loads(alone.stdout)["primary_intent"] == "general"
    assert (Path(models_home) / "smollm2-135m" / "model.safetensors").stat().st_size > 1 << 20
