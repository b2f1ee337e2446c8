"""mlx-intent: travel intent classification with small local LLMs on MLX."""

from mlx_intent.models.backend import use_openblas

use_openblas()  # before anything imports mlx.core

# The public API, by the module that defines each name.
_API = {
    "IntentClassifier": "classifier",  # one LLM tier
    "classify": "chain",  # one text, the shared default model, with an id
    "EncoderClassifier": "encoder",  # the e5-small tier
    "build_chain": "chain",  # the whole fallback chain, as the CLI and the server run it
}
__all__ = list(_API)


def __getattr__(name: str):
    """The public API, imported on first use: ``import mlx_intent`` stays cheap (no mlx, no model code)."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"mlx_intent.{_API[name]}"), name)
    raise AttributeError(f"module 'mlx_intent' has no attribute {name!r}")
