"""Download a corpus's raw files at a pinned commit, checked, into <models home>/corpora/<name>/.

The commit and the digests are those of the snapshot the maps were reviewed on
(manifests.json), so a user's build reads exactly the bytes we looked at.  Each file
is streamed to <file>.partial, hashed on the way, and renamed only when the digest
matches: a wrong checksum or an interrupted download leaves no file behind.  Files
kept with the repository's paths, so `build` reads the cache and a checkout alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from .sources import ARCHIVES, Archive, RemoteFile, corpus, manifests

BASE_URL = "https://raw.githubusercontent.com"
MARKER = ".fetched.json"  # written last: its presence means every file is there and checked
CHUNK = 1 << 16


class ChecksumError(ValueError):
    """A downloaded file does not match its pinned digest; nothing was kept."""


class IncompleteDownload(OSError):
    """The connection ended before the whole file came; nothing was kept."""


def corpora_home(home: Path) -> Path:
    """<models home>/corpora (``home``: Settings.home)."""
    return Path(home) / "corpora"


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file: how a commit's tree pins bytes the snapshot did not hold."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, spec: RemoteFile) -> bool:
    """Whether the file at path has the digest the manifest pins."""
    if spec.sha256:
        return _sha256(path) == spec.sha256
    if spec.git_sha1:
        return git_blob_sha1(path) == spec.git_sha1
    raise ValueError(f"manifest entry {spec.path} has no digest")


def _download(url: str, dest: Path, spec: RemoteFile, bar: tqdm, timeout: float) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, tmp.open("wb") as f:
            expected = int(resp.headers.get("Content-Length") or -1)
            got = 0
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if 0 <= got < expected:  # http.client may end a cut-off body quietly
            raise IncompleteDownload(f"{url}: connection closed after {got} of {expected} bytes")
        if not verify(tmp, spec):
            raise ChecksumError(f"checksum mismatch for {url}; the download was discarded")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_corpus(
    name: str,
    home: Path,
    *,
    base_url: str = BASE_URL,
    files: Sequence[RemoteFile] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download (or re-verify) corpus `name`; return its folder under <home>/corpora/.

    Files already present with the right digest are not downloaded again.  `base_url`
    and `files` exist for tests (a loopback server and fixture digests).
    """
    corpus(name)
    if name in ARCHIVES:
        return fetch_archive(name, ARCHIVES[name], home, progress=progress, timeout=timeout)
    m = manifests()[name]
    files = tuple(files if files is not None else m.files)
    root = corpora_home(home) / name
    marker = root / MARKER
    marker.unlink(missing_ok=True)
    todo = [f for f in files if not ((root / f.path).is_file() and verify(root / f.path, f))]
    total = sum(f.size or 0 for f in todo) or None
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}", disable=not progress) as bar:
        for f in todo:
            _download(f"{base_url.rstrip('/')}/{m.repo}/{m.commit}/{f.path}", root / f.path, f, bar, timeout)
    tmp = root / (MARKER + ".partial")
    root.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps({"repo": m.repo, "commit": m.commit, "files": [f.path for f in files]}) + "\n")
    os.replace(tmp, marker)
    return root


def fetched(name: str, home: Path) -> Path | None:
    """The corpus folder if a fetch completed there, else None."""
    root = corpora_home(home) / name
    return root if (root / MARKER).is_file() else None


def fetch_archive(
    name: str, archive: Archive, home: Path, *, progress: bool = True, timeout: float = 60.0
) -> Path:
    """Download a released tarball (checked against its pinned digest) and unpack only ``archive.members``.

    The tarball is kept beside the members, so a second fetch re-verifies instead of downloading; members
    are written through .partial files, and the marker last, as for repository files.
    """
    import tarfile

    root = corpora_home(home) / name
    marker = root / MARKER
    marker.unlink(missing_ok=True)
    tarball = root / archive.url.rsplit("/", 1)[1]
    spec = RemoteFile(tarball.name, sha256=archive.sha256)
    if not (tarball.is_file() and verify(tarball, spec)):
        with tqdm(unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
            _download(archive.url, tarball, spec, bar, timeout)
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in archive.members:
                try:
                    src = tar.extractfile(member)
                except KeyError:
                    src = None
                if src is None:
                    raise ChecksumError(f"{tarball}: no member {member}")
                dest = root / member
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(dest.name + ".partial")
                with src, tmp.open("wb") as f:
                    while chunk := src.read(CHUNK):
                        f.write(chunk)
                os.replace(tmp, dest)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ChecksumError(f"{tarball}: not a readable tarball ({e})") from None
    tmp = root / (MARKER + ".partial")
    tmp.write_text(json.dumps({"url": archive.url, "sha256": archive.sha256, "files": list(archive.members)}) + "\n")
    os.replace(tmp, marker)
    return root
