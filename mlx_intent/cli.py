"""The ``mlx-intent`` command line.

Exit codes: 0 ok; 1 a failed check or error reported in words; 2 bad usage or bad
input (click's own code for usage errors); 3 a model that is missing or unknown.
"""

from __future__ import annotations

from pathlib import Path

import click

from mlx_intent import registry

EXIT_MODEL = 3


class ModelError(click.ClickException):
    exit_code = EXIT_MODEL


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-intent")
def main() -> None:
    """Classify what a traveller wants (15 intents) with small local LLMs on MLX."""


@main.group()
def models() -> None:
    """List, pull and convert the registry's models."""


@models.command("list")
@click.option("--model", help="Selection override, as for classify.")
def models_list(model: str | None) -> None:
    """Show every registry model: state, size on disk, memory, and which one is selected."""
    from mlx_intent.loading import select_best_model

    try:
        selected = select_best_model(model)
    except (registry.ModelNotAvailableError, registry.UnknownModelError) as e:
        selected = None
        click.echo(f"note: {e}", err=True)
    rows = [("", "name", "state", "on disk", "memory", "peak seen", "MLX repo")]
    for spec in registry.REGISTRY.values():
        path = registry.resolve_dir(spec.name)
        peak = registry.read_stamp(path).get("peak_memory") if path else None
        lo, hi = spec.memory_gb
        rows.append(
            (
                "*" if spec.name == selected else "",
                spec.name,
                registry.state(spec.name),
                _human(registry.disk_size(spec.name)) if registry.state(spec.name) != "missing" else "-",
                f"{lo:g}-{hi:g} GB",
                _human(peak) if peak else "-",
                spec.mlx_repo or f"bundled ({spec.gguf_package})",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    click.echo(f"\nmodels folder: {registry.home()}   (* = selected now)")


@models.command("convert")
@click.option("--gguf", "gguf", required=True, type=click.Path(dir_okay=False, path_type=Path), help="GGUF file.")
@click.option("--name", required=True, help="Registry name (or a new name) for the MLX folder.")
@click.option("--force", is_flag=True, help="Replace an existing converted model.")
def models_convert(gguf: Path, name: str, force: bool) -> None:
    """Convert a Llama-architecture GGUF (Q4_0, Q4_1, Q8_0, F16, F32) to an MLX 4-bit folder."""
    from mlx_intent.convert.gguf import GGUFError, convert_gguf

    out = registry.home() / name
    if registry.is_mlx_folder(out) and not force:
        raise click.ClickException(f"{out} already holds a converted model; use --force to replace it")
    try:
        convert_gguf(gguf, out, progress=lambda msg: click.echo(f"  {msg}", err=True))
    except GGUFError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"converted {gguf} -> {out}")


@models.command("pull")
@click.argument("name")
@click.option("--from-source", is_flag=True, help="Download the original weights and convert them to 4-bit.")
def models_pull(name: str, from_source: bool) -> None:
    """Download NAME's ready MLX 4-bit repo from the Hugging Face Hub (resumable).

    Honours HF_TOKEN (gated repos such as Meta's) and HF_HUB_OFFLINE."""
    from mlx_intent import hub

    try:
        path = hub.pull(name, from_source=from_source)
    except registry.UnknownModelError as e:
        raise ModelError(str(e)) from None
    except hub.PullError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{name} is ready in {path}")
