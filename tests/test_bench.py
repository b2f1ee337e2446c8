"""`mlx-intent bench`: its JSON and Markdown on the bundled model in a tiny setting, skipped and unknown models.

Runs use the session's ``bundled`` SmolLM2 (no adapter) instead of loading it again, a 16-token prompt, 4
generated tokens and 2 queries, so each takes seconds.  Figures are checked for being there, positive and
finite, never for their size: timings depend on the machine.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_intent.cli.main import main
from mlx_intent.errors import EXIT_INPUT, EXIT_MODEL
from mlx_intent.evaluation import bench
from mlx_intent.models import loading, registry
from mlx_intent.settings import ENV_VARS, settings_home

TINY = ["--repeats", "1", "--queries", "2", "--prompt-tokens", "16", "--generation-tokens", "4"]
LLM_FIGURES = (
    "load_s",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "scoring_p50_ms",
    "scoring_p95_ms",
    "scoring_p99_ms",
    "generation_p50_ms",
    "batch8_queries_per_s",
    "peak_memory_mb",
    "peak_rss_mb",
    "valid_json",
    "naive_p50_ms",
)
DEVICE_KEYS = ("backend", "chip", "memory_gb", "recommended_working_set_gb", "os", "mlx", "mlx_lm", "python")


def _clean(mp: pytest.MonkeyPatch, bundled, folder) -> None:
    """No stray settings (.env, MLX_INTENT_* but the models folder), and the session's SmolLM2 as the load."""
    for variable in ENV_VARS.values():
        if variable != "MLX_INTENT_HOME":
            mp.delenv(variable, raising=False)
    mp.chdir(folder)

    def load(name, adapter=None, dequantize=None, home=None):
        assert name == registry.BUNDLED and adapter is None
        return bundled

    mp.setattr(loading, "load", load)


@pytest.fixture
def llm(monkeypatch, bundled, tmp_path):
    _clean(monkeypatch, bundled, tmp_path)


@pytest.fixture(scope="module")
def json_run(bundled, tmp_path_factory):
    """One JSON run of the bundled model beside a registry model that is not downloaded here."""
    eos = set(bundled[1].eos_token_ids)
    with pytest.MonkeyPatch.context() as mp:
        _clean(mp, bundled, tmp_path_factory.mktemp("bench"))
        args = ["bench", "--model", registry.BUNDLED, "--model", registry.PRIMARY, "--json", *TINY]
        result = CliRunner().invoke(main, [*args, "--naive-queries", "1"])
    return result, eos


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_json_has_every_figure_of_the_bundled_model(json_run):
    result, _ = json_run
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    figures = out["models"][registry.BUNDLED]
    assert [name for name in LLM_FIGURES if not _positive(figures[name])] == []
    assert 0 < figures["valid_json"] <= 1 and 0 <= figures["naive_valid_json"] <= 1
    assert figures["scoring_p50_ms"] <= figures["scoring_p95_ms"] <= figures["scoring_p99_ms"]
    assert figures["kind"] == "llm" and figures["naive_queries"] == 1
    assert set(DEVICE_KEYS) <= set(out["device"]) and out["device"]["backend"] in ("cpu", "metal", "cuda")
    assert out["settings"]["queries"] == 2 and out["settings"]["prompt_tokens"] == 16


def test_a_model_not_downloaded_is_skipped_with_the_reason(json_run):
    result, _ = json_run
    out = json.loads(result.stdout)
    assert registry.PRIMARY not in out["models"]
    assert f"models pull {registry.PRIMARY}" in out["skipped"][registry.PRIMARY]


def test_the_shared_tokenizer_gets_its_end_of_sequence_ids_back(json_run, bundled):
    """The prefill/decode run empties them (no early stop, as mlx_lm.benchmark); classify needs them after."""
    _, eos = json_run
    assert eos and set(bundled[1].eos_token_ids) == eos


