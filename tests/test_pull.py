"""`mlx-intent models pull` against a fake Hugging Face Hub on 127.0.0.1 (tests/fakehub.py), the CLI in a
subprocess (huggingface-hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from fakehub import FakeHub, hub_cache_of, run_cli, run_python

from mlx_intent.models import registry
from mlx_intent.settings import settings_home

MLX_REPO = registry.get_spec("tinyllama").mlx_repo
SOURCE_REPO = registry.get_spec("tinyllama").source_repo


@pytest.fixture(scope="module")
def mlx_repo(models_home, tmp_path_factory) -> Path:
    """A fake ``mlx-community`` repo: the bundled model converted to MLX, plus files a pull must skip."""
    converted = registry.require_dir("smollm2-135m", home=settings_home())
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


def resolves(hub: FakeHub) -> list[tuple[str, str, str | None]]:
    return [r for r in hub.requests if "/resolve/" in r[1]]


@pytest.fixture
def in_process(tmp_path, monkeypatch) -> Path:
    """This process sees what ``run_cli(home=tmp_path / "home")`` pulled: that models folder and its hub cache."""
    from huggingface_hub import constants

    home = tmp_path / "home"
    monkeypatch.setenv("MLX_INTENT_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache_of(home)))
    return home


def tree(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (links followed) and its size."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_pull_downloads_ready_model_and_second_pull_is_cached(hub, tmp_path):
    home = tmp_path / "home"
    first = run_cli("models", "pull", "tinyllama", home=home, endpoint=hub.url)
    assert first.returncode == 0, first.stderr
    assert "tinyllama is ready in" in first.stdout
    fetched = sorted({Path(r[1]).name for r in resolves(hub)})
    assert fetched == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert str(hub_cache_of(home)) in first.stdout  # the standard Hub cache (HF_HOME/hub), not the models folder
    assert not (home / ".hub").exists()

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


def test_pulled_model_loads_in_process(hub, in_process):
    assert run_cli("models", "pull", "tinyllama", home=in_process, endpoint=hub.url).returncode == 0
    assert registry.state("tinyllama", home=settings_home()) == "converted"
    from mlx_intent.models.loading import load

    model, tokenizer = load("tinyllama", home=settings_home())
    assert tokenizer.encode("hello")
    assert registry.state("tinyllama", home=settings_home()) == "ready"


def test_the_pull_is_a_standard_hub_cache_entry(hub, tmp_path):
    """`hf cache` tools (scan_cache_dir) see the pulled repo in HF_HUB_CACHE."""
    from huggingface_hub import scan_cache_dir

    home = tmp_path / "home"
    assert run_cli("models", "pull", "tinyllama", home=home, endpoint=hub.url).returncode == 0
    repos = {r.repo_id: r for r in scan_cache_dir(hub_cache_of(home)).repos}
    assert list(repos) == [MLX_REPO]
    assert {f.file_name for r in repos[MLX_REPO].revisions for f in r.files} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_a_model_mlx_lm_already_downloaded_is_not_downloaded_again(hub, tmp_path):
    """mlx-lm's default model is the 3B's own repo: what `mlx_lm.load` fetched into the standard cache, the pull
    finds there without a single request to the Hub."""
    home = tmp_path / "home"
    fetched = run_python(f"from mlx_lm import load; load({MLX_REPO!r})", home=home, endpoint=hub.url)
    assert fetched.returncode == 0, fetched.stderr
    assert resolves(hub)
    hub.requests.clear()
    result = run_cli("models", "pull", "tinyllama", home=home, endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    assert hub.requests == []
    assert str(hub_cache_of(home)) in result.stdout


def test_nothing_the_project_writes_lands_in_the_snapshot(hub, in_process):
    """The stamp, the system prompt's KV cache and the calibration go under the models home, keyed by repo and
    commit: the snapshot is huggingface-hub's (shared with mlx-lm), left as it was downloaded."""
    from fakehub import COMMIT

    from mlx_intent.classifier import IntentClassifier

    assert run_cli("models", "pull", "tinyllama", home=in_process, endpoint=hub.url).returncode == 0
    snapshot = registry.resolve_dir("tinyllama", home=settings_home())
    before = tree(snapshot)
    clf = IntentClassifier("tinyllama", home=in_process, use_adapter=False)
    assert clf.classify("where is my hotel")["primary_intent"]
    own = in_process / registry.STATE_FOLDER / MLX_REPO.replace("/", "--") / COMMIT
    assert tree(snapshot) == before
    assert registry.state("tinyllama", home=settings_home()) == "ready"
    assert (own / registry.STAMP).is_file()
    assert list(own.glob("prompt_cache_*.safetensors"))
    assert clf.calibration_file == own / "calibration.json"  # where `mlx-intent calibrate tinyllama` writes


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
    assert not (home / "tinyllama.source").exists()  # the original weights went to the standard hub cache
    source = hub_cache_of(home) / ("models--" + SOURCE_REPO.replace("/", "--")) / "snapshots"
    assert not list(source.glob("*/original"))  # only the files a model needs
    assert registry.is_mlx_folder(next(source.iterdir()))
    assert not any("/api/models/" + MLX_REPO in r[1] for r in hub.requests)
    model, tokenizer = mlx_load(str(out))
    logits = model(mx.array([tokenizer.encode("hello world")]))
    assert logits.shape[-1] == 49152 and bool(mx.isfinite(logits).all())


