"""What the LLM tiers do for Metal (issue 24, part 4), checked on the CPU: a Mac is faked where it must be
(``mx.metal.is_available``, ``mx.device_info``, ``mx.set_wired_limit``); what each change saves on Metal is in
benchmarks/reports/metal.md."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_intent.classifier import IntentClassifier
from mlx_intent.models import backend, loading, registry
from mlx_intent.settings import settings_home

WORKING_SET = 5_726_623_744  # an 8 GB Mac's recommended working set


def fake_mac(monkeypatch) -> list[int]:
    """Metal there, the default device the CPU (as after ``mx.set_default_device(mx.cpu)``); the wired limits set."""
    wired: list[int] = []

    def info(device=None):
        return {"max_recommended_working_set_size": WORKING_SET} if device == mx.gpu else {"device_name": "cpu"}

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", info)
    monkeypatch.setattr(mx, "set_wired_limit", lambda limit: wired.append(limit) or 0)
    return wired


def test_device_info_comes_from_the_gpu_even_when_the_default_device_is_the_cpu(monkeypatch):
    """available_memory raised KeyError there: it read the working set from the default device."""
    fake_mac(monkeypatch)
    assert backend.available_memory() == WORKING_SET
    assert backend.device_info()["max_recommended_working_set_size"] == WORKING_SET


def test_loading_an_llm_wires_the_recommended_working_set(monkeypatch, bundled):
    """As mlx-lm's server does at start: the weights stay resident between queries."""
    import mlx_lm

    wired = fake_mac(monkeypatch)
    monkeypatch.setattr(mlx_lm, "load", lambda path, adapter_path=None: (nn.Linear(2, 2), "tokenizer"))
    monkeypatch.setattr(loading, "write_stamp", lambda *args, **kwargs: None)
    loading.load(registry.BUNDLED, dequantize=False, home=settings_home())
    assert wired == [WORKING_SET]


def test_no_wired_limit_without_a_working_set():
    assert backend.wire_working_set() is None  # this CPU reports none


class Tiny(nn.Module):
    def __init__(self, vocab: int = 1024, hidden: int = 64) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, hidden)


def test_scoring_reads_only_the_vocabulary_rows_it_needs(monkeypatch):
    """A 4-bit head (Metal keeps it 4-bit): the logits of the few first tokens of the names, from their packed rows;
    the whole vocabulary's logits (128k rows for Llama 3) are never computed."""
    model = Tiny()
    nn.quantize(model, group_size=64, bits=4)
    h = mx.random.normal((3, 64), key=mx.random.key(1))
    tokens = [5, 17, 900, 3]
    full = np.array(model.model.embed_tokens.as_linear(h))[:, tokens]
    monkeypatch.setattr(nn.QuantizedEmbedding, "as_linear", lambda self, x: pytest.fail("the whole vocabulary"))
    got = IntentClassifier._logits(SimpleNamespace(model=model), h, tokens)
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4)


def test_scoring_keeps_mlx_buffers_between_batches(monkeypatch, bundled):
    """mx.clear_cache() after every batch made Metal allocate every buffer again on the next query."""
    model, tokenizer = bundled
    clf = IntentClassifier(registry.BUNDLED, model=model, tokenizer=tokenizer, use_adapter=False)
    clf.classify_batch(["warm"])
    cleared = []
    monkeypatch.setattr(mx, "clear_cache", lambda: cleared.append(1))
    clf.classify_batch(["Where can I eat fish?", "Is the museum open on Monday?"])
    assert cleared == []
