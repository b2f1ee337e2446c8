"""A short LoRA training run on the bundled model, so the fine-tuning path stays working."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_intent import schema
from mlx_intent.models import registry
from mlx_intent.settings import settings_home
from mlx_intent.tuner.train import answers_for, build_examples, lr_schedule, train_adapter


def row(i: int, text: str, lang: str, *intents: str) -> dict:
    return {"id": str(i), "text": text, "lang": lang, "primary_intent": intents[0], "all_intents": list(intents)}


ROWS = [
    row(1, "Hello, how are you?", "en", "greeting"),
    row(2, "best kebab in Kadıköy", "en", "restaurant"),
    row(3, "Ayasofya kaç saatte açılıyor?", "tr", "attraction"),
    row(4, "Hi! where can I eat fish?", "en", "restaurant", "greeting"),
    row(5, "Когда последний паром?", "ru", "transportation"),
    row(6, "Wird es morgen regnen?", "de", "weather"),
]


def write_rows(path: Path) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    return path


def test_multi_intent_rows_are_seen_once_per_intent_primary_twice():
    answers = answers_for(ROWS[3])
    assert [a[0] for a in answers] == ["restaurant", "restaurant", "greeting"]
    assert all(a[2][0] == a[0] and sorted(a[2]) == sorted(ROWS[3]["all_intents"]) for a in answers)
    assert answers_for(ROWS[0]) == [("greeting", 1.0, ["greeting"])]


@pytest.mark.parametrize("iters", [3, 40, 273, 2000])
def test_learning_rate_warms_up_then_decays_to_a_tenth(iters):
    lr = 2e-4
    schedule = lr_schedule(lr, iters)
    values = [float(schedule(i)) for i in range(iters + 1)]
    warmup = min(50, iters // 10)
    assert max(values) == pytest.approx(lr, rel=1e-5)
    assert values[-1] == pytest.approx(lr / 10, rel=1e-3)
    if warmup:
        assert values[0] == pytest.approx(lr / warmup, rel=1e-5)
        assert values[:warmup] == sorted(values[:warmup])  # rising
    assert values[warmup:] == sorted(values[warmup:], reverse=True)  # then falling


def test_examples_end_at_the_name_and_the_loss_covers_only_the_name(bundled):
    _, tokenizer = bundled
    examples = build_examples(ROWS[:2], tokenizer, "chatml", "compact")
    assert len(examples) == 2
    for (tokens, start), row in zip(examples, ROWS[:2]):
        prompt = tokenizer.decode(tokens[:start])
        assert prompt.endswith('{"primary_intent": "') and row["text"] in prompt
        assert tokenizer.decode(tokens[start:]) == row["primary_intent"]


def test_short_training_run_writes_an_adapter_that_classify_loads(bundled, models_home, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    summary = train_adapter(
        "smollm2-135m", write_rows(tmp_path / "tiny.jsonl"), iters=2, batch_size=4, num_layers=2, rank=4, out_dir=out
    , home=settings_home())
    assert summary["iters"] == 2 and summary["examples"] == len(ROWS) + 2
    assert {p.name for p in out.iterdir()} == {"adapters.safetensors", "adapter_config.json"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["prompt_style"] == "compact" and config["num_layers"] == 2 and config["train_seconds"] > 0
    assert not list(tmp_path.glob(".*.partial"))

    from mlx_intent.classifier import IntentClassifier

    monkeypatch.setattr(registry, "adapter_dir", lambda name, home=None: out)
    clf = IntentClassifier("smollm2-135m")
    assert clf.adapter == out
    result = clf.classify("Where can I buy Turkish delight?")
    schema.parse(result["json"])
    base = IntentClassifier("smollm2-135m", use_adapter=False)
    assert base.adapter is None and len(base.prefix_ids) > len(clf.prefix_ids)  # full prompt vs compact


def test_interrupted_training_leaves_no_adapter(bundled, models_home, tmp_path, monkeypatch):
    import mlx_lm.tuner.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    out = tmp_path / "adapter"
    with pytest.raises(KeyboardInterrupt):
        train_adapter(
            "smollm2-135m",
            write_rows(tmp_path / "tiny.jsonl"),
            iters=1,
            batch_size=2,
            out_dir=out,
            home=settings_home(),
        )
    assert not out.exists() and not list(tmp_path.glob(".*.partial"))
