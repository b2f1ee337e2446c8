"""The chain from the command line: ``classify --verbose`` shows who answered and why the others did not,
``config`` shows where each setting came from, and ``stats --check`` exit codes on a log from ``classify --log``."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from mlx_intent import metrics
from mlx_intent.cli.main import main
from mlx_intent.models.registry import BUNDLED
from mlx_intent.stats import EXIT_CRITICAL, EXIT_OK, EXIT_WARNING

QUERIES = [
    "Where can I eat fish in Kadıköy?",
    "How do I get from Taksim to Sultanahmet by tram?",
    "Will it rain tomorrow?",
    "Plan my day: Topkapı, Hagia Sophia, Basilica Cistern",
]


@pytest.fixture
def cwd(clean_settings, tmp_path):
    """A clean directory (no stray .env) and no setting from the environment but the session's models folder."""
    return tmp_path


def run(*args: str, code: int = 0, **kwargs) -> str:
    result = CliRunner().invoke(main, list(args), **kwargs)
    assert result.exit_code == code, result.output
    return result.output


def test_classify_verbose_shows_tier_model_and_fallbacks(cwd):
    shown = json.loads(run("classify", "--verbose", "--chain", "tinyllama,keyword", QUERIES[0]))
    assert (shown["primary_intent"], shown["tier"], shown["model"]) == ("restaurant", "keyword", None)
    assert shown["fallbacks"] == [
        {
            "tier": "tinyllama",
            "reason": "not downloaded (get it with: mlx-intent models pull tinyllama)",
            "kind": "not_installed",
        }
    ]
    assert shown["cached"] is False and shown["lang"] == "en" and isinstance(shown["latency_ms"], float)
    assert shown["batch_texts"] == 1 and shown["latency_per_query_ms"] == pytest.approx(shown["latency_ms"], abs=0.01)
    assert shown["runtime_fallback"] is False  # tinyllama is only absent here
    plain = json.loads(run("classify", "--chain", "tinyllama,keyword", QUERIES[0]))
    assert set(plain) == {"primary_intent", "confidence", "all_intents"}


def test_classify_verbose_names_the_model_that_answered(cwd):
    args = ["classify", "-v", "--chain", f"{BUNDLED},keyword", "--min-confidence", "0", "--latency-budget-ms", "600000"]
    shown = json.loads(run(*args, "Is the Grand Bazaar open on Sunday?"))
    assert (shown["tier"], shown["model"], shown["fallbacks"]) == (BUNDLED, BUNDLED, [])
    assert len(shown["top"]) == 5 and shown["primary_intent"] in shown["top"]


def config_rows(output: str) -> dict[str, tuple[str, str]]:
    """setting -> (value, source) from the ``config`` table."""
    table = output.split("\nchain: ", 1)[0]  # the chain in force and each LLM's place follow the table
    rows = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[1:]]
    return {row[0]: (row[2], row[3]) for row in rows}


def test_config_shows_precedence_dotenv_env_flag(cwd, monkeypatch):
    dotenv = cwd / ".env"
    dotenv.write_text("LLM_MODEL=tinyllama\nMLX_INTENT_CACHE_SIZE=5\nMLX_INTENT_BATCH_SIZE=3\n")
    env = {"MLX_INTENT_CACHE_SIZE": "7", "MLX_INTENT_BATCH_SIZE": "4"}
    rows = config_rows(run("config", "--batch-size", "9", env=env))
    assert rows["model"] == ("tinyllama", f".env ({dotenv})")
    assert rows["cache_size"] == ("7", "environment")
    assert rows["batch_size"] == ("9", "command line")
    assert rows["retry_after_s"] == ("60", "default")


def test_config_names_the_bad_value_and_a_later_layer_fixes_it(cwd):
    out = run("config", code=2, env={"MLX_INTENT_CACHE_SIZE": "-1"})  # bad usage (issue 26, finding 20)
    assert "MLX_INTENT_CACHE_SIZE='-1' (from environment)" in out
    rows = config_rows(run("config", "--cache-size", "0", env={"MLX_INTENT_CACHE_SIZE": "-1"}))
    assert rows["cache_size"] == ("0", "command line")


def classify_to_log(cwd, chain: str, *options: str) -> str:
    """Classify QUERIES from a JSONL file with ``--log``; return the log's path."""
    queries = cwd / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(QUERIES)))
    log = cwd / f"{chain.replace(',', '-')}.log"
    output = str(cwd / "out.jsonl")
    run("classify", "--chain", chain, *options, "--log", str(log), "--input", str(queries), "--output", output)
    assert len(log.read_text().splitlines()) == len(QUERIES)  # one line per classification
    return str(log)


def test_stats_check_ok_on_a_clean_log(cwd):
    out = run("stats", classify_to_log(cwd, "keyword"), "--check", code=EXIT_OK)
    assert out.startswith(f"OK: no alerts over {len(QUERIES)} records")


def test_stats_check_does_not_warn_for_a_tier_not_installed(cwd):
    """TinyLlama is not downloaded here: every query passes it over, which is a configuration fact, not a
    fallback; the report lists it once."""
    log = classify_to_log(cwd, "tinyllama,keyword")
    assert run("stats", log, "--check", code=EXIT_OK).startswith(f"OK: no alerts over {len(QUERIES)} records")
    report = run("stats", log)
    assert "fallback rate   0.0% (0) at run time (absent tiers not counted)" in report
    assert "absent tiers    tinyllama: not downloaded (get it with: mlx-intent models pull tinyllama)" in report


def test_stats_check_warns_when_every_query_fell_back_at_run_time(cwd):
    """The bundled model runs past a latency budget it cannot meet: every query falls back, and warns."""
    log = classify_to_log(cwd, f"tinyllama,{BUNDLED},keyword", "--latency-budget-ms", "0.001")
    out = run("stats", log, "--check", code=EXIT_WARNING)
    assert "WARNING  fallback rate 100.0% at run time > 10%" in out
    assert f"{BUNDLED}: timeout" in run("stats", log) and "absent tiers    tinyllama" in run("stats", log)


def test_stats_check_critical_on_peak_memory(cwd, monkeypatch):
    monkeypatch.setattr(metrics, "peak_memory_mb", lambda: 8 * 1024.0)  # as if an 8 GB model had run
    out = run("stats", classify_to_log(cwd, "keyword"), "--check", code=EXIT_CRITICAL)
    assert "CRITICAL peak memory" in out


def test_stats_check_without_a_log_is_an_error(cwd):
    assert "no log file" in run("stats", str(cwd / "missing.log"), "--check", code=1)
