"""Model architectures, weights and their loading: the registry, the hub, GGUF conversion, the compute backend."""
