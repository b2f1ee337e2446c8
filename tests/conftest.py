"""Shared fixtures.  The bundled model is converted and loaded once per test session,
into a session-wide models folder, so the suite stays fast and never touches the
developer's own models/ folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlx_intent.models import backend
from mlx_intent.settings import settings_home

# Before any test module imports mlx.core: OpenBLAS can only take over MLX's BLAS if it is
# loaded first, and the float32 forward passes in the tests are ~20x slower without it.
backend.use_openblas()


@pytest.fixture(scope="session")
def models_home(tmp_path_factory) -> str:
    """A fresh MLX_INTENT_HOME for the whole session (set before any model is resolved)."""
    path = tmp_path_factory.mktemp("models_home")
    old = os.environ.get("MLX_INTENT_HOME")
    os.environ["MLX_INTENT_HOME"] = str(path)
    yield str(path)
    if old is None:
        os.environ.pop("MLX_INTENT_HOME", None)
    else:
        os.environ["MLX_INTENT_HOME"] = old


@pytest.fixture(scope="session", autouse=True)
def hub_cache(tmp_path_factory):
    """huggingface-hub's standard cache, where pulls go and the registry looks: a fresh folder for the session,
    never the developer's own (huggingface-hub read HF_HUB_CACHE at import, so its constant is set here)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_CACHE
    constants.HF_HUB_CACHE = str(tmp_path_factory.mktemp("hf_hub_cache"))
    yield Path(constants.HF_HUB_CACHE)
    constants.HF_HUB_CACHE = saved


@pytest.fixture(scope="session")
def bundled(models_home):
    """(model, tokenizer) of the bundled SmolLM2-135M, converted and loaded once."""
    from mlx_intent.models.loading import load

    return load("smollm2-135m", home=settings_home())


@pytest.fixture(scope="session", autouse=True)
def no_keyword_calibration(tmp_path_factory):
    """Tests see the keyword tier's raw confidence and no model floor from it, whatever fit ships
    beside the lexicons; the calibration tests install one of their own (session scope: before
    any module-scoped chain is built).  Fits that `mlx-intent calibrate` left under a developer's models
    home are never read either: the tiers look for them under a name no such command wrote."""
    from mlx_intent import encoder, keyword

    saved = keyword.CALIBRATION_PATH, keyword.FIT_NAME, encoder.FIT_NAME
    keyword.CALIBRATION_PATH = tmp_path_factory.mktemp("keyword") / "no-calibration.json"
    keyword.FIT_NAME, encoder.FIT_NAME = "keyword-under-test", "e5-small-under-test"
    yield
    keyword.CALIBRATION_PATH, keyword.FIT_NAME, encoder.FIT_NAME = saved


@pytest.fixture(scope="session", autouse=True)
def no_shipped_adapters(tmp_path_factory):
    """Tests see a model without the adapters that ship in the package (the bundled model's and its calibration,
    found whatever the models folder is) unless they train one or point at them; nor may a test's calibrate
    write beside them."""
    from mlx_intent.models import registry

    shipped = registry.PACKAGED_ADAPTERS
    registry.PACKAGED_ADAPTERS = tmp_path_factory.mktemp("no-shipped-adapters")
    yield
    registry.PACKAGED_ADAPTERS = shipped


@pytest.fixture(scope="session")
def standin_repos(tmp_path_factory) -> dict:
    """Registry name -> its stand-in's mlx-community repo folder (tests/standins.py), built once."""
    from standins import NAMES, build_repo

    root = tmp_path_factory.mktemp("standin_repos")
    return {name: build_repo(name, root / name) for name in NAMES}


PULLED = ("llama-3.2-3b", "tinyllama")  # the design card's models, pulled as a new user pulls them


@pytest.fixture(scope="session")
def standin_home(standin_repos, tmp_path_factory, hub_cache):
    """A models folder for which ``mlx-intent models pull`` fetched Llama 3.2 3B's and TinyLlama's stand-ins
    from the fake hub (tests/fakehub.py) into the session's hub cache, as a new user would."""
    from fakehub import FakeHub, run_cli

    from mlx_intent.models import registry

    hub = FakeHub({registry.get_spec(name).mlx_repo: standin_repos[name] for name in PULLED})
    home = tmp_path_factory.mktemp("standin_home") / "models"
    try:
        for name in PULLED:
            result = run_cli("models", "pull", name, home=home, endpoint=hub.url, HF_HUB_CACHE=str(hub_cache))
            assert result.returncode == 0, result.stderr
            assert f"{name} is ready in" in result.stdout
    finally:
        hub.close()
    return home


@pytest.fixture
def clean_settings(monkeypatch, tmp_path, models_home):
    """An empty working folder (no stray .env) and no MLX_INTENT_* setting but the session's models folder."""
    from mlx_intent.settings import ENV_VARS

    for variable in ENV_VARS.values():
        if variable != "MLX_INTENT_HOME":
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def no_run(monkeypatch):
    """Any chain being built fails the test: what is checked must be checked before the run."""
    from mlx_intent import chain as chain_module
    from mlx_intent.evaluation import run as run_module  # imported first: imported under the patch, it keeps it

    def build(*args, **kwargs):
        raise AssertionError("the chain was built: the run started before the check")

    monkeypatch.setattr(chain_module, "build_chain", build)
    monkeypatch.setattr(run_module, "build_chain", build)
