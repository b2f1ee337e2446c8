"""Settings: precedence defaults < .env < environment < command line, sources, bad values, .env parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_intent.cli.config import config_command
from mlx_intent.settings import (
    CONFIDENCE_LEVELS,
    ENV_VARS,
    Settings,
    SettingsError,
    default_home,
    load_settings,
    read_dotenv,
)


@pytest.fixture(autouse=True)
def no_dotenv_here(tmp_path, monkeypatch):
    """Run every test in an empty folder, so a developer's own ./.env never leaks in."""
    monkeypatch.chdir(tmp_path)


def write_env(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "test.env"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults():
    s = load_settings(environ={})
    assert s == Settings(home=default_home())  # Settings() alone: the home setting of .env and the environment
    assert (s.mode, s.latency_budget_ms, s.min_confidence, s.cache_size) == ("score", 800.0, 0.5, 1024)
    assert (s.max_loaded_models, s.retry_after_s, s.batch_size) == (2, 60.0, 8)
    assert s.model is s.fallback_model is s.chain is s.log is None and s.home == default_home()
    assert set(s.sources.values()) == {"default"} and set(s.sources) == set(ENV_VARS)
    assert CONFIDENCE_LEVELS == {"high": 0.85, "medium": 0.70, "low": 0.50}
    assert s.min_confidence == CONFIDENCE_LEVELS["low"]


def test_precedence_and_sources(tmp_path):
    dotenv = write_env(
        tmp_path,
        "LLM_MODEL=from-dotenv\nMLX_INTENT_CACHE_SIZE=10\nMLX_INTENT_BATCH_SIZE=3\nMLX_INTENT_MODE=generate\n",
    )
    environ = {"MLX_INTENT_CACHE_SIZE": "20", "MLX_INTENT_BATCH_SIZE": "4", "UNRELATED": "x"}
    s = load_settings(cli={"batch_size": "5", "model": None}, environ=environ, dotenv=dotenv)
    assert (s.model, s.mode, s.cache_size, s.batch_size) == ("from-dotenv", "generate", 20, 5)
    assert s.sources["model"] == s.sources["mode"] == f".env ({dotenv})"
    assert s.sources["cache_size"] == "environment"
    assert s.sources["batch_size"] == "command line"
    assert s.sources["latency_budget_ms"] == "default"


def test_default_dotenv_is_the_current_folders(tmp_path):
    (tmp_path / ".env").write_text("MLX_INTENT_LATENCY_BUDGET_MS=250\n")
    s = load_settings(environ={})
    assert s.latency_budget_ms == 250.0
    assert s.sources["latency_budget_ms"] == f".env ({tmp_path / '.env'})"


def test_explicit_missing_dotenv_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="no .env file"):
        load_settings(environ={}, dotenv=tmp_path / "absent.env")


def test_typed_values():
    environ = {
        "MLX_INTENT_HOME": "~/models",
        "MLX_INTENT_CHAIN": " primary, fallback ,keyword,",
        "MLX_INTENT_MODE": " Generate ",
        "MLX_INTENT_MIN_CONFIDENCE": "0.85",
        "MLX_INTENT_RETRY_AFTER_S": "0",
        "MLX_INTENT_CACHE_SIZE": "0",
        "MLX_INTENT_LOG": "/tmp/x.jsonl",
    }
    s = load_settings(environ=environ)
    assert s.home == Path("~/models").expanduser()
    assert s.chain == ("primary", "fallback", "keyword")
    assert s.mode == "generate"
    assert s.min_confidence == 0.85 and s.retry_after_s == 0.0 and s.cache_size == 0
    assert s.log == Path("/tmp/x.jsonl")
    assert isinstance(s.cache_size, int) and isinstance(s.latency_budget_ms, float)


def test_blank_clears_an_optional_value(tmp_path):
    dotenv = write_env(tmp_path, "LLM_MODEL=qwen\n")
    s = load_settings(environ={"LLM_MODEL": ""}, dotenv=dotenv)
    assert s.model is None and s.sources["model"] == "environment"


def test_later_layer_fixes_a_bad_earlier_value(tmp_path):
    dotenv = write_env(tmp_path, "MLX_INTENT_CACHE_SIZE=lots\n")
    assert load_settings(environ={"MLX_INTENT_CACHE_SIZE": "7"}, dotenv=dotenv).cache_size == 7


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("MLX_INTENT_CACHE_SIZE", "abc", "expected an integer"),
        ("MLX_INTENT_CACHE_SIZE", "-1", ">= 0"),
        ("MLX_INTENT_CACHE_SIZE", "1.5", "expected an integer"),
        ("MLX_INTENT_MODE", "foo", "score, generate"),
        ("MLX_INTENT_LATENCY_BUDGET_MS", "-5", "> 0"),
        ("MLX_INTENT_LATENCY_BUDGET_MS", "0", "> 0"),
        ("MLX_INTENT_LATENCY_BUDGET_MS", "nan", "> 0"),
        ("MLX_INTENT_LATENCY_BUDGET_MS", "", "expected a number"),
        ("MLX_INTENT_MIN_CONFIDENCE", "1.2", "between 0 and 1"),
        ("MLX_INTENT_MAX_LOADED", "0", ">= 1"),
        ("MLX_INTENT_BATCH_SIZE", "0", ">= 1"),
        ("MLX_INTENT_RETRY_AFTER_S", "inf", ">= 0"),
        ("MLX_INTENT_CHAIN", " , ", "tier names"),
        ("MLX_INTENT_CHAIN", "a,b,a", "twice"),
    ],
)
def test_bad_environment_values(variable, value, reason):
    with pytest.raises(SettingsError) as e:
        load_settings(environ={variable: value})
    message = str(e.value)
    assert variable in message and repr(value) in message and "environment" in message and reason in message


