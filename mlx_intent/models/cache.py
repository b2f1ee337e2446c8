"""mlx-lm's KV caches, through their public API only, and the saved system-prompt cache.

The classifier computes the system prompt's keys and values once (``prefill``), copies them into a
batch cache for every pass (``batch``), runs right-padded rows (``forward``) and forks rows of a batch
cache (``fork``).  mlx-lm's cache classes change between releases: ``BatchKVCache.state`` has five fields
in 0.32.2 and four on its main branch, and ``_idx`` is private.  This is the one module that touches them,
and only through what both have: ``make_prompt_cache``, ``update_and_fetch``, ``size``, the first two
fields of ``state`` (keys, values), ``left_padding``, ``prepare`` and ``finalize``.  The saved file is
this module's own (plain safetensors of each layer's keys and values), so it does not follow mlx-lm's
prompt-cache format either.
"""

from __future__ import annotations

import os
from pathlib import Path

SystemKV = list  # per layer: (keys, values), each of shape (1, kv heads, tokens, head dim)


class NotFiniteError(RuntimeError):
    """Keys or values that are NaN or infinite: damaged weights (or a damaged file) gave them."""


def _contents(c) -> tuple:
    """The keys and values a cache holds, without the spare room of its buffer."""
    keys, values = c.state[:2]
    n = c.size()
    return keys[..., :n, :], values[..., :n, :]


def prefill(model, ids: list[int]) -> SystemKV:
    """Keys and values of ``ids`` at every layer, evaluated."""
    import mlx.core as mx
    from mlx_lm.models import cache as mlx_cache

    cache = mlx_cache.make_prompt_cache(model)
    model(mx.array([ids]), cache=cache)
    system = [_contents(c) for c in cache]
    mx.eval(system)
    return system


def is_finite(system: SystemKV) -> bool:
    import mlx.core as mx

    return bool(mx.stack([mx.isfinite(a).all() for layer in system for a in layer]).all().item())


def batch(system: SystemKV, rows: int) -> list:
    """A batch cache of ``rows`` rows, each holding the system prompt."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    caches = []
    for keys, values in system:
        c = BatchKVCache([0] * rows)
        c.update_and_fetch(mx.repeat(keys, rows, axis=0), mx.repeat(values, rows, axis=0))
        caches.append(c)
    return caches


def forward(body, x, cache: list, right_padding: list[int]):
    """``body(x, cache=cache)`` over right-padded rows; the cache then continues each row after its last real
    token (mlx-lm rolls the padding to the left)."""
    padded = max(right_padding) > 0
    if padded:
        for c in cache:
            c.prepare(right_padding=right_padding)
    h = body(x, cache=cache)
    if padded:
        for c in cache:
            c.finalize()
    return h


def fork(cache: list, index: list[int], drop: int = 0) -> list:
    """Copies of rows ``index`` (repeats allowed) of a batch cache, without its last ``drop`` tokens.

    A batch cache's per-row offset is its length less the row's left padding, so a new cache with the same
    padding, given the same keys and values, continues exactly where the rows were."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import BatchKVCache

    idx = mx.array(index)
    padding = np.array(cache[0].left_padding)[index].tolist()
    forks = []
    for c in cache:
        keys, values = _contents(c)
        end = keys.shape[2] - drop
        f = BatchKVCache(padding)
        f.update_and_fetch(keys[idx, :, :end], values[idx, :, :end])
        forks.append(f)
    return forks


def save(path: Path, system: SystemKV) -> None:
    """Write the system prompt's cache atomically (a reader never sees half a file); finite only."""
    import mlx.core as mx

    if not is_finite(system):
        raise NotFiniteError("the system prompt's keys or values are not finite")
    arrays = {f"{i}.{part}": a for i, kv in enumerate(system) for part, a in zip(("keys", "values"), kv)}
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")  # mlx adds .safetensors otherwise
    try:
        mx.save_safetensors(str(tmp), arrays, {"layers": str(len(system))})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, layers: int, tokens: int) -> SystemKV:
    """A saved system prompt's cache, checked: ``layers`` layers of ``tokens`` tokens, every value finite.
    Raises (ValueError, NotFiniteError or MLX's own errors) on anything else."""
    import mlx.core as mx

    arrays = mx.load(str(path))
    try:
        system = [(arrays[f"{i}.keys"], arrays[f"{i}.values"]) for i in range(layers)]
    except KeyError as e:
        raise ValueError(f"{path}: no {e.args[0]}") from None
    if len(arrays) != 2 * layers or any(
        k.ndim != 4 or k.shape[0] != 1 or k.shape[2] != tokens or v.shape[:3] != k.shape[:3] for k, v in system
    ):
        raise ValueError(f"{path}: not a cache of {layers} layers and {tokens} tokens")
    if not is_finite(system):
        raise NotFiniteError(f"{path}: keys or values are not finite")
    return system
