"""Llama 3.2 3B and TinyLlama as a new user runs them, on stand-ins (tests/standins.py: tiny random weights, each
model's real architecture fields, tokenizer and chat template) pulled through the fake hub: pull, list, classify
in both modes and from a file, the prompt cache, train, calibrate and serve."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from click.testing import CliRunner
from conftest import PULLED
from standins import TEXTS

from mlx_intent import schema
from mlx_intent.classifier import IntentClassifier
from mlx_intent.cli.main import main
from mlx_intent.models import backend, registry
from mlx_intent.models import cache as kv
from mlx_intent.prompts import PROMPT_STYLES
from mlx_intent.settings import ENV_VARS

# The LLM answers whatever its confidence (random weights are unsure), with no time limit.
LLM_ONLY = ["--min-confidence", "0", "--keyword-floor", "off", "--latency-budget-ms", "600000", "--cache-size", "0"]
ROWS = [
    {"text": "Hello, how are you?", "primary_intent": "greeting", "all_intents": ["greeting"]},
    {"text": "best kebab in Kadıköy", "primary_intent": "restaurant", "all_intents": ["restaurant"]},
    {"text": "Ayasofya kaç saatte açılıyor?", "primary_intent": "attraction", "all_intents": ["attraction"]},
    {"text": "Hi! where can I eat fish?", "primary_intent": "restaurant", "all_intents": ["restaurant", "greeting"]},
    {"text": "Когда последний паром?", "primary_intent": "transportation", "all_intents": ["transportation"]},
    {"text": "Wird es morgen regnen?", "primary_intent": "weather", "all_intents": ["weather"]},
]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No stray settings (no .env, no MLX_INTENT_* or LLM_* variables)."""
    for variable in ENV_VARS.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)


def cli(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---- the whole path of a new user --------------------------------------------------------------------------------


def test_models_list_shows_the_pulled_models(standin_home, clean_env, monkeypatch):
    monkeypatch.setattr(backend, "available_memory", lambda: 16 * registry.GB)
    out = cli("models", "list", "--home", str(standin_home))
    table = out.split("\nmodels folder:")[0]  # the table; each LLM's place follows it
    rows = {line.lstrip("* ").split()[0]: line for line in table.splitlines() if line.strip()}
    for name in PULLED:
        state = rows[name].lstrip("* ").split()[1]
        assert state in ("converted", "ready") and "measured: weights" in rows[name], out
    assert rows["llama-3.2-3b"].startswith("*")  # the best model on disk that fits


@pytest.mark.parametrize("name", PULLED)
@pytest.mark.parametrize("mode", ["score", "generate"])
def test_classify_a_text_in_both_modes(name, mode, standin_home, clean_env):
    out = cli("classify", "-v", "--home", str(standin_home), "--chain", name, "--mode", mode, *LLM_ONLY, TEXTS[1])
    result = json.loads(out)
    assert result["tier"] == name and result["model"] == name
    schema.validate({k: result[k] for k in schema.KEYS})


@pytest.mark.parametrize("name", PULLED)
def test_classify_a_file(name, standin_home, clean_env, tmp_path):
    data = write_rows(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    cli("classify", "--home", str(standin_home), "--chain", name, *LLM_ONLY, "--input", data, "--output", "out.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == list(range(len(TEXTS)))
    assert {r["tier"] for r in rows} == {name}
    for r in rows:
        schema.validate({k: r[k] for k in schema.KEYS})


@pytest.mark.parametrize("name", PULLED)
def test_the_prompt_cache_is_saved_and_reused(name, standin_home, monkeypatch):
    first = IntentClassifier(name, home=standin_home, use_adapter=False)
    assert first._cache_path.is_file()

    def no_prefill(*args, **kwargs):
        raise AssertionError("the system prompt was computed again")

    monkeypatch.setattr(kv, "prefill", no_prefill)
    again = IntentClassifier(name, home=standin_home, use_adapter=False)
    assert again._from_disk and again._cache_path == first._cache_path
    for p, q in zip(first.distributions(TEXTS[:3]), again.distributions(TEXTS[:3])):
        assert p == pytest.approx(q, abs=1e-6)


@pytest.mark.parametrize("name", PULLED)
def test_train_calibrate_and_classify_with_the_adapter(name, standin_home, clean_env, tmp_path):
    """QLoRA on the 4-bit weights where MLX runs on Metal, LoRA on float32 here; then the adapter's calibration;
    classify then uses both, with the adapter's compact prompt."""
    home = tmp_path / "models"
    shutil.copytree(standin_home, home, symlinks=True)  # the pulled hub cache, links and all
    data = write_rows(tmp_path / "rows.jsonl", [{**r, "id": str(i), "lang": "en"} for i, r in enumerate(ROWS)])
    out = cli("train", name, "--home", str(home), "--data", data, "--iters", "2", "--batch-size", "4")
    assert str(registry.adapter_dir(name, home)) in out
    cli("calibrate", name, "--home", str(home), "--data", data, "--batch-size", "4", "--force")  # 6 rows < 50
    fit = json.loads((registry.adapter_dir(name, home) / "calibration.json").read_text())
    clf = IntentClassifier(name, home=home)
    assert clf.adapter == registry.adapter_dir(name, home) and clf.temperature == fit["temperature"]
    prompt = clf.tokenizer.decode(clf.prefix_ids)
    assert PROMPT_STYLES["compact"]() in prompt and PROMPT_STYLES["full"]() not in prompt  # the adapter's prompt
    result = json.loads(cli("classify", "-v", "--home", str(home), "--chain", name, *LLM_ONLY, TEXTS[2]))
    assert result["tier"] == name


def test_serve_answers_with_the_pulled_model(standin_home):
    from fastapi.testclient import TestClient

    from mlx_intent.chain import build_chain
    from mlx_intent.serve.app import create_app
    from mlx_intent.settings import load_settings

    settings = load_settings(
        {"home": str(standin_home), "chain": "llama-3.2-3b,keyword", "min_confidence": "0", "keyword_floor": "off"},
        environ={},
    )
    with TestClient(create_app(settings, build_chain(settings)), base_url="http://127.0.0.1") as client:
        for _ in range(600):  # the warm-up loads the model in the background; until then lower tiers answer
            if client.get("/healthz").json()["status"] != "warming":
                break
            time.sleep(0.1)
        answer = client.post("/v1/classify", json={"text": TEXTS[1]}).json()
        assert answer["tier"] == "llama-3.2-3b", answer
        batch = client.post("/v1/classify/batch", json={"texts": TEXTS[:3]}).json()
    assert [r["tier"] for r in batch["results"]] == ["llama-3.2-3b"] * 3
