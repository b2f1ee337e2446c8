"""``mlx-intent train`` never replaces an adapter (or the shipped e5-small head) and its calibration without
--force, and checks before any training; with --force the old one is kept as <name>.previous/.  The trainers
are replaced by fakes, so nothing trains here."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import mlx_intent.encoder as encoder
import mlx_intent.tuner.encoder as tuner_encoder
import mlx_intent.tuner.train as tuner_train
from mlx_intent.cli.main import main
from mlx_intent.tuner import install


def _fill(folder, files):
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def _read(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


@pytest.fixture
def trainers(monkeypatch):
    calls = []

    def fake_adapter(name, *args, **kwargs):
        calls.append(name)
        return {"examples": 1, "iters": 1, "train_seconds": 0.0}

    def fake_encoder(*args, **kwargs):
        calls.append("e5-small")
        return {"out_dir": "x", "rows": 1, "epochs": 1, "train_seconds": 0.0}

    monkeypatch.setattr(tuner_train, "train_adapter", fake_adapter)
    monkeypatch.setattr(tuner_encoder, "train_encoder", fake_encoder)
    return calls


ADAPTER = {"adapters.safetensors": "old lora", "adapter_config.json": "{}", "calibration.json": '{"T": 1.3}'}


def test_an_existing_adapter_is_refused_without_force_before_training(tmp_path, trainers):
    old = tmp_path / "adapters" / "smollm2-135m"
    _fill(old, ADAPTER)
    result = CliRunner().invoke(main, ["train", "smollm2-135m", "--home", str(tmp_path)])
    assert result.exit_code == 1 and "use --force" in result.output
    assert trainers == []  # refused before any training
    assert _read(old) == ADAPTER and sorted(p.name for p in old.parent.iterdir()) == ["smollm2-135m"]
    forced = CliRunner().invoke(main, ["train", "smollm2-135m", "--home", str(tmp_path), "--force"])
    assert forced.exit_code == 0, forced.output
    assert trainers == ["smollm2-135m"]


def test_the_shipped_e5_head_is_refused_without_force(tmp_path, monkeypatch, trainers):
    head = tmp_path / "weights" / "e5-small"
    _fill(head, {"head.json": '{"calibration": 1}', "head.safetensors": "w"})
    monkeypatch.setattr(encoder, "HEAD_DIR", head)
    result = CliRunner().invoke(main, ["train", "e5-small", "--home", str(tmp_path)])
    assert result.exit_code == 1 and "use --force" in result.output and str(head) in result.output
    assert trainers == [] and _read(head) == {"head.json": '{"calibration": 1}', "head.safetensors": "w"}


def test_a_new_adapter_needs_no_force(tmp_path, trainers):
    result = CliRunner().invoke(main, ["train", "smollm2-135m", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert trainers == ["smollm2-135m"]


def test_an_unknown_model_still_exits_3(tmp_path, trainers):
    result = CliRunner().invoke(main, ["train", "nope", "--home", str(tmp_path)])
    assert result.exit_code == 3 and trainers == []


def test_install_keeps_the_replaced_adapter_and_its_calibration_as_previous(tmp_path):
    out = tmp_path / "adapters" / "m"
    _fill(out, ADAPTER)
    _fill(tmp_path / "adapters" / ".m.1.partial", {"adapters.safetensors": "new lora"})
    install(tmp_path / "adapters" / ".m.1.partial", out)
    assert _read(out) == {"adapters.safetensors": "new lora"}
    assert _read(tmp_path / "adapters" / "m.previous") == ADAPTER
    _fill(tmp_path / "adapters" / ".m.2.partial", {"adapters.safetensors": "newest"})
    install(tmp_path / "adapters" / ".m.2.partial", out)
    assert _read(out) == {"adapters.safetensors": "newest"}
    assert _read(tmp_path / "adapters" / "m.previous") == {"adapters.safetensors": "new lora"}
    assert _read(tmp_path / "adapters" / "m.original") == ADAPTER  # the first one replaced is never lost
    assert sorted(p.name for p in out.parent.iterdir()) == ["m", "m.original", "m.previous"]