# ---- --model: a registry name, a Hub repo id or a local MLX folder, as mlx-lm takes them --------------------------

OUTSIDE_REPO = "someone/SmolLM2-135M-Instruct-mlx"  # no registry model's repo
LLM_ONLY = ["--min-confidence", "0", "--keyword-floor", "off", "--latency-budget-ms", "600000", "--cache-size", "0"]


def classify_with(model: str, home: Path, endpoint: str) -> subprocess.CompletedProcess:
    """Classify through the model alone (--chain), after checking that --model puts it in the default chain: there,
    unmeasured, it is the cascade tier after the encoder's blend (issue 24, part 5), which answers this text."""
    shown = run_cli("config", "--model", model, home=home, endpoint=endpoint)
    assert shown.returncode == 0 and f"e5-small -> {model} -> " in shown.stdout, shown.stdout + shown.stderr
    return run_cli("classify", "-v", "--chain", model, *LLM_ONLY, "where is my hotel", home=home, endpoint=endpoint)


def test_model_by_hub_repo_id_is_pulled_and_classifies(mlx_repo, tmp_path):
    hub = FakeHub({OUTSIDE_REPO: mlx_repo})
    home = tmp_path / "home"
    try:
        pulled = run_cli("models", "pull", OUTSIDE_REPO, home=home, endpoint=hub.url)
        assert pulled.returncode == 0, pulled.stderr
        assert str(hub_cache_of(home)) in pulled.stdout
        hub.requests.clear()
        result = classify_with(OUTSIDE_REPO, home, hub.url)
    finally:
        hub.close()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == OUTSIDE_REPO
    assert hub.requests == []
    assert list((home / registry.STATE_FOLDER / OUTSIDE_REPO.replace("/", "--")).glob("*/prompt_cache_*"))


def test_model_by_local_mlx_folder_classifies_and_is_left_as_it_was(mlx_repo, tmp_path):
    folder = tmp_path / "my-mlx-model"
    shutil.copytree(mlx_repo, folder)
    before = tree(folder)
    result = classify_with(str(folder), tmp_path / "home", "http://127.0.0.1:9")  # no Hub needed
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == str(folder)
    assert tree(folder) == before  # stamp and prompt cache under the models home, not in the user's folder
    assert list((tmp_path / "home" / registry.STATE_FOLDER / "local").glob("my-mlx-model-*/prompt_cache_*"))
    assert registry.outside_spec(str(folder)).chat_format == "chatml"  # read from its chat template


@pytest.mark.parametrize("name", ["gpt-5", "no such/repo/here", "./not-a-folder"])
def test_model_that_is_no_name_repo_or_folder_is_the_unknown_model_error(name, tmp_path):
    result = classify_with(name, tmp_path / "home", "http://127.0.0.1:9")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert f"unknown model {name!r}" in result.stderr
    assert "Hub repo id (org/name) or a folder holding an MLX model" in result.stderr


def test_model_without_a_chat_template_this_project_knows_is_refused_in_words(mlx_repo, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(mlx_repo, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": "{{ messages }}"}))
    result = classify_with(str(folder), tmp_path / "home", "http://127.0.0.1:9")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert "no chat template this project can prompt (Llama 3, ChatML or Zephyr)" in result.stderr

    hub = FakeHub({OUTSIDE_REPO: folder})
    try:
        pulled = run_cli("models", "pull", OUTSIDE_REPO, home=tmp_path / "home", endpoint=hub.url)
    finally:
        hub.close()
    assert pulled.returncode == 3, pulled.stderr
    assert "no chat template this project can prompt" in pulled.stderr
