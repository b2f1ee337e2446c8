"""mlx-intent: travel intent classification with small local LLMs on MLX."""

from mlx_intent.backend import use_openblas

use_openblas()  # before anything imports mlx.core
