"""`mlx-intent data`: fetch the public corpora, build training/eval files, list what is there.

Bad input (an unknown corpus, a missing folder, a corrupt file) exits with status 2 and
a message that names the corpus or the file; nothing half-written is left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlx_intent.cli.options import home_options
from mlx_intent.corpora.build import DEFAULT_GENERAL_CAP, DEFAULT_SEED, build, format_summary
from mlx_intent.corpora.download import ChecksumError, corpora_home, fetch_corpus, fetched
from mlx_intent.corpora.mapping import MapError
from mlx_intent.corpora.readers import CorpusFormatError
from mlx_intent.corpora.sources import CORPORA
from mlx_intent.settings import Settings

DEFAULT_OWN_DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"


class BadInput(click.ClickException):
    """A data error the user can fix: exit status 2, like a usage error."""

    exit_code = 2


def _home(home: Path) -> Path:
    return corpora_home(home).parent


@click.group("data", context_settings={"help_option_names": ["-h", "--help"]})
def data_command() -> None:
    """Public intent corpora (CLINC150, HWU64, SLURP, MASSIVE in six languages; xSID and Snips for evaluation only).

    \b
    mlx-intent data fetch all          download the pinned raw files, checksummed
    mlx-intent data build              map, de-duplicate and split them into <home>/data
    mlx-intent data list               what is fetched and built, with licence credits
    """


@data_command.command("fetch")
@click.argument("name", metavar="NAME|all")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@home_options
def fetch_cmd(name: str, quiet: bool, settings: Settings) -> None:
    """Download corpus NAME (or all of them) into <home>/corpora/NAME at its pinned commit."""
    home = settings.home
    names = list(CORPORA) if name == "all" else [name]
    for n in names:
        if n not in CORPORA:
            raise click.BadParameter(f"unknown corpus {n!r}; choose from all, {', '.join(CORPORA)}", param_hint="NAME")
    for n in names:
        try:
            root = fetch_corpus(n, home, progress=not quiet)
        except ChecksumError as e:
            raise BadInput(str(e)) from None
        except OSError as e:
            raise click.ClickException(f"{n}: download failed: {e}") from None
        click.echo(f"{n}: {root}")


def _parse_from(values: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not path:
            raise click.BadParameter(f"{v!r} is not NAME=PATH", param_hint="--from")
        if name not in CORPORA:
            raise click.BadParameter(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}", param_hint="--from")
        p = Path(path).expanduser()
        if not p.is_dir():
            raise click.BadParameter(f"{name}: no such folder {p}", param_hint="--from")
        out[name] = p
    return out


@data_command.command("build")
@click.option(
    "--from",
    "from_",
    multiple=True,
    metavar="NAME=PATH",
    help="Read corpus NAME from a checkout at PATH (repeatable); otherwise every fetched corpus is used.",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder (default <home>/data).")
@click.option(
    "--own-data",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_OWN_DATA,
    show_default=True,
    help="Our own train/dev/probe JSONL, whose texts are removed from the public files.",
)
@click.option(
    "--general-cap",
    type=click.FloatRange(0, 1, max_open=True),
    default=DEFAULT_GENERAL_CAP,
    show_default=True,
    help="Largest share of `general` in public-train and public-calib.",
)
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="Seed of the general-cap sample.")
@home_options
def build_cmd(
    from_: tuple[str, ...], out: Path | None, own_data: Path, general_cap: float, seed: int, settings: Settings
) -> None:
    """Map, de-duplicate and split the corpora; write public-*.jsonl, reserved-*.jsonl, summary.json.

    Reserved files (CLINC150 test, SLURP test, xSID, Snips) are for evaluation only:
    never train, calibrate or tune on them.
    """
    home = settings.home
    sources = {n: p for n in CORPORA if (p := fetched(n, home))}
    sources |= _parse_from(from_)
    if not sources:
        raise click.UsageError("no corpora: run `mlx-intent data fetch all` or pass --from NAME=PATH")
    out = out or _home(home) / "data"
    try:
        summary = build(sources, out, own_data, general_cap=general_cap, seed=seed)
    except (CorpusFormatError, MapError, KeyError, ValueError, FileNotFoundError) as e:
        raise BadInput(str(e.args[0]) if isinstance(e, KeyError) else str(e)) from None
    click.echo(format_summary(summary))
    click.echo(f"\nwritten to {out}")


@data_command.command("list")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Built folder (default <home>/data).")
@home_options
def list_cmd(out: Path | None, settings: Settings) -> None:
    """Each corpus: fetched or not, its licence credit; then the built files and their row counts."""
    home = settings.home
    for n, c in CORPORA.items():
        root = fetched(n, home)
        role = (
            "train+eval" if c.training_splits and c.reserved_splits else "train" if c.training_splits else "eval only"
        )
        click.echo(f"{n:9} {role:10} {'fetched ' + str(root) if root else 'not fetched'}")
        click.echo(f"          {c.credit}")
    out = out or _home(home) / "data"
    summary = out / "summary.json"
    if not summary.is_file():
        click.echo(f"\nnot built ({out})")
        return
    try:
        outputs = json.loads(summary.read_text("utf-8"))["outputs"]
    except (json.JSONDecodeError, KeyError) as e:
        raise BadInput(f"corrupt file {summary}: {e}") from None
    click.echo(f"\nbuilt in {out}:")
    for fname, info in outputs.items():
        click.echo(f"  {fname:32} {info['rows']:7d} rows")
