"""``mlx-intent classify``: one text, or a JSONL file of them (resumable, or shared among the ranks of
``mlx.launch``), through the fallback chain; the batch files are read and written by mlx_intent.batch_io."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from mlx_intent import batch_io
from mlx_intent import distributed as dist
from mlx_intent.chain import Kind
from mlx_intent.cli.options import chain_for, check_log, check_writable, same_file, settings_options
from mlx_intent.errors import InputError, UserError
from mlx_intent.feedback.store import open_store
from mlx_intent.results import check_user
from mlx_intent.settings import Settings


def _warn(message: str) -> None:
    """What batch_io has to say (a text cut, lines dropped on --resume): on stderr, beside the progress bar."""
    click.echo(message, err=True)


@click.command()
@click.argument("text", required=False)
@click.option(
    "--input", "input_path", metavar="IN.jsonl", help='JSONL of {"id", "text", "context"?} lines, or - for stdin.'
)
@click.option(
    "--context",
    "context",
    multiple=True,
    metavar="TEXT",
    help="An earlier turn of the conversation, oldest first (repeatable, at most 5; with TEXT).",
)
@click.option(
    "--output", "output", type=click.Path(dir_okay=False, path_type=Path), help="Where to write results; - for stdout."
)
@click.option("--resume", is_flag=True, help="Skip ids already in --output.")
@click.option(
    "--distributed",
    is_flag=True,
    help="Share --input among the ranks of `mlx.launch ... mlx-intent classify --distributed` (README); "
    "one --output, in input order.",
)
@click.option("--verbose", "-v", is_flag=True, help="Add model, tier, latency, fallbacks and the top-5 intents.")
@click.option(
    "--sample",
    is_flag=True,
    help="With --mode generate: sample at each model's recommended temperature (models table) instead of greedily.",
)
@click.option(
    "--record",
    is_flag=True,
    help="Keep texts and results in <models folder>/feedback.db for `mlx-intent feedback add ID`; show each id.",
)
@click.option("--user", metavar="ID", help="Whose thresholds apply (mlx-intent users); an --input line's user wins.")
@settings_options
def classify(
    text, input_path, context, output, resume, distributed, verbose, sample, record, user, settings: Settings
) -> None:
    """Classify TEXT, or every line of --input, through the fallback chain.

    \b
    mlx-intent classify "Where can I eat fish in Kadıköy?"
    mlx-intent classify --input queries.jsonl --output results.jsonl --resume
    """
    if (text is None) == (input_path is None):
        raise click.UsageError("give either TEXT or --input")
    if context and input_path is not None:
        raise click.UsageError('--context goes with TEXT; --input lines carry their own "context"')
    if sample and settings.mode != "generate":
        raise click.UsageError("--sample needs --mode generate (score mode reads every intent's probability)")
    if user is not None:
        check_user(user)
    if text is not None:
        turns = batch_io.context_turns(list(context), "--context: ", _warn) if context else ()
        chain = _chain(settings, sample, record)
        result = chain.classify(batch_io.query_text(text, report=_warn), user=user, context=turns)
        keys = (*batch_io.ANSWER_KEYS, "context_used") if turns else batch_io.ANSWER_KEYS
        shown = {**result, "top": dict(result.get("top", []))} if verbose else {k: result[k] for k in keys}
        shown = {**shown, "ambiguous": True} if result["ambiguous"] else shown  # within the margin: said
        shown = {"id": result["id"], **shown} if record else shown
        click.echo(json.dumps(shown, ensure_ascii=False, indent=2 if verbose else None))
        return
    if output is None:
        raise click.UsageError("--input needs --output")
    if str(output) == "-" and (resume or distributed):
        raise click.UsageError("--output - (stdout) cannot be resumed or merged: give a file")
    if str(output) != "-":
        check_writable(output, "--output")
    group = dist.init(distributed)
    if group is None:
        _classify_file(input_path, output, resume, settings, sample, record, user)
        return
    if record:
        raise click.UsageError("--record keeps results in one machine's feedback store: not with --distributed")
    dist.classify_file(group, input_path, output, resume, _chain(settings, sample), settings.batch_size, user, _warn)
    if group.rank() == 0:
        click.echo(f"wrote {output} ({group.size()} ranks)", err=True)


def _chain(settings: Settings, sample: bool, record: bool = False):
    """The chain of ``settings``; with ``sample`` its LLM tiers sample (before any of them loads); with
    ``record`` it keeps its results in the feedback store."""
    chain = chain_for(settings, sample=sample, store=open_store(settings.home) if record else None)
    if settings.mode == "generate":
        _need_llm(chain, "--sample" if sample else "--mode generate")
    return chain


def _need_llm(chain, what: str) -> None:
    """Generation and sampling are the LLM tiers' decoding: with no LLM tier that can load, refuse (exit 2) rather
    than let the encoder answer as if they had been applied."""
    llms = [t for t in chain.tiers if t.kind is Kind.LLM]
    reasons = [(t.name, t.absent()) for t in llms]
    if any(why is None for _, why in reasons):
        return
    names = "; ".join(f"{name}: {why}" for name, why in reasons) if llms else "the chain has none"
    raise InputError(f"{what} needs an LLM tier, and none can load here ({names}); the other tiers only score")


def _classify_file(
    input_path: str,
    output: Path,
    resume: bool,
    settings: Settings,
    sample: bool = False,
    record: bool = False,
    user: str | None = None,
) -> None:
    """Stream results batch by batch, so an interrupted run keeps what it wrote, each line once.  A file input
    is checked whole first (every line by the rules of ``batch_io.read_lines``), so bad input is refused before any
    work; stdin, read as it comes, is refused at its first bad line."""
    from tqdm import tqdm

    if input_path != "-" and not Path(input_path).is_file():
        raise InputError(f"{input_path}: no such file")
    to_stdout = str(output) == "-"  # results piped on, like the input may be (--input -)
    if to_stdout and resume:
        raise InputError("--resume needs an --output file to resume; standard output keeps nothing to read back")
    if input_path != "-" and not to_stdout and same_file(input_path, output):
        raise InputError(f"--output {output} is the --input file {input_path}; writing it would erase the queries")
    check_log(settings, input=input_path, output=output)
    if input_path != "-":
        for _ in batch_io.read_lines(input_path, set(), user):
            pass
    try:
        fd = None if to_stdout else batch_io.open_output(output, resume)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    try:
        done = batch_io.done_ids(output, fd, _warn) if resume else set()
        chain = _chain(settings, sample, record)
        batch: list[batch_io.Line] = []
        with tqdm(unit="q", disable=None) as bar:

            def flush() -> None:
                # backslashreplace: an id with a lone surrogate (JSON's "\ud800") is written as the escape it
                # was read from.  The batch is taken before it is written: an interrupt (Ctrl-C) in the
                # middle of the write must not have it written again by the finally below.
                lines = batch_io.answer_lines(chain, batch, record).encode("utf-8", "backslashreplace")
                size = len(batch)
                batch.clear()
                try:
                    if fd is None:
                        sys.stdout.buffer.write(lines)
                        sys.stdout.flush()
                    else:
                        batch_io.write_all(fd, lines)
                except OSError as e:
                    raise UserError(
                        f"cannot write {output}: {e.strerror or e}; the lines written before stay, "
                        "and --resume finishes the rest"
                    ) from None
                bar.update(size)

            try:
                for item in batch_io.read_lines(input_path, done, user, _warn):
                    batch.append(item)
                    if len(batch) >= settings.batch_size:
                        flush()
            finally:
                if batch:
                    flush()
    finally:
        if fd is not None:
            os.close(fd)
    click.echo("wrote the results to stdout" if to_stdout else f"wrote {output}", err=True)
    if lost := chain.metrics.log_write_failures:
        click.echo(f"warning: {lost} answers could not be logged to {chain.log.path} ({chain.log.error})", err=True)
