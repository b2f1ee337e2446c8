"""A fake Hugging Face Hub on 127.0.0.1, and ``mlx-intent`` run against it in a subprocess.

The fake hub answers the three endpoints huggingface-hub's snapshot_download uses
(repo info at a revision, the recursive tree listing, HEAD/GET on
``resolve/<revision>/<file>``) with the headers it checks (X-Repo-Commit, ETag,
Content-Length, X-Error-Code).  The CLI runs in a subprocess with HF_ENDPOINT set,
because huggingface-hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CLI = Path(sys.executable).parent / "mlx-intent"
ROOT = Path(__file__).resolve().parents[1]


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



def run_cli(*args: str, home: Path, endpoint: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``mlx-intent`` with a fresh models folder and Hugging Face home, talking to ``endpoint``."""
    return subprocess.run(
        [str(CLI), *args], env=hub_env(home, endpoint, **env), capture_output=True, text=True, timeout=300
    )


def run_python(code: str, home: Path, endpoint: str, **env: str) -> subprocess.CompletedProcess:
    """Run Python ``code`` (another Hub client, such as mlx-lm) in the environment ``run_cli`` gives."""
    return subprocess.run(
        [sys.executable, "-c", code], env=hub_env(home, endpoint, **env), capture_output=True, text=True, timeout=300
    )


def hub_cache_of(home: Path) -> Path:
    """The standard Hub cache of ``run_cli(home=home)``: HF_HOME/hub."""
    return home.parent / "hf_home" / "hub"


def hub_env(home: Path, endpoint: str, **env: str) -> dict[str, str]:
    """The environment of a run: models folder ``home``, HF_HOME beside it (``hub_cache_of``), ``endpoint``."""
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
    return full
