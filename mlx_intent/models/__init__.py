"""Model architectures, weights and their loading."""
