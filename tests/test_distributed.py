"""``classify --distributed`` and ``eval --distributed``: 2 ranks started by ``mlx.launch`` on this machine, ring
backend over loopback, against one process on the same input.

Every run is a subprocess (the ranks, and the one process they are compared with), so both read the shipped
keyword calibration.  A result carries its call's timing (``latency_ms``, ``latency_per_query_ms``), which no
two runs share: lines are compared with those two fields dropped and keys sorted; everything else, batch size
included, is the same byte for byte, since a rank runs exactly the batches one process would.  After a resume a
redone line also carries its resumed batch's ``batch_texts``, as it does for one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlx_intent
from mlx_intent import distributed
from mlx_intent.distributed import _check, my_batches, owner, part_path
from mlx_intent.errors import InputError
from mlx_intent.settings import ENV_VARS

ROOT = Path(mlx_intent.__file__).resolve().parent.parent
LAUNCH = Path(sys.executable).with_name("mlx.launch")
FAILING = ROOT / "tests" / "fixtures" / "failing_rank.py"
TIMING = ("latency_ms", "latency_per_query_ms")
KEYWORD = ["--chain", "keyword"]


def environment(**extra: str) -> dict[str, str]:
    """What every subprocess sees: no stray settings but the session's models folder, and this checkout."""
    stray = set(ENV_VARS.values()) - {"MLX_INTENT_HOME"}
    return {**{k: v for k, v in os.environ.items() if k not in stray}, "PYTHONPATH": str(ROOT), **extra}