def test_bad_values_name_their_source(tmp_path):
    dotenv = write_env(tmp_path, "MLX_INTENT_MODE=fast\n")
    with pytest.raises(SettingsError, match=r"MLX_INTENT_MODE='fast' \(from \.env \("):
        load_settings(environ={}, dotenv=dotenv)
    with pytest.raises(SettingsError, match=r"--batch-size='none' \(from command line\)"):
        load_settings(cli={"batch_size": "none"}, environ={})
    with pytest.raises(SettingsError, match="expected an integer"):
        load_settings(cli={"batch_size": True}, environ={})
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings(cli={"bacth_size": 3}, environ={})


def test_cli_accepts_typed_values():
    s = load_settings(cli={"cache_size": 3, "latency_budget_ms": 100, "chain": ["a", "b"]}, environ={})
    assert (s.cache_size, s.latency_budget_ms, s.chain) == (3, 100.0, ("a", "b"))


def test_settings_are_frozen_and_hashable():
    s = load_settings(environ={})
    with pytest.raises(AttributeError):
        s.mode = "generate"  # type: ignore[misc]
    assert hash(s) == hash(Settings(home=default_home()))


def test_as_rows():
    s = load_settings(cli={"chain": "a,b", "latency_budget_ms": "250"}, environ={"LLM_MODEL": "m"})
    rows = {name: (value, source) for name, value, source in s.as_rows()}
    assert list(rows) == list(ENV_VARS)
    assert rows["chain"] == ("a,b", "command line")
    assert rows["latency_budget_ms"] == ("250", "command line")
    assert rows["model"] == ("m", "environment")
    assert rows["log"][1] == "default"


def test_dotenv_parsing_edge_cases(tmp_path):
    path = write_env(
        tmp_path,
        "\ufeff# a comment\n"
        "\n"
        "export LLM_MODEL=qwen  # trailing comment\n"
        "  SPACED  =  value with spaces  \n"
        'DOUBLE="a # not a comment\\n\\"q\\""  # comment\n'
        "SINGLE='raw \\n # kept'\n"
        "HASH=a#b\n"
        "EMPTY=\n"
        "COMMENT_ONLY= # nothing\n"
        "DUP=1\n"
        "DUP=2\r\n"
        "URL=http://host:8080/path?x=1\n",
    )
    assert read_dotenv(path) == {
        "LLM_MODEL": "qwen",
        "SPACED": "value with spaces",
        "DOUBLE": 'a # not a comment\n"q"',
        "SINGLE": "raw \\n # kept",
        "HASH": "a#b",
        "EMPTY": "",
        "COMMENT_ONLY": "",
        "DUP": "2",
        "URL": "http://host:8080/path?x=1",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("JUST_A_WORD\n", "test.env:1: expected KEY=VALUE"),
        ("# ok\nA=1\n1BAD=2\n", "test.env:3: expected KEY=VALUE"),
        ('A="open\n', "test.env:1: unterminated double quote"),
        ("A='open\n", "test.env:1: unterminated single quote"),
    ],
)
def test_dotenv_syntax_errors(tmp_path, text, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(environ={}, dotenv=write_env(tmp_path, text))


def test_config_command(tmp_path):
    runner = CliRunner(env=dict.fromkeys(ENV_VARS.values()))  # hide the developer's own variables
    result = runner.invoke(config_command, ["--mode", "generate"], env={"MLX_INTENT_BATCH_SIZE": "16"})
    assert result.exit_code == 0, result.output
    table = result.output.split("\nchain: ", 1)[0].splitlines()  # the chain in force follows the table
    lines = {line.split()[0]: line for line in table}
    assert lines["mode"].split()[2:] == ["generate", "command", "line"]
    assert lines["batch_size"].split()[1:] == ["MLX_INTENT_BATCH_SIZE", "16", "environment"]
    assert lines["cache_size"].split()[-1] == "default"
    # columns line up: every row puts the value at the same offset
    assert len({line.index(line.split()[2]) for line in table[1:]}) == 1

    bad = runner.invoke(config_command, [], env={"MLX_INTENT_CACHE_SIZE": "abc"})
    assert bad.exit_code == 2 and "MLX_INTENT_CACHE_SIZE='abc' (from environment)" in bad.output
    assert "Traceback" not in bad.output

    env_file = write_env(tmp_path, "MLX_INTENT_MODE=generate\n")
    result = runner.invoke(config_command, ["--env-file", str(env_file)])
    assert result.exit_code == 0 and f".env ({env_file})" in result.output


def test_modes_and_queue_defaults_are_defined_once():
    """The modes, the answer keys and the service's queue defaults each have one definition."""
    import importlib
    import inspect

    from mlx_intent import classifier, schema, settings
    from mlx_intent.cli.serve import serve_command
    from mlx_intent.serve import app, batcher, schemas

    assert classifier.MODES is settings.MODES
    assert schemas.Mode.__args__ == settings.MODES
    assert importlib.import_module("mlx_intent.batch_io").ANSWER_KEYS is schema.KEYS
    defaults = inspect.signature(batcher.Batcher).parameters
    assert defaults["max_batch"].default == settings.Settings().batch_size == settings.BATCH_SIZE
    assert defaults["max_wait_s"].default == settings.MAX_WAIT_MS / 1000
    assert defaults["queue_size"].default == settings.QUEUE_SIZE
    options = {p.name: p.default for p in serve_command.params}
    assert (options["max_wait_ms"], options["queue_size"]) == (settings.MAX_WAIT_MS, settings.QUEUE_SIZE)
    create = inspect.signature(app.create_app).parameters
    assert (create["max_wait_ms"].default, create["queue_size"].default) == (settings.MAX_WAIT_MS, settings.QUEUE_SIZE)
