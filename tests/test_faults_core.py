"""Issue 17, nothing lost and nothing wrong: a log that cannot be written costs no answer, the result cache
never hands one text another's answer, and no calibration file is trusted blindly."""

from __future__ import annotations

import errno
import json
import os
import re
import warnings

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_intent import metrics
from mlx_intent.chain import Chain, build_chain, keyword_tier
from mlx_intent.cli.main import main
from mlx_intent.metrics import ClassificationLog, read_log
from mlx_intent.schema import INTENTS
from mlx_intent.settings import Settings

SURROGATE = json.loads('"where is \\ud800 Taksim?"')  # valid JSON, and a str that UTF-8 cannot encode
ANSWER = ("primary_intent", "confidence", "all_intents", "tier")


def answers(results: list[dict]) -> list[tuple]:
    return [tuple(json.dumps(r[k]) for k in ANSWER) for r in results]


@pytest.fixture
def full_disk(monkeypatch):
    """A disk with ``full_disk.room`` bytes left for the descriptors of ``full_disk.fds`` (the logs under test):
    os.write writes what fits (a short write), then fails with ENOSPC, as a disk filling up mid-line does."""
    real = os.write

    class Disk:
        fds: set[int] = set()
        room = 0

    def write(fd, data):
        if fd not in Disk.fds:
            return real(fd, data)
        if not Disk.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, bytes(data[: Disk.room]))
        Disk.room -= n
        return n

    monkeypatch.setattr(metrics.os, "write", write)
    return Disk


def runtime_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


# ---- 5. a failed log write never costs the answer -------------------------------------------------------


def test_a_lone_surrogate_is_answered_and_logged_as_its_json_escape(tmp_path):
    path = tmp_path / "log.jsonl"
    with ClassificationLog(path) as log:
        chain = Chain([keyword_tier()], log=log)
        result = chain.classify(SURROGATE)
        assert result["primary_intent"] in INTENTS
        assert log.failures == 0 and chain.metrics.log_write_failures == 0
    assert "\\ud800" in path.read_text(encoding="utf-8")  # valid UTF-8: the escape it was read from
    (record,) = read_log(path)
    assert record["text"] == SURROGATE


def test_classify_input_with_a_surrogate_and_a_log_answers_every_line(tmp_path):
    data, out, log = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "log.jsonl"
    data.write_text('{"id": "a\\udc80", "text": "hello \\ud800 where is taksim"}\n{"id": 2, "text": "thanks"}\n')
    env = {"MLX_INTENT_LOG": str(log), "MLX_INTENT_CHAIN": "keyword"}
    result = CliRunner().invoke(main, ["classify", "--input", str(data), "--output", str(out)], env=env)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [json.loads('"a\\udc80"'), 2]
    assert [r["text"] for r in read_log(log)] == [json.loads('"hello \\ud800 where is taksim"'), "thanks"]


def test_a_full_disk_is_counted_warned_once_and_leaves_whole_lines(tmp_path, full_disk):
    path = tmp_path / "log.jsonl"
    texts = ["hello", "where can I eat fish?", "will it rain?"]
    with ClassificationLog(path) as log:
        chain = Chain([keyword_tier()], cache_size=0, log=log)
        chain.classify_batch(texts)  # written
        full_disk.fds.add(log._fd)
        full_disk.room = 7  # the disk fills up mid-line
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lost = [chain.classify_batch(texts) for _ in range(3)]
        assert answers(lost[0]) == answers(Chain([keyword_tier()], cache_size=0).classify_batch(texts))
        assert all(answers(batch) == answers(lost[0]) for batch in lost)
        assert log.failures == 9 and chain.metrics.log_write_failures == 9
        assert chain.metrics.snapshot()["log_write_failures"] == 9
        (warning,) = runtime_warnings(caught)  # once, not once per line or per batch
        assert str(path) in warning and "No space left" in warning
        full_disk.fds.clear()  # space again: the next records follow whole lines, not a torn fragment
        chain.classify_batch(texts[:1])
    records = read_log(path)
    assert records.skipped == 0 and [r["text"] for r in records] == [*texts, texts[0]]


