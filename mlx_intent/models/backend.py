"""The compute backend: OpenBLAS for MLX on the CPU, and how much memory a model may use.

Must run before ``mlx.core`` is first imported: the ``mlx[cpu]`` wheel links a slow
reference BLAS, and a system OpenBLAS loaded with RTLD_GLOBAL first takes over its
symbols (float32 matmul about 20x faster here).  Absent OpenBLAS is not an error.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_openblas: str | None = None


def use_openblas() -> str | None:
    """Load the system OpenBLAS globally (Linux only); return its path or None.

    Set ``MLX_INTENT_OPENBLAS=0`` to keep MLX's own BLAS (used by the benchmarks)."""
    global _openblas
    if _openblas or not sys.platform.startswith("linux") or os.environ.get("MLX_INTENT_OPENBLAS") == "0":
        return _openblas
    if "mlx.core" in sys.modules:  # too late to take over the symbols
        return None
    for path in OPENBLAS_PATHS:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            _openblas = path
            break
    return _openblas


def device_name() -> str:
    """'metal', 'cuda' or 'cpu': where MLX runs by default."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def device_info() -> dict:
    """MLX's description of the device the models run on: chip name, memory, Metal's recommended working set (keys
    depend on the backend).  Asked of the GPU by name where Metal is there: the default device may be the CPU
    (``mx.set_default_device(mx.cpu)``), whose description has no working set."""
    import mlx.core as mx

    return dict(mx.device_info(mx.gpu if mx.metal.is_available() else mx.default_device()))


def wire_working_set() -> int | None:
    """Wire Metal's recommended working set, as mlx-lm's server does at start (mlx_lm.utils'
    ``maybe_set_recommended_wired_limit``), so a loaded model's weights stay resident between queries instead of
    being paged out and back; the previous limit, or None where no working set is reported (CPU, CUDA)."""
    import mlx.core as mx

    size = device_info().get("max_recommended_working_set_size")
    return None if size is None else mx.set_wired_limit(int(size))


def system_memory() -> int:
    """Bytes of RAM in this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory() -> int:
    """Bytes a model may use: Metal's recommended working set, else system RAM."""
    import mlx.core as mx

    if mx.metal.is_available():
        return int(device_info()["max_recommended_working_set_size"])
    return system_memory()

