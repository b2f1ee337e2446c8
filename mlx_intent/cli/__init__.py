"""The ``mlx-intent`` command line: one module per command, imported when it runs; the library stays free of
click."""

from mlx_intent.cli.main import main

__all__ = ["main"]
