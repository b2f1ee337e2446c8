"""The ``mlx-intent`` group.  Each command has a module of its own here, imported only when it runs (click's
LazyGroup pattern), so ``mlx-intent --version`` and ``--help`` import no command at all.

Exit codes (``mlx_intent.errors``): 0 ok; 1 a failed check or an error reported in words; 2 bad usage or
bad input (empty text, a malformed or non-UTF-8 JSONL line; click's own code for usage errors); 3 an
unknown model, or one that is missing; 4 and 5 the warning and critical alerts of ``stats --check``.
"""

from __future__ import annotations

import importlib

import click

from mlx_intent.errors import UserError

# Each command: the module that defines it, its click command there, and the line ``--help`` shows for it,
# which is click's own summary of the command's help (get_short_help_str at SUMMARY_WIDTH, what an 80-column
# terminal gets), kept here so that listing the commands imports none (tests/test_cli_main.py holds them equal).
SUMMARY_WIDTH = 63
COMMANDS = {
    "bench": ("bench", "bench_command", "Benchmark every model present here, the e5-small tier and..."),
    "calibrate": ("calibrate", "calibrate_command", "Fit MODEL's temperature (NLL of the gold primary) and..."),
    "classify": ("classify", "classify", "Classify TEXT, or every line of --input, through the..."),
    "compare": ("compare", "compare_command", "A/B test: run chains A and B (comma-separated tiers, e.g...."),
    "config": ("config", "config_command", "Show the effective settings and where each came from:..."),
    "data": ("data", "data_command", "Public intent corpora (CLINC150, HWU64, SLURP, MASSIVE in..."),
    "eval": ("evaluate", "eval_command", "Evaluate the chain (or one tier) on labelled DATA and write..."),
    "feedback": ("feedback", "feedback_command", "Correct or confirm recorded answers, list and export the..."),
    "models": ("models", "models", "List, pull and convert the registry's models."),
    "serve": ("serve", "serve_command", "Serve classification over HTTP: POST /v1/classify,..."),
    "stats": ("stats", "stats_command", "Summarize a classification log (JSON lines; default: the..."),
    "train": ("train", "train", "Fine-tune MODEL on labelled data."),
    "users": ("users", "users_command", "Per-user thresholds (min_confidence, margin) in <models..."),
}


class Group(click.Group):
    """Imports a command's module when it runs (``COMMANDS``, which ``--help`` lists), and reports the library's
    UserErrors (mlx_intent.errors) in words, with their exit codes; an operating-system error no command worded
    itself (a read-only or full disk under the models folder) is still one line, exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"mlx_intent.cli.{module}"), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, _, summary) in sorted(COMMANDS.items())])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            error = click.ClickException(str(e))
            error.exit_code = e.exit_code
            raise error from None
        except OSError as e:
            where = f"cannot write {e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-intent")
def main() -> None:
    """Classify what a traveller wants (15 intents) with small local LLMs on MLX."""