def test_markdown_shows_the_command_and_the_table(llm):
    result = CliRunner().invoke(main, ["bench", "--model", registry.BUNDLED, *TINY, "--naive-queries", "0"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"Command: `mlx-intent bench --model {registry.BUNDLED} --repeats 1 --queries 2 --naive-queries 0" in text
    lines = text.splitlines()
    header = lines.index(f"| | `{registry.BUNDLED}` |")
    assert lines[header + 1] == "|---|---:|"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[header + 2 :] if line.startswith("|")}
    for label in ("prefill tokens/s", "decode tokens/s", "scoring p50 ms", "scoring p99 ms", "valid JSON"):
        assert rows[label].endswith(" |") and "–" not in rows[label], label
    assert rows["naive: free generation p50 ms"] == "| naive: free generation p50 ms | – |"  # none run


def test_the_encoder_tier_has_latency_but_no_prefill_or_decode(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["bench", "--model", "e5-small", "--json", *TINY])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)["models"]["e5-small"]
    assert figures["kind"] == "encoder"
    for name in ("load_s", "scoring_p50_ms", "scoring_p99_ms", "batch8_queries_per_s", "peak_memory_mb"):
        assert _positive(figures[name]), name
    assert figures["valid_json"] == 1.0
    assert figures["prefill_tokens_per_s"] is figures["decode_tokens_per_s"] is figures["generation_p50_ms"] is None


def test_steps_counts_every_step_of_an_llm(llm, monkeypatch):
    """The progress bar's total is the number of steps the run takes (the naive baseline stubbed: its count
    matters here, not its 60 tokens)."""
    monkeypatch.setattr(bench, "naive_answer", lambda clf, text: "{}")
    config = bench.BenchConfig(repeats=2, queries=2, prompt_tokens=8, generation_tokens=2, naive_queries=2)
    phases = []
    figures = bench.bench_llm(registry.BUNDLED, _texts(config), config, settings_home(), phases.append)
    assert len(phases) == bench.steps(registry.BUNDLED, config)
    assert phases.count("naive generation") == figures["naive_queries"] == 2 and figures["naive_valid_json"] == 0


def test_steps_counts_every_step_of_the_encoder():
    config = bench.BenchConfig(repeats=2, queries=9)
    phases = []
    bench.bench_encoder(_texts(config), config, True, phases.append, home=settings_home())
    assert len(phases) == bench.steps(bench.ENCODER, config)
    assert phases.count("batch of 8") == 2  # 9 queries: batches of 8 and 1, once


def _texts(config: bench.BenchConfig) -> list[str]:
    return [r["text"] for r in bench.read_queries(limit=config.queries)]


def test_only_missing_models_print_the_report_and_exit_3(llm):
    result = CliRunner().invoke(main, ["bench", "--model", registry.PRIMARY, "--json"])
    assert result.exit_code == EXIT_MODEL
    out = json.loads(result.stdout)
    assert out["models"] == {} and registry.PRIMARY in out["skipped"]
    assert "no model was benchmarked" in result.stderr


def test_by_default_every_registry_llm_present_runs_and_the_others_are_skipped(llm):
    """Issue 24, part 6: by default the e5-small tier and the chain run too (it benchmarked only SmolLM2, not the
    tier that answers)."""
    run, skipped = bench.select_models((), home=settings_home())
    assert run == [registry.BUNDLED, bench.ENCODER, bench.CHAIN]  # the only LLM in the session's models folder
    assert set(skipped) == set(registry.REGISTRY) - {registry.BUNDLED}
    assert all("not downloaded" in why or "does not fit" in why for why in skipped.values())


def test_the_chain_column_is_each_querys_latency_through_the_default_chain(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["bench", "--model", "chain", "--json", *TINY])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)["models"]["chain"]
    assert figures["kind"] == "chain" and figures["weights"].startswith("e5-small → ")
    assert figures["weights"].endswith("keyword → general")
    for name in ("load_s", "scoring_p50_ms", "scoring_p99_ms", "batch8_queries_per_s"):
        assert _positive(figures[name]), name
    assert figures["answered_by"] == "e5-small 100%" and figures["valid_json"] == 1.0
    markdown = CliRunner().invoke(main, ["bench", "--model", "chain", *TINY]).stdout
    assert "| answered by (chain) | e5-small 100% |" in markdown


@settings(max_examples=25, deadline=None)
@given(st.text(min_size=1, max_size=30).filter(lambda s: s not in (*registry.REGISTRY, bench.ENCODER, bench.CHAIN)))
def test_an_unknown_model_is_exit_3_in_words(name):
    result = CliRunner().invoke(main, ["bench", f"--model={name}"])
    assert result.exit_code == EXIT_MODEL, result.output
    assert "unknown model" in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""  # nothing measured, nothing printed


@pytest.mark.parametrize("option", ["--repeats=0", "--queries=0", "--prompt-tokens=0", "--naive-queries=-1"])
def test_out_of_range_numbers_are_usage_errors(option):
    result = CliRunner().invoke(main, ["bench", option])
    assert result.exit_code == EXIT_INPUT and "Traceback" not in result.output
