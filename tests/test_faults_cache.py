"""Faults of the saved system-prompt cache (issue 17): a poisoned cache is never kept.

A cache computed while the weights were damaged (NaN) was saved and reused after the weights were restored; a
file with a valid header but damaged data failed every query; a cache that could not be written lost the model
tier (MLX raises RuntimeError, only OSError was caught).  The cache is now keyed on the weights' files, checked
finite before it is saved and when it is read, and rebuilt once when a run fails with a cache read from disk.
Runs on TinyLlama's stand-in (tests/standins.py): tiny, so every rebuild takes milliseconds.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_intent.classifier import IntentClassifier
from mlx_intent.models import cache as kv
from mlx_intent.models import registry

NAME = "tinyllama"
TEXTS = ["Where can I eat fish near Galata?", "Yarın hava nasıl?"]


@pytest.fixture
def home(standin_repos, tmp_path):
    """A models folder holding TinyLlama's stand-in as a converted MLX folder."""
    shutil.copytree(standin_repos[NAME], tmp_path / NAME)
    return tmp_path


def weights_file(home):
    return registry.model_dir(NAME, home) / "model.safetensors"


def rewrite_weights(home, change) -> None:
    """Rewrite the model's weights with ``change(weights)`` applied (a new file, as a restore or a damage is)."""
    path = weights_file(home)
    weights = dict(mx.load(str(path)))
    change(weights)
    path.unlink()
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def poison(weights: dict) -> None:
    norm = "model.layers.0.input_layernorm.weight"
    weights[norm] = mx.full(weights[norm].shape, float("nan"), weights[norm].dtype)


def caches(home) -> list:
    return sorted(registry.model_dir(NAME, home).glob("prompt_cache_*.safetensors"))


def fresh(home) -> list[dict]:
    """The distributions with the system prompt computed now, never read from a file."""
    clf = IntentClassifier(NAME, home=home, use_adapter=False, cache_dir=home / "elsewhere")
    return clf.distributions(TEXTS)


def same(got: list[dict], expected: list[dict]) -> bool:
    return len(got) == len(expected) == len(TEXTS) and all(
        g == pytest.approx(e, abs=1e-6) for g, e in zip(got, expected)
    )


def test_a_nan_cache_is_never_saved_and_restored_weights_answer(home, tmp_path):
    original = tmp_path / "original.safetensors"
    shutil.copy(weights_file(home), original)
    rewrite_weights(home, poison)
    with pytest.raises(kv.NotFiniteError):
        IntentClassifier(NAME, home=home, use_adapter=False)
    assert caches(home) == []  # nothing saved from damaged weights
    weights_file(home).unlink()
    shutil.copy(original, weights_file(home))  # restored
    clf = IntentClassifier(NAME, home=home, use_adapter=False)
    got = clf.distributions(TEXTS)
    assert all(np.isfinite(list(d.values())).all() and sum(d.values()) == pytest.approx(1.0) for d in got)
    assert same(got, fresh(home))


def test_the_cache_follows_the_weights(home):
    """Other weights under the same name and prompt (replaced, restored from a backup) get their own cache."""
    first = IntentClassifier(NAME, home=home, use_adapter=False)
    assert len(caches(home)) == 1

    def other(weights: dict) -> None:
        norm = "model.norm.weight"
        weights[norm] = weights[norm] * 3.0
        first_norm = "model.layers.0.input_layernorm.weight"
        weights[first_norm] = weights[first_norm] * 0.5

    rewrite_weights(home, other)
    again = IntentClassifier(NAME, home=home, use_adapter=False)
    assert not again._from_disk and again._cache_path != first._cache_path
    assert same(again.distributions(TEXTS), fresh(home))
    assert not same(again.distributions(TEXTS), first.distributions(TEXTS))  # the weights did change the answer


def damage_data(path) -> None:
    """Overwrite everything after the safetensors header: the header still reads, the values are garbage."""
    import struct

    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start:] = b"\xff" * (len(raw) - start)  # NaN in every float format
    path.write_bytes(bytes(raw))


def test_a_cache_with_damaged_data_but_a_valid_header_is_rebuilt(home):
    expected = IntentClassifier(NAME, home=home, use_adapter=False).distributions(TEXTS)
    [path] = caches(home)
    damage_data(path)
    mx.load(str(path))  # MLX reads it without complaint
    clf = IntentClassifier(NAME, home=home, use_adapter=False)
    assert not clf._from_disk
    assert same(clf.distributions(TEXTS), expected)
    assert caches(home) == [path] and kv.is_finite(kv.load(path, len(clf.model.layers), len(clf.prefix_ids)))


def test_a_foreign_cache_under_the_name_is_rebuilt(home):
    """A sound file of another shape (another prompt's cache) where this prompt's should be."""
    clf = IntentClassifier(NAME, home=home, use_adapter=False)
    expected = clf.distributions(TEXTS)
    [path] = caches(home)
    kv.save(path, [(k[..., :5, :], v[..., :5, :]) for k, v in clf._system])
    again = IntentClassifier(NAME, home=home, use_adapter=False)
    assert not again._from_disk and same(again.distributions(TEXTS), expected)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_a_run_that_fails_with_a_cache_from_disk_rebuilds_it_once(home, monkeypatch, mode):
    expected = IntentClassifier(NAME, home=home, use_adapter=False).classify_batch(TEXTS[:1], mode=mode)[0]
    clf = IntentClassifier(NAME, home=home, use_adapter=False)
    assert clf._from_disk
    prefills, runs = [], []
    real_prefill, real_forward = kv.prefill, kv.forward

    def counted_prefill(*args, **kwargs):
        prefills.append(1)
        return real_prefill(*args, **kwargs)

    def fails_once(*args, **kwargs):
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("[matmul] shapes do not match")  # what a cache that loads but does not fit gives
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(kv, "prefill", counted_prefill)
    monkeypatch.setattr(kv, "forward", fails_once)
    got = clf.classify_batch(TEXTS[:1], mode=mode)[0]
    assert len(prefills) == 1 and not clf._from_disk
    assert got["primary_intent"] == expected["primary_intent"] and got["json"] == expected["json"]


def test_a_run_that_keeps_failing_raises_after_one_rebuild(home, monkeypatch):
    IntentClassifier(NAME, home=home, use_adapter=False)
    clf = IntentClassifier(NAME, home=home, use_adapter=False)
    prefills = []
    real_prefill = kv.prefill

    def counted_prefill(*args, **kwargs):
        prefills.append(1)
        return real_prefill(*args, **kwargs)

    def always_fails(*args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr(kv, "prefill", counted_prefill)
    monkeypatch.setattr(kv, "forward", always_fails)
    with pytest.raises(RuntimeError, match="broken"):
        clf.distributions(TEXTS)
    with pytest.raises(RuntimeError, match="broken"):  # the rebuilt cache is not rebuilt again
        clf.distributions(TEXTS)
    assert len(prefills) == 1


def test_a_cache_that_cannot_be_written_keeps_the_model(home):
    """MLX raises RuntimeError ("[save_safetensors] Failed to open file") where a folder cannot take the file."""
    nowhere = home / "no" / "such" / "folder"
    clf = IntentClassifier(NAME, home=home, use_adapter=False, cache_dir=nowhere)
    assert not nowhere.exists()
    assert same(clf.distributions(TEXTS), fresh(home))