def launch(cwd: Path, *args: str, script: list[str] | None = None, **env: str) -> subprocess.CompletedProcess:
    """``mlx.launch -n 2 --backend ring`` of ``mlx-intent ARGS`` (or of ``script``) on this machine, in ``cwd``."""
    command = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(distributed.free_ports()), "--"]
    command += [sys.executable, *(script or ["-m", "mlx_intent"]), *args]
    read, write = os.pipe()  # the launcher polls stdin: an open, silent pipe keeps it from spinning on EOF
    proc = subprocess.Popen(
        command,
        stdin=read,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(**env),
        cwd=cwd,
        start_new_session=True,
    )
    os.close(read)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mlx.launch did not finish:\n{out}\n{err}")
    finally:
        os.close(write)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def one_process(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlx_intent", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment(), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result


def comparable(path: Path, drop: tuple[str, ...] = TIMING) -> list[str]:
    return [
        json.dumps({k: v for k, v in json.loads(line).items() if k not in drop}, sort_keys=True, ensure_ascii=False)
        for line in path.read_text(encoding="utf-8").splitlines()
    ]


@pytest.fixture(scope="module")
def queries(tmp_path_factory, models_home) -> Path:
    """200 lines of dev (string ids, a few numeric ones, a few without an id: their line number stands in, one
    a lone surrogate),
    and beside them one.jsonl, what one process writes for them."""
    folder = tmp_path_factory.mktemp("queries")
    dev = (ROOT / "benchmarks" / "data" / "dev.jsonl").read_text(encoding="utf-8").splitlines()[:200]
    rows = [{"id": i if i % 23 == 0 else row["id"], "text": row["text"]} for i, row in enumerate(map(json.loads, dev))]
    rows = [{"text": r["text"]} if i % 37 == 5 else r for i, r in enumerate(rows)]
    rows[7]["id"] = "\ud800"  # a lone surrogate (JSON's escape): one process writes it back as that escape
    path = folder / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    one_process(folder, "classify", "--input", str(path), "--output", "one.jsonl", *KEYWORD)
    return path


def test_two_ranks_write_what_one_process_writes(queries, tmp_path):
    args = ["classify", "--input", str(queries), "--output", "two.jsonl", "--distributed", *KEYWORD]
    two = launch(tmp_path, *args, COLUMNS="80")  # what mlx.launch passes on from a terminal: rank 0 shows its bar
    assert "wrote two.jsonl (2 ranks)" in two.stderr, two.stderr
    assert comparable(tmp_path / "two.jsonl") == comparable(queries.with_name("one.jsonl"))
    assert len(comparable(tmp_path / "two.jsonl")) == 200
    assert "200q" in two.stderr  # the bar counts the whole job's lines, not rank 0's hundred
    assert not list(tmp_path.glob("*.part"))  # merged, so the part files are gone


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_rank_that_fails_mid_run_is_resumed(queries, tmp_path, how):
    args = ["classify", "--input", str(queries), "--output", "two.jsonl", "--distributed", *KEYWORD]
    failed = launch(tmp_path, *args, script=[str(FAILING)], FAIL_RANK="1", FAIL_AFTER="40", FAIL_HOW=how)
    assert not (tmp_path / "two.jsonl").exists()
    rank1 = tmp_path / part_path(Path("two.jsonl"), 1, 2)
    assert len(rank1.read_text().splitlines()) == 40  # its first five batches, flushed before it failed
    if how == "kill":
        assert "rank 1 exited with code -9" in failed.stderr, failed.stderr  # mlx.launch names a killed rank
    else:  # a rank that raises is named by rank 0, which has every other rank's share done
        assert "rank 1 of 2 failed: RuntimeError: the tier broke" in failed.stderr, failed.stderr
        assert "--resume finishes the job" in failed.stderr
        assert len((tmp_path / part_path(Path("two.jsonl"), 0, 2)).read_text().splitlines()) == 104
    kept = {line for part in tmp_path.glob("*.part") for line in part.read_text().splitlines() if whole(line)}
    # rank 1 fails again if it is handed more than the 56 lines of its share that its part file lacks
    resumed = launch(
        tmp_path, *args, "--resume", script=[str(FAILING)], FAIL_RANK="1", FAIL_AFTER="56", FAIL_HOW="raise"
    )
    assert "wrote two.jsonl (2 ranks)" in resumed.stderr, resumed.stderr
    # a line of rank 0 torn by the launcher's stop is redone in a smaller batch: batch_texts may differ there
    drop = (*TIMING, "batch_texts")
    assert comparable(tmp_path / "two.jsonl", drop) == comparable(queries.with_name("one.jsonl"), drop)
    assert kept <= set((tmp_path / "two.jsonl").read_text().splitlines())  # nothing done is done again
    assert not list(tmp_path.glob("*.part"))


def whole(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_eval_over_two_ranks_has_one_process_metrics(tmp_path, models_home):
    data = tmp_path / "lab.jsonl"
    lines = (ROOT / "benchmarks" / "data" / "dev.jsonl").read_text(encoding="utf-8").splitlines()
    data.write_text("\n".join(lines[::5][:100]) + "\n", encoding="utf-8")
    args = ["eval", str(data), *KEYWORD]
    one = one_process(tmp_path, *args, "--report", "one.md", "--predictions", "one-pred.jsonl")
    two = launch(tmp_path, *args, "--report", "two.md", "--predictions", "two-pred.jsonl", "--distributed")
    assert comparable(tmp_path / "two-pred.jsonl") == comparable(tmp_path / "one-pred.jsonl")
    assert one.stdout.split("  latency")[0] == two.stdout.split("  latency")[0]  # accuracy, macro-F1, ECE
    assert metrics(tmp_path / "two.md") == metrics(tmp_path / "one.md")
    assert (tmp_path / "two.md").read_text().startswith("# Evaluation: keyword on lab, over 2 ranks")


def metrics(report: Path) -> list[str]:
    """The report's figures that do not depend on timing, memory or the machine."""
    text = report.read_text(encoding="utf-8")
    body = text[text.index("## Summary") : text.index("## Latency")]
    per_run = ("latency", "wall time", "memory", "![")
    return [line for line in body.splitlines() if not any(word in line for word in per_run)]


# ---- without a launcher -------------------------------------------------------------------------


def test_distributed_alone_is_one_process(queries, tmp_path):
    """Outside mlx.launch the world has one rank: --distributed changes nothing, and writes no part file."""
    one_process(tmp_path, "classify", "--input", str(queries), "--output", "alone.jsonl", "--distributed", *KEYWORD)
    assert comparable(tmp_path / "alone.jsonl") == comparable(queries.with_name("one.jsonl"))
    assert not list(tmp_path.glob("*.part"))


@given(n=st.integers(0, 60), batch_size=st.integers(1, 9), size=st.integers(1, 4), bad=st.integers(0, 70))
def test_shares_cover_every_line_once_in_the_batches_of_one_process(n, batch_size, size, bad):
    """Every record lands in exactly one rank's batch, each batch is one of one process's batches (or part of
    it), and a bad line stops every rank right there, after the lines before it."""

    def records():
        for i in range(n):
            if i == bad:
                raise InputError(f"in:{i}: not valid JSON")
            yield i, f"id{i}", f"text {i}"

    seen = []
    for rank in range(size):
        batches = my_batches(records(), rank, size, batch_size, lambda ident: False)
        try:
            for batch in batches:
                assert len({i // batch_size for i, _, _ in batch}) == 1
                assert all(owner(i, batch_size, size) == rank for i, _, _ in batch)
                seen += [i for i, _, _ in batch]
        except InputError:
            assert bad < n
    assert sorted(seen) == list(range(min(n, bad)))


def test_done_lines_are_skipped():
    records = [(i, f"id{i}", "t") for i in range(10)]
    batches = list(my_batches(iter(records), 0, 2, 4, lambda ident: ident in {"id1", "id2"}))
    assert [[i for i, _, _ in b] for b in batches] == [[0, 3], [8, 9]]


class Group:
    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_resume_refuses_part_files_of_another_number_of_ranks(queries, tmp_path):
    output = tmp_path / "out.jsonl"
    part_path(output, 2, 3).write_text("")
    _check(Group(0, 3), str(queries), output, resume=True)  # its own run's part files are what it resumes
    with pytest.raises(InputError, match=r"rank 1 of 2: out.jsonl.rank-2-of-3.part is from a run with another"):
        _check(Group(1, 2), str(queries), output, resume=True)
    _check(Group(1, 2), str(queries), output, resume=False)  # a fresh run reads none


def test_stdin_is_refused(tmp_path):
    with pytest.raises(InputError, match="--distributed needs --input FILE"):
        _check(Group(0, 2), "-", tmp_path / "out.jsonl", resume=False)
