"""`mlx-intent models pull` against a fake Hugging Face Hub on 127.0.0.1.

The fake hub answers the three endpoints huggingface-hub's snapshot_download uses
(repo info at a revision, the recursive tree listing, HEAD/GET on
``resolve/<revision>/<file>``) with the headers it checks (X-Repo-Commit, ETag,
Content-Length, X-Error-Code).  The pull runs in a subprocess with HF_ENDPOINT set,
because huggingface-hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from mlx_intent.models import registry

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CLI = Path(sys.executable).parent / "mlx-intent"
ROOT = Path(__file__).resolve().parents[1]
MLX_REPO = registry.get_spec("tinyllama").mlx_repo
SOURCE_REPO = registry.get_spec("tinyllama").source_repo


class FakeHub:
    """A Hub serving repo folders; ``gated`` repos need ``Authorization: Bearer <token>`` to download."""

    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = (), token: str = "hf_fake") -> None:
        self.repos, self.gated, self.token = repos, gated, token
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.answer(self, body=True)

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        self.requests.append((req.command, path, req.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, kind = "/".join(parts[2:4]), parts[4]
            if repo not in self.repos:
                return self.error(req, 404, "RepoNotFound", "Repository not found")
            files = sorted(p for p in self.repos[repo].rglob("*") if p.is_file())
            rel = [p.relative_to(self.repos[repo]).as_posix() for p in files]
            if kind == "revision":
                return self.send(
                    req, json.dumps({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": r} for r in rel]})
                )
            tree = [
                {"type": "file", "path": r, "size": p.stat().st_size, "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                for r, p in zip(rel, files)
            ]
            return self.send(req, json.dumps(tree))
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in self.repos:
                return self.error(req, 404, "RepoNotFound", "Repository not found")
            if repo in self.gated and req.headers.get("Authorization") != f"Bearer {self.token}":
                return self.error(req, 401, "GatedRepo", f"Access to model {repo} is restricted.")
            file = self.repos[repo] / name
            if not file.is_file():
                return self.error(req, 404, "EntryNotFound", "Entry not found")
            data = file.read_bytes()
            etag = hashlib.sha256(data).hexdigest()
            return self.send(req, data if body else b"", length=len(data), headers={"ETag": f'"{etag}"'})
        return self.error(req, 404, None, "not a Hub endpoint")

    def send(self, req, data: str | bytes, length: int | None = None, headers: dict | None = None) -> None:
        data = data.encode() if isinstance(data, str) else data
        req.send_response(200)
        req.send_header("X-Repo-Commit", COMMIT)
        req.send_header("Content-Length", str(len(data) if length is None else length))
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.end_headers()
        req.wfile.write(data)

    def error(self, req, status: int, code: str | None, message: str) -> None:
        req.send_response(status)
        if code:
            req.send_header("X-Error-Code", code)
        req.send_header("X-Error-Message", message)
        req.send_header("Content-Length", "0")
        req.end_headers()


@pytest.fixture(scope="module")
def mlx_repo(models_home, tmp_path_factory) -> Path:
    """A fake ``mlx-community`` repo: the bundled model converted to MLX, plus files a pull must skip."""
    converted = registry.require_dir("smollm2-135m")
    repo = tmp_path_factory.mktemp("mlx_repo")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(converted / name, repo / name)
    (repo / "README.md").write_text("# fake model card\n")
    (repo / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return repo


@pytest.fixture(scope="module")
def source_repo(mlx_repo, tmp_path_factory) -> Path:
    """A fake original-weights repo: a tiny float16 Llama in Hugging Face layout with the bundled tokenizer."""
    import mlx.core as mx

    repo = tmp_path_factory.mktemp("source_repo")
    vocab, hidden, inter, layers = 49152, 64, 128, 2
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
    }
    (repo / "config.json").write_text(json.dumps(config))
    mx.random.seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (hidden // 2, hidden),
            p + "self_attn.v_proj.weight": (hidden // 2, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    weights = {k: (mx.random.normal(s) * 0.02).astype(mx.float16) for k, s in shapes.items()}
    mx.save_safetensors(str(repo / "model.safetensors"), weights, metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(mlx_repo / name, repo / name)
    (repo / "original").mkdir()
    (repo / "original" / "consolidated.00.pth").write_bytes(b"not needed")
    return repo


@pytest.fixture
def hub(mlx_repo, source_repo):
    hub = FakeHub({MLX_REPO: mlx_repo, SOURCE_REPO: source_repo})
    yield hub
    hub.close()


def run_cli(*args: str, home: Path, endpoint: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``mlx-intent`` with a fresh models folder and Hugging Face home, talking to ``endpoint``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    full |= {
        "MLX_INTENT_HOME": str(home),
        "HF_HOME": str(home.parent / "hf_home"),  # no token file from the developer's own login
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        # the checkout under test, not whichever one the venv's entry point was installed from
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    } | env
    return subprocess.run([str(CLI), *args], env=full, capture_output=True, text=True, timeout=300)


def resolves(hub: FakeHub) -> list[tuple[str, str, str | None]]:
    return [r for r in hub.requests if "/resolve/" in r[1]]


def test_pull_downloads_ready_model_and_second_pull_is_cached(hub, tmp_path):
    home = tmp_path / "home"
    first = run_cli("models", "pull", "tinyllama", home=home, endpoint=hub.url)
    assert first.returncode == 0, first.stderr
    assert "tinyllama is ready in" in first.stdout
    fetched = sorted({Path(r[1]).name for r in resolves(hub)})
    assert fetched == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]

    listing = run_cli("models", "list", home=home, endpoint=hub.url)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if " tinyllama " in line)
    assert "converted" in row.split()
    assert row.startswith("*"), listing.stdout  # the best model that is on disk and fits

    before = len(hub.requests)
    second = run_cli("models", "pull", "tinyllama", home=home, endpoint=hub.url)
    assert second.returncode == 0, second.stderr
    assert len(hub.requests) == before  # already pulled: not even a metadata request
    offline = run_cli("models", "pull", "tinyllama", home=home, endpoint=hub.url, HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr


def test_pulled_model_loads_in_process(hub, tmp_path, monkeypatch):
    home = tmp_path / "home"
    assert run_cli("models", "pull", "tinyllama", home=home, endpoint=hub.url).returncode == 0
    monkeypatch.setenv("MLX_INTENT_HOME", str(home))
    assert registry.state("tinyllama") == "converted"
    from mlx_intent.models.loading import load

    model, tokenizer = load("tinyllama")
    assert tokenizer.encode("hello")
    assert registry.state("tinyllama") == "ready"


def test_offline_without_cache_fails_clearly(hub, tmp_path):
    result = run_cli("models", "pull", "tinyllama", home=tmp_path / "home", endpoint=hub.url, HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot pull tinyllama ({MLX_REPO})" in result.stderr
    assert "HF_HUB_OFFLINE is set: unset it" in result.stderr
    assert hub.requests == []


def test_gated_repo_without_token_asks_for_hf_token(hub, tmp_path):
    hub.gated = (MLX_REPO,)
    result = run_cli("models", "pull", "tinyllama", home=tmp_path / "home", endpoint=hub.url)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "asks for a login (401)" in result.stderr
    assert "set HF_TOKEN" in result.stderr
    assert f"{hub.url}/{MLX_REPO}" in result.stderr  # where to accept the licence


def test_gated_repo_with_wrong_token_says_so(hub, tmp_path):
    hub.gated = (MLX_REPO,)
    result = run_cli("models", "pull", "tinyllama", home=tmp_path / "home", endpoint=hub.url, HF_TOKEN="hf_wrong")
    assert result.returncode == 1
    assert "refused access (401)" in result.stderr
    assert "accept the licence" in result.stderr


def test_hf_token_is_sent_as_bearer(hub, tmp_path):
    hub.gated = (MLX_REPO,)
    result = run_cli("models", "pull", "tinyllama", home=tmp_path / "home", endpoint=hub.url, HF_TOKEN="hf_fake")
    assert result.returncode == 0, result.stderr
    assert resolves(hub)
    assert {auth for _, _, auth in hub.requests} == {"Bearer hf_fake"}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tinyllama", "the repo was not found on the Hub (404)"),
        ("e5-small", "cannot pull e5-small (intfloat/multilingual-e5-small)"),  # the encoder's own path
    ],
)
def test_repo_not_found(tmp_path, name, message):
    hub = FakeHub({})
    try:
        result = run_cli("models", "pull", name, home=tmp_path / "home", endpoint=hub.url)
    finally:
        hub.close()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_hub_unreachable(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli("models", "pull", "tinyllama", home=tmp_path / "home", endpoint=f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"check the network connection to http://127.0.0.1:{port}" in result.stderr


def test_pull_bundled_converts_the_gguf_without_network(hub, tmp_path):
    home = tmp_path / "home"
    result = run_cli("models", "pull", "smollm2-135m", home=home, endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    assert registry.is_mlx_folder(home / "smollm2-135m")
    assert hub.requests == []


def test_pull_from_source_quantizes_to_4bit(hub, tmp_path):
    import mlx.core as mx
    from mlx_lm import load as mlx_load

    home = tmp_path / "home"
    result = run_cli("models", "pull", "tinyllama", "--from-source", home=home, endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    out = home / "tinyllama"
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert (quant["bits"], quant["group_size"]) == (4, 64)
    assert not list(home.glob("*.partial"))
    assert not (home / "tinyllama.source" / "original").exists()  # only the files a model needs
    assert not any("/api/models/" + MLX_REPO in r[1] for r in hub.requests)
    model, tokenizer = mlx_load(str(out))
    logits = model(mx.array([tokenizer.encode("hello world")]))
    assert logits.shape[-1] == 49152 and bool(mx.isfinite(logits).all())
