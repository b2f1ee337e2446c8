"""mlx-intent: travel intent classification with small local LLMs on MLX."""
