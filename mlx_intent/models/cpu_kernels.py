"""Attention and SwiGLU for MLX on the CPU, with a vectorisable exp.

MLX's CPU ``exp`` (and so ``softmax``, ``sigmoid``, ``silu`` and the fused SDPA) runs
about 25x slower than numpy's on x86-64: a scoring pass of SmolLM2 over 35 user tokens
against the 960-token system cache spends over half its time there.  ``fast_exp`` builds
exp from ops MLX does vectorise (2^n from the float's exponent bits, 2^f by a polynomial;
relative error under 1e-5), which makes attention about 3.5x faster.  ``install()`` puts
these into mlx-lm's llama module (every model in the registry is a Llama), on the CPU only:
Metal and CUDA keep their fused kernels.
"""

from __future__ import annotations

import os

LOG2E = 1.4426950408889634
# 2^f on [0, 1): Taylor coefficients of exp(f ln 2), enough for float32's 24 bits.
_POLY = (
    0.00015403530393381609,
    0.0013333558146428443,
    0.009618129107628477,
    0.05550410866482158,
    0.2402265069591007,
    0.6931471805599453,
    1.0,
)
_installed = False
_compiled_fns: dict = {}


def _compiled(fn):
    """``mx.compile`` fuses the elementwise chain into one loop (mlx-lm compiles swiglu the same way)."""
    if fn not in _compiled_fns:
        import mlx.core as mx

        _compiled_fns[fn] = mx.compile(fn)
    return _compiled_fns[fn]


def fast_exp(x):
    """exp(x) in float32 from vectorised ops; the gradient flows through the polynomial."""
    import mlx.core as mx

    y = mx.clip(x.astype(mx.float32) * LOG2E, -127.0, 127.0)  # 2^-127 -> 0.0 exactly
    n = mx.stop_gradient((y + 127.0).astype(mx.int32))  # floor(y) + 127 by truncation (mx.floor is slow)
    f = y - (n - 127).astype(mx.float32)
    p = _POLY[0]
    for c in _POLY[1:]:
        p = p * f + c
    return p * (n << 23).view(mx.float32)  # 2^floor(y) from the exponent bits


def softmax(scores):
    """Softmax over the last axis."""
    import mlx.core as mx

    e = fast_exp(scores - mx.stop_gradient(mx.max(scores, axis=-1, keepdims=True)))
    return e / mx.sum(e, axis=-1, keepdims=True)


def attention(queries, keys, values, cache=None, scale: float = 1.0, mask=None, sinks=None):
    """mlx-lm's ``scaled_dot_product_attention`` (grouped-query, causal, bool or additive mask)."""
    import mlx.core as mx

    if sinks is not None or hasattr(cache, "bits"):  # not used by Llama models; keep MLX's own
        from mlx_lm.models.base import scaled_dot_product_attention

        return scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)
    b, heads, length, dim = queries.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    q = (queries * scale).reshape(b, kv_heads, group, length, dim)
    scores = q.astype(mx.float32) @ keys[:, :, None].swapaxes(-1, -2).astype(mx.float32)
    if isinstance(mask, str):  # "causal": query i sits at position total - length + i
        mask = mx.arange(total - length, total)[:, None] >= mx.arange(total)[None]
    if mask is not None:
        if mask.dtype == mx.bool_:  # additive, on the small mask: mx.where is slow on the CPU
            mask = mx.where(mask, 0.0, -1e9)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # as MLX broadcasts it
        per_head = mask.shape[1] == heads
        mask = mask.reshape(mask.shape[0], kv_heads if per_head else 1, group if per_head else 1, *mask.shape[2:])
        scores = scores + mask
    out = _compiled(softmax)(scores).astype(values.dtype) @ values[:, :, None]
    return out.reshape(b, heads, length, dim)


def swiglu(gate, x):
    """silu(gate) * x, with the sigmoid from ``fast_exp``."""
    return _compiled(_swiglu)(gate, x)


def _swiglu(gate, x):
    return (gate / (1 + fast_exp(-gate))).astype(x.dtype) * x


def install() -> bool:
    """Use these kernels in mlx-lm's Llama on the CPU; True when they are in place.

    ``MLX_INTENT_FAST_EXP=0`` keeps MLX's own (the benchmarks compare the two)."""
    global _installed
    import mlx.core as mx

    if os.environ.get("MLX_INTENT_FAST_EXP") == "0" or mx.default_device() != mx.cpu:
        return False
    if not _installed:
        from mlx_lm.models import llama

        llama.scaled_dot_product_attention = attention
        llama.swiglu = swiglu
        _installed = True
    return True
