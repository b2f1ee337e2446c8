"""``mlx-intent feedback add|list|export|queue``: corrections of recorded answers (``mlx_intent.feedback``).

Exit codes: 0 done; 2 an unknown result id, a bad intent name, feedback already given (without --replace), or
no feedback store yet; 1 a store that cannot be read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from mlx_intent.cli.options import check_writable, home_options
from mlx_intent.errors import InputError, UserError
from mlx_intent.feedback.data import export_rows, queue
from mlx_intent.feedback.store import Store, add_feedback, db_path, list_feedback, open_store
from mlx_intent.schema import MAX_INTENTS
from mlx_intent.settings import Settings

TEXT_WIDTH = 60


def _store(settings: Settings) -> Store:
    """The existing store of the models folder: a command that reads never creates one."""
    store = open_store(settings.home, create=False)
    if store is None:
        raise InputError(
            f"no feedback store at {db_path(settings.home)} yet: results are recorded by mlx-intent serve "
            "and by classify --record"
        )
    return store


def _short(text: str, width: int = TEXT_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _jsonl(rows: list[dict]) -> None:
    for r in rows:
        click.echo(json.dumps(r, ensure_ascii=False))


@click.group("feedback")
def feedback_command() -> None:
    """Correct or confirm recorded answers, list and export the corrections, and find the answers most worth
    a label.  The store is <models folder>/feedback.db (owner-only): `serve` records every answer there (unless
    --no-record), `classify --record` too."""


@feedback_command.command("add")
@click.argument("result_id")
@click.argument("intents", nargs=-1)
@click.option("--correct", is_flag=True, help="Confirm the answer as it was (give no INTENTS).")
@click.option("--replace", is_flag=True, help="Replace the feedback already given for RESULT_ID.")
@home_options
def add_command(result_id: str, intents: tuple[str, ...], correct: bool, replace: bool, settings: Settings) -> None:
    """Correct the answer RESULT_ID: INTENTS are the right ones, the primary first (up to 3); or confirm it
    with --correct.

    \b
    mlx-intent feedback add 3f2a...c9 restaurant greeting
    mlx-intent feedback add 3f2a...c9 --correct
    """
    if correct == bool(intents):
        raise click.UsageError("give the right INTENTS (the primary first), or --correct to confirm the answer")
    if len(intents) > MAX_INTENTS:
        raise click.UsageError(f"at most {MAX_INTENTS} intents, the primary first")
    primary, all_intents = (intents[0], list(intents)) if intents else (None, None)
    done = add_feedback(
        _store(settings), result_id, primary, all_intents, correct=correct, replace=replace, source="cli"
    )
    change = "" if done["verdict"] == "confirmed" else f"{done['answer']} -> "
    again = " (replaced)" if done["replaced"] else ""
    click.echo(f"{done['verdict']} {result_id}: {change}{', '.join(done['all_intents'])}{again}")


@feedback_command.command("list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1), help="Newest records shown.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@home_options
def list_command(limit: int, as_json: bool, settings: Settings) -> None:
    """The newest feedback records, with the answer each judged."""
    rows = list_feedback(_store(settings), limit)
    if as_json:
        return _jsonl(rows)
    if not rows:
        return click.echo("no feedback yet")
    table = [["id", "given", "verdict", "answer", "right", "text"]]
    table += [
        [r["id"], r["ts"][:19], "confirmed" if r["correct"] else "corrected", r["answer"], r["primary_intent"]]
        + [_short(r["text"])]
        for r in rows
    ]
    _table(table)


@feedback_command.command("export")
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="JSONL file (owner-only); default stdout."
)
@home_options
def export_command(output: Path | None, settings: Settings) -> None:
    """Every feedback record as a labelled JSONL row (id, text, lang, primary_intent, all_intents; the answer it
    judged, its part, context and user), as eval, train --data and calibrate --data read them."""
    if output is not None:
        check_writable(output, "--output")
    rows = export_rows(_store(settings))
    if output is None:
        return _jsonl(rows)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    try:
        _write_owner_only(output, text.encode("utf-8", "backslashreplace"))
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}; it is as it was") from None
    click.echo(f"wrote {len(rows)} records to {output}", err=True)


def _write_owner_only(output: Path, data: bytes) -> None:
    """Write ``data`` to ``output`` owner-only (0600), as the help says, whatever mode a file there had, and whole
    or not at all: into a new file beside it, fsynced, renamed over it (a symbolic link's target is the file
    replaced).  A device (/dev/stdout) is written in place."""
    target = output.resolve()
    if target.exists() and not target.is_file():
        with open(target, "wb") as f:
            f.write(data)
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@feedback_command.command("queue")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1), help="Results shown.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@home_options
def queue_command(limit: int, as_json: bool, settings: Settings) -> None:
    """Recorded answers without feedback, the most worth a label first: the smallest margin between the top two
    intents, then tiers that disagreed (a tier above was passed over as unsure, or by rule 1), then answers
    that the conversation's context decided."""
    rows = queue(_store(settings), limit)
    if as_json:
        return _jsonl(rows)
    if not rows:
        return click.echo("nothing to label: every recorded answer has feedback")
    table = [["id", "answer", "confidence", "margin", "tier", "flags", "text"]]
    for r in rows:
        flags = ",".join(f for f, on in (("disagree", r["disagreement"]), ("context", r["context_used"])) if on)
        table.append(
            [r["id"], r["primary_intent"], f"{r['confidence']:.2f}", f"{r['margin']:.2f}", r["tier"] or "-"]
            + [flags or "-", _short(r["text"])]
        )
    _table(table)