def test_classify_reports_the_answers_it_could_not_log(tmp_path, full_disk, monkeypatch):
    data, out, log_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "log.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(["hi", "rain?", "taxi"])))
    real_open = ClassificationLog.__init__

    def opened(self, path):
        real_open(self, path)
        full_disk.fds.add(self._fd)

    monkeypatch.setattr(ClassificationLog, "__init__", opened)
    env = {"MLX_INTENT_LOG": str(log_path), "MLX_INTENT_CHAIN": "keyword", "MLX_INTENT_BATCH_SIZE": "2"}
    result = CliRunner().invoke(main, ["classify", "--input", str(data), "--output", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 3
    assert re.search(r"3 answers could not be logged to .*log\.jsonl \(No space left on device\)", result.stderr)


def test_the_server_answers_through_a_full_disk_and_counts_it(tmp_path, full_disk):
    from fastapi.testclient import TestClient

    from mlx_intent.serve.app import create_app

    with ClassificationLog(tmp_path / "log.jsonl") as log:
        full_disk.fds.add(log._fd)
        chain = Chain([keyword_tier()], cache_size=0, log=log)
        with TestClient(create_app(Settings(chain=("keyword",)), chain)) as client:
            for text in ("hello", "will it rain?"):
                response = client.post("/v1/classify", json={"text": text})
                assert response.status_code == 200, response.text
                assert response.json()["primary_intent"] in INTENTS
            scraped = client.get("/metrics").text
    count = re.search(r"^mlx_intent_log_write_failures (\S+)$", scraped, re.M)
    assert count and float(count[1]) == log.failures == 3  # the warm-up's answer and the two requests'


# ---- 6. the result cache never returns another text's answer ---------------------------------------------

# Pairs that normalize() folds together, though the keyword tier reads them apart (emoji, uppercase IST).
PAIRS = [("🙂🙂", "☔☔☔"), ("Wie komme ich zum ist?", "Wie komme ich zum IST?"), ("kadikoy", "Kadıköy?")]


@pytest.mark.parametrize("pair", PAIRS)
def test_a_cached_answer_is_the_answer_to_that_text(pair):
    uncached = Chain([keyword_tier()], cache_size=0)
    expected = answers(uncached.classify_batch(list(pair)))
    if pair != PAIRS[-1]:
        assert expected[0] != expected[1]  # so a shared cache entry would show
    for order in (pair, pair[::-1]):
        chain = Chain([keyword_tier()])
        got = {text: answers([chain.classify(text)])[0] for text in order}
        assert [got[t] for t in pair] == expected


def test_the_blend_caches_per_text_too():
    chain = build_chain(Settings(chain=("e5-small", "keyword")))
    fresh = build_chain(Settings(chain=("e5-small", "keyword"), cache_size=0))
    for a, b in PAIRS[:2]:
        chain.classify(a)
        assert answers([chain.classify(b)]) == answers([fresh.classify(b)])


# Pieces that fold alike to normalize() but that the tiers tell apart, and plain text.
TEXTS = st.lists(
    st.sampled_from(["IST", "ist", "☔", "🙂", "?", "!", ",", " ", "\n", "Hello", "hello", "rain", "food", "where"]),
    max_size=8,
).map("".join) | st.text(max_size=20)


@given(TEXTS, TEXTS)
@settings(max_examples=200, deadline=None)
def test_any_text_cached_after_any_other_answers_as_uncached(first, second):
    chain, uncached = Chain([keyword_tier()]), Chain([keyword_tier()], cache_size=0)
    chain.classify(first)
    assert answers([chain.classify(second)]) == answers([uncached.classify(second)])
