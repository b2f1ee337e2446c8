"""The CPU attention and SwiGLU against MLX's own kernels, for any shape, mask and input."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models import llama

from mlx_intent.models import cpu_kernels

floats = st.floats(min_value=-200.0, max_value=200.0, allow_nan=False, width=32)


@given(st.lists(floats, min_size=1, max_size=64))
def test_fast_exp_matches_exp(values):
    x = np.array(values, dtype=np.float32)
    got = np.array(cpu_kernels.fast_exp(mx.array(x)))
    want = np.exp(x.astype(np.float64))
    normal = (want > 1e-37) & (want < 1e38)  # float32's normal range; outside it, 0 or clipped
    assert np.allclose(got[normal], want[normal], rtol=2e-5, atol=0)
    assert np.all(got[want <= 1e-38] < 1.2e-38)
    assert np.all(np.isfinite(got))


def test_fast_exp_gradient_is_exp():
    x = mx.array([-5.0, -0.3, 0.0, 0.7, 4.0])
    grad = mx.grad(lambda v: cpu_kernels.fast_exp(v).sum())(x)
    assert np.allclose(np.array(grad), np.exp(np.array(x)), rtol=1e-3)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    length=st.integers(1, 6),
    cached=st.integers(0, 9),
    mask_kind=st.sampled_from(["none", "causal", "bool", "additive", "per-head", "2d"]),
    seed=st.integers(0, 2**16),
)
def test_attention_matches_mlx(batch, kv_heads, group, length, cached, mask_kind, seed):
    """Grouped-query attention with every mask form mlx-lm passes, as mx.fast.scaled_dot_product_attention."""
    mx.random.seed(seed)
    heads, total, dim = kv_heads * group, length + cached, 16
    q = mx.random.normal((batch, heads, length, dim))
    k = mx.random.normal((batch, kv_heads, total, dim))
    v = mx.random.normal((batch, kv_heads, total, dim))
    if mask_kind == "none":
        mask = None
    elif mask_kind == "causal":
        mask = "causal"
    elif mask_kind == "bool":
        mask = mx.random.uniform(shape=(batch, 1, length, total)) > 0.4
        mask = mx.concatenate([mx.ones((batch, 1, length, 1), dtype=mx.bool_), mask[..., 1:]], axis=-1)
    elif mask_kind == "additive":
        mask = mx.random.normal((batch, 1, length, total))
    elif mask_kind == "per-head":
        mask = mx.random.normal((batch, heads, length, total))
    else:
        mask = mx.random.normal((length, total))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    got = cpu_kernels.attention(q, k, v, None, 0.3, mask)
    assert got.shape == want.shape
    assert np.allclose(np.array(got), np.array(want), atol=1e-4)


def test_swiglu_matches_silu():
    gate = mx.random.normal((7, 33)) * 6
    x = mx.random.normal((7, 33))
    want = gate * mx.sigmoid(gate) * x
    assert np.allclose(np.array(cpu_kernels.swiglu(gate, x)), np.array(want), atol=1e-5)


def test_install_only_on_the_cpu(monkeypatch, bundled):
    """Loading on the CPU (the bundled fixture did) put them into mlx-lm's Llama; the switch keeps MLX's."""
    assert mx.default_device() == mx.cpu
    assert llama.scaled_dot_product_attention is cpu_kernels.attention
    assert llama.swiglu is cpu_kernels.swiglu
    monkeypatch.setenv("MLX_INTENT_FAST_EXP", "0")
    assert cpu_kernels.install() is False


def test_model_logits_match_mlx_kernels(bundled, monkeypatch):
    """The whole bundled model gives the same next-token probabilities with MLX's own kernels
    (30 layers of float32 rounding in another order move logits of magnitude ~30 by ~2e-3)."""
    model, _ = bundled
    text_ids = list(range(1000, 1040))
    ours = np.array(model(mx.array([text_ids])))
    from mlx_lm.models import activations, base

    monkeypatch.setattr(llama, "scaled_dot_product_attention", base.scaled_dot_product_attention)
    monkeypatch.setattr(llama, "swiglu", activations.swiglu)
    theirs = np.array(model(mx.array([text_ids])))
    assert np.allclose(ours, theirs, atol=1e-2)

    def probs(logits):
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    assert np.abs(probs(ours) - probs(theirs)).max() < 1e-4
