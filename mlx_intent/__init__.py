"""mlx-intent: travel intent classification with small local LLMs on MLX."""

from mlx_intent.models.backend import use_openblas

use_openblas()  # before anything imports mlx.core

__all__ = ["IntentClassifier", "classify"]


def __getattr__(name: str):
    """The public API, imported on first use: ``import mlx_intent`` stays cheap (no mlx, no model code)."""
    if name in __all__:
        from mlx_intent import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'mlx_intent' has no attribute {name!r}")
