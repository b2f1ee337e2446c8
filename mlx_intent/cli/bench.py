"""``mlx-intent bench``: latency, throughput and memory of every model present (mlx_intent/evaluation/bench.py)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import click

from mlx_intent.cli.options import home_options
from mlx_intent.errors import EXIT_INPUT, EXIT_MODEL
from mlx_intent.evaluation.bench import QUICK, BenchConfig, render_markdown, run_bench
from mlx_intent.settings import Settings

DEFAULT = BenchConfig()

_HELP = f"""Benchmark every model present here, the e5-small tier and the chain classify runs (or each --model:
a registry model, e5-small or chain): load time, prefill and decode tokens/s on a 512-token prompt (as
mlx_lm.benchmark measures them), scoring p50 / p95 / p99 (the chain: each query's latency through it) and
generation p50 on a fixed multilingual query set, batch-of-8 throughput, peak memory, valid-JSON rate, and
the naive free-generation baseline on a few queries.  About two minutes for the bundled model on two busy CPU
cores.

\b
Prints a Markdown table, or with --json one object:
  {{"device": {{...}}, "settings": {{...}}, "models": {{"<name>": {{"scoring_p50_ms", ...}}}}, "skipped": {{...}}}}
Share a result: mlx-intent bench --json > bench.json

\b
Exit codes: 0 done; {EXIT_INPUT} bad usage; {EXIT_MODEL} an unknown model, or no model present to benchmark
(the report, with the reasons, is printed all the same).
"""


@click.command("bench", help=_HELP)
@click.option(
    "--model", "models", multiple=True, metavar="NAME", help="A registry model, e5-small or chain; repeatable."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the Markdown table.")
@click.option("--quick", is_flag=True, help="1 pass, 12 queries, 1 naive query (options given still win).")
@click.option(
    "--repeats", type=click.IntRange(1), help=f"Prefill/decode trials and scoring passes. [{DEFAULT.repeats}]"
)
@click.option("--queries", type=click.IntRange(1), help="Use the first N queries of the set. [all]")
@click.option("--prompt-tokens", type=click.IntRange(1), default=DEFAULT.prompt_tokens, show_default=True)
@click.option("--generation-tokens", type=click.IntRange(1), default=DEFAULT.generation_tokens, show_default=True)
@click.option(
    "--naive-queries", type=click.IntRange(0), help=f"Queries of the naive baseline. [{DEFAULT.naive_queries}]"
)
@home_options
def bench_command(
    models: tuple[str, ...],
    as_json: bool,
    quick: bool,
    repeats: int | None,
    queries: int | None,
    prompt_tokens: int,
    generation_tokens: int,
    naive_queries: int | None,
    settings: Settings,
) -> None:
    given = {"repeats": repeats, "queries": queries, "naive_queries": naive_queries}
    config = replace(
        QUICK if quick else DEFAULT,
        prompt_tokens=prompt_tokens,
        generation_tokens=generation_tokens,
        **{k: v for k, v in given.items() if v is not None},
    )
    result = run_bench(models, config, home=settings.home, combine=settings.combine, settings=settings)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        click.echo(render_markdown(result, _command(models, quick, given, prompt_tokens, generation_tokens)))
    if not result["models"]:
        click.echo("error: no model was benchmarked (see skipped)", err=True)
        sys.exit(EXIT_MODEL)


def _command(models, quick: bool, given: dict, prompt_tokens: int, generation_tokens: int) -> str:
    """The command line that reproduces the report."""
    words = ["mlx-intent", "bench", *(f"--model {m}" for m in models), *(["--quick"] if quick else [])]
    words += [f"--{k.replace('_', '-')} {v}" for k, v in given.items() if v is not None]
    if prompt_tokens != DEFAULT.prompt_tokens:
        words.append(f"--prompt-tokens {prompt_tokens}")
    if generation_tokens != DEFAULT.generation_tokens:
        words.append(f"--generation-tokens {generation_tokens}")
    return " ".join(words)
