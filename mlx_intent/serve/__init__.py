"""The local HTTP service: the ASGI app, its dynamic batcher, and a small client."""
