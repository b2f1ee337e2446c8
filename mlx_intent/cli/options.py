"""What the commands share: click options (one flag per setting, see ``mlx_intent.settings``) and the checks
they make before a run."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import click

from mlx_intent import staging
from mlx_intent.errors import EXIT_INPUT, InputError, ModelError
from mlx_intent.models import registry
from mlx_intent.settings import SPECS, Settings, SettingsError, flag, load_settings


def settings_options(command: Callable, names: Iterable[str] = SPECS) -> Callable:
    """Add ``--env-file`` and one flag per setting (of ``names``; default all) to a click command, which then
    receives ``settings`` (every setting, from defaults, .env and the environment, and these flags).

    Flags take text and are parsed by load_settings, so a bad flag fails with the same message as a bad
    variable.  Their Python names are ``setting_<name>`` so they never clash with the command's own.
    """
    names = tuple(names)

    @functools.wraps(command)
    def wrapper(*args: object, setting_env_file: Path | None, **kwargs: object) -> object:
        cli = {name: kwargs.pop(f"setting_{name}") for name in names}
        try:
            settings = load_settings(cli, dotenv=setting_env_file)
        except SettingsError as e:
            error = click.ClickException(str(e))
            error.exit_code = EXIT_INPUT  # a bad setting is bad usage, as the README's table says
            raise error from None
        return command(*args, settings=settings, **kwargs)

    for name in reversed(names):
        spec = SPECS[name]
        option = click.option(
            flag(name),
            f"setting_{name}",
            default=None,
            metavar=spec.metavar,
            help=f"{spec.help} [{spec.env}]",
        )
        wrapper = option(wrapper)
    env_file = click.option(
        "--env-file",
        "setting_env_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=".env file to read (default: ./.env when present)",
    )
    return env_file(wrapper)


def home_options(command: Callable) -> Callable:
    """``--home`` and ``--env-file`` only, for commands whose other flags would clash with the settings' own
    (``models``, ``train``, ``data``): they receive ``settings`` and use ``settings.home``, as classify does."""
    return settings_options(command, ("home",))


def chain_in_force(settings: Settings) -> list[str]:
    """The chain these settings run, and for each LLM of the default chain its place and the figures that chose
    it (``mlx-intent calibrate MODEL`` measures them), for ``config`` and ``models list``."""
    from mlx_intent.calibration import read_place
    from mlx_intent.chain import default_chain_names

    if settings.chain:
        return [f"chain: {' -> '.join(settings.chain)} (set by MLX_INTENT_CHAIN or --chain: no place applies)"]
    names = default_chain_names(settings)
    lines = [f"chain: {' -> '.join(names)} (the default)"]
    llms = dict.fromkeys(part for name in names for part in name.split("+") if part in registry.REGISTRY)
    lines += [f"  {name} place: {read_place(name, settings.home).why()}" for name in llms]
    return lines


def check_writable(path: Path, what: str, *, folder: bool = False, make_parents: bool = False) -> None:
    """Fail now, in words (InputError, exit 2), where a command could not write ``path`` at the end of its run.

    ``what`` names the path for the user (``--output``...); ``path`` is a file, or with ``folder`` a directory.
    With ``make_parents`` the command creates missing folders, so the nearest existing one must be writable."""
    if path.is_symlink() and not path.exists():
        raise InputError(f"{what} {path}: a symbolic link to {os.readlink(path)}, which does not exist")
    if path.exists():
        if path.is_dir() != folder:
            raise InputError(f"{what} {path}: " + ("not a folder" if folder else "a folder, not a file"))
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise InputError(f"{what} {path}: not writable")
        return
    parent = path.parent
    while make_parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.exists():
        raise InputError(f"{what} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"{what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: folder {parent} is not writable")


def same_file(a: Path | str, b: Path | str) -> bool:
    """Whether two paths name one file: by device and inode where both exist (symlinks and hard links included),
    else by their resolved paths (a file not written yet)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def check_log(settings: Settings, **others: Path | str | None) -> None:
    """The classification log (``--log`` or MLX_INTENT_LOG) must be writable before a run starts, be a log if it
    exists (anything else would lose its tail to the repair of a torn line), and not be the feedback store or
    one of the command's ``others`` (``input=...``: its own records would be read back as queries)."""
    if settings.log is None:
        return
    from mlx_intent.metrics import LogError, check_log_file

    source = settings.sources.get("log", "default")
    what = "--log" if source == "command line" else f"{SPECS['log'].env} (from {source})"
    check_writable(settings.log, what)
    store = settings.home / "feedback.db"
    for name, other in {"feedback store": store, **others}.items():
        if other is not None and str(other) != "-" and same_file(settings.log, other):
            raise InputError(f"{what} {settings.log} is the {name.replace('_', ' ')} {other}; refusing to log there")
    try:
        check_log_file(settings.log)
    except LogError as e:
        raise InputError(f"{what} {e}") from None


def chain_for(settings: Settings, files: dict[str, Path | str | None] | None = None, **build):
    """The chain the settings describe, for a command, built with ``build`` (``chain.build_chain``'s keywords:
    store, sample, wrap_load...); an unknown model is a ModelError (exit 3), an unwritable log, or one that is not
    a log or is one of the command's ``files`` (check_log), an InputError (exit 2)."""
    from mlx_intent.chain import build_chain

    check_log(settings, **(files or {}))
    try:
        chain = build_chain(settings, **build)
    except registry.UnknownModelError as e:
        raise ModelError(str(e)) from None
    if settings.sources.get("model") == "command line" and registry.state(settings.model, settings.home) == "missing":
        click.echo(
            f"warning: {settings.model} is not downloaded; get it with: {registry.how_to_get(settings.model)}", err=True
        )
    return chain


def clean_stale(folder: Path) -> None:
    """Remove the staging folders that killed conversions and trainings left in ``folder``, with a note."""
    staging.clean_stale(folder, lambda msg: click.echo(f"note: {msg}", err=True))
