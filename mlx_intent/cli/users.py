"""``mlx-intent users set|show|list|learn|delete``: per-user thresholds in the feedback store.

A request that names its ``user`` (``classify --user``, ``"user"`` over HTTP, ``chain.classify(text, user=)``)
gets that user's ``min_confidence`` and ``margin`` in place of the settings'; an unknown user the defaults.
Exit codes: 0 done; 2 a bad id or threshold, an unknown user, too few records to learn from; 1 a store that
cannot be read.
"""

from __future__ import annotations

import click

from mlx_intent.cli.options import home_options
from mlx_intent.errors import InputError
from mlx_intent.feedback.store import db_path, open_store
from mlx_intent.feedback.users import (
    MIN_USER_RECORDS,
    delete_user,
    get_user,
    learn_user_thresholds,
    list_users,
    set_user,
)
from mlx_intent.results import check_user
from mlx_intent.settings import Settings


def _line(row: dict) -> str:
    show = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
    learned = f"  learned from {row['learned_from']} records" if row.get("learned_from") else ""
    return f"{row['id']}  min_confidence {show(row['min_confidence'])}  margin {show(row['margin'])}{learned}"


def _known(settings: Settings, user: str) -> dict:
    row = get_user(open_store(settings.home, create=False), check_user(user))
    if row is None:
        raise _unknown(settings, user)
    return row


def _unknown(settings: Settings, user: str) -> InputError:
    return InputError(f"unknown user {user!r}: no thresholds in {db_path(settings.home)} (set them: users set)")


@click.group("users")
def users_command() -> None:
    """Per-user thresholds (min_confidence, margin) in <models folder>/feedback.db; they replace the settings'
    for that user's requests."""


@users_command.command("set")
@click.argument("user")
@click.option("--min-confidence", "min_confidence", metavar="P", help="Below this a tier passes over, in (0, 1].")
@click.option("--margin", metavar="M", help="Top two intents closer than this: ambiguous, in [0, 1].")
@home_options
def users_set(user: str, min_confidence: str | None, margin: str | None, settings: Settings) -> None:
    """Set USER's thresholds (an option left out keeps its stored value)."""
    if min_confidence is None and margin is None:
        raise click.UsageError("give --min-confidence, --margin or both")
    click.echo(_line(set_user(open_store(settings.home), user, min_confidence, margin)))


@users_command.command("show")
@click.argument("user")
@home_options
def users_show(user: str, settings: Settings) -> None:
    """Show USER's thresholds."""
    click.echo(_line(_known(settings, user)))


@users_command.command("list")
@home_options
def users_list(settings: Settings) -> None:
    """Every user with thresholds of their own."""
    for row in list_users(open_store(settings.home, create=False)):
        click.echo(_line(row))


@users_command.command("delete")
@click.argument("user")
@home_options
def users_delete(user: str, settings: Settings) -> None:
    """Forget USER's thresholds (their records stay): the defaults apply again."""
    store = open_store(settings.home, create=False)
    if store is None or not delete_user(store, check_user(user)):
        raise _unknown(settings, user)
    click.echo(f"deleted the thresholds of {user}")


@users_command.command("learn")
@click.argument("user")
@click.option("--min-records", default=MIN_USER_RECORDS, show_default=True, type=click.IntRange(1))
@home_options
def users_learn(user: str, min_records: int, settings: Settings) -> None:
    """Fit USER's min_confidence and margin on their judged records (mlx-intent feedback add): the cuts that
    keep the most right answers less wrong ones."""
    store = open_store(settings.home, create=False)
    if store is None:
        raise InputError(f"no feedback store at {db_path(settings.home)} yet: nothing to learn from")
    fit = learn_user_thresholds(store, user, min_records)
    kept = "-" if fit["accuracy_accepted"] is None else f"{fit['accuracy_accepted']:.1%}"
    click.echo(_line(fit))
    click.echo(
        f"on {fit['records']} records: accuracy {fit['accuracy_before']:.1%} before; "
        f"{fit['accepted']} kept by these thresholds, {kept} of them right"
    )
