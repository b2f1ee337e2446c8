"""The ``mlx-intent`` command line: one module per command group, the library stays free of click."""

from mlx_intent.cli.main import main

__all__ = ["main"]
