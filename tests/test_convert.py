"""The GGUF converter on the bundled SmolLM2-135M (Q4_1 blocks, Q8_0 embedding, F32 norms).

The reference for the logits is a float32 mlx-lm Llama built straight from the GGUF
tensors (``mx.load`` + dequantize), so the comparison checks the renaming, the
config (``rope_traditional``) and the tokenizer files the converter writes.
"""

from __future__ import annotations

import json
import shutil
import struct

import mlx.core as mx
import mlx.nn as nn
import pytest
from click.testing import CliRunner
from mlx_lm import load as mlx_load
from mlx_lm.models import llama
from mlx_lm.utils import dequantize_model

from mlx_intent.cli.main import main
from mlx_intent.models import gguf, registry
from mlx_intent.models.gguf import GGUFError, convert_gguf

GGUF = registry.bundled_gguf(registry.get_spec("smollm2-135m"))
PROMPTS = [
    "Book me a flight to Paris tomorrow morning.",
    "Yarın sabah Ankara'ya giden otobüs kaçta kalkıyor?",
    "أريد حجز غرفة في فندق قريب من المطار",
    "Je voudrais annuler ma réservation d'hôtel.",
    "Где находится ближайший железнодорожный вокзал?",
]
TEXTS = {
    "en": "Book me a flight to Paris tomorrow morning, please!",
    "tr": "Yarın sabah İstanbul'dan Ankara'ya uçak bileti almak istiyorum; ğüşöçı İĞÜŞÖÇ.",
    "ar": "أريد حجز غرفة في فندق بالقرب من المطار، من فضلك. ١٢٣",
    "fr": "Où se trouve la gare ? Je voudrais un billet aller-retour, s'il vous plaît.",
    "de": "Können Sie mir ein Hotel in München empfehlen? Straße, Größe, Übernachtung.",
    "ru": "Где находится ближайший вокзал? Ёлка, съешь ещё этих мягких булок.",
    "emoji": "✈️🏨🚆 👍🏽 🇹🇷 家族旅行  two  spaces\tand\nnewlines\n\n",
}

# Measured on this machine (mlx 0.32, CPU): converted 4-bit model vs the float32 model with the
# very same 4-bit weights, max |logit difference| 0.06-0.13 (float16 activations and scales);
# a wrong RoPE layout gives 6-28.  0.5 keeps a 4x margin and still catches layout mistakes.
TOL_SAME_WEIGHTS = 0.5
# Against the GGUF's own weights the Q8_0 embedding, which is also the tied output layer, is
# requantized to 4-bit: measured max |logit difference| 3.6-8.4 on logits spanning ~25-37, with
# the converted top-1 always among the reference's top 5.  12 bounds that cost with margin.
TOL_GGUF = 12.0
# Quantized forward vs the same model dequantized to float32: measured 0.005-0.07.
TOL_DEQUANTIZED = 0.25
TEXT = (
    "The train to Berlin leaves at nine in the morning from platform four. Passengers should arrive early, "
    "because the station is busy and the queues at the ticket office can be long."
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_gguf(GGUF, tmp_path_factory.mktemp("convert") / "smollm2")


@pytest.fixture(scope="module")
def quantized(converted):
    return mlx_load(str(converted))


@pytest.fixture(scope="module")
def quantized_logits(quantized) -> dict[str, mx.array]:
    """The converted model's logits for each prompt, computed once: 4-bit matmuls are slow on the CPU."""
    model, tokenizer = quantized
    return {prompt: logits(model, tokenizer, prompt) for prompt in PROMPTS}


def reference_model(requantize_embedding: bool) -> nn.Module:
    """A float32 Llama from the GGUF tensors, optionally with the embedding requantized as the converter does."""
    weights = mx.load(str(GGUF))
    tensors = {}
    for name, w in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")]
        if f"{base}.scales" in weights:
            scales, biases = weights[f"{base}.scales"], weights[f"{base}.biases"]
            bits = w.shape[-1] * 32 // (scales.shape[-1] * 32)
            w = mx.dequantize(w, scales, biases, group_size=32, bits=bits)
        tensors[gguf.mlx_name(name)] = w.astype(mx.float32)
    if requantize_embedding:
        key = "model.embed_tokens.weight"
        q = mx.quantize(tensors[key].astype(mx.float16), group_size=32, bits=4)
        tensors[key] = mx.dequantize(*q, group_size=32, bits=4).astype(mx.float32)
    config = gguf.model_config(gguf.read_header(GGUF).metadata, tied="lm_head.weight" not in tensors)
    del config["quantization"]
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.load_weights(list(tensors.items()))
    model.eval()
    return model


def logits(model: nn.Module, tokenizer, text: str) -> mx.array:
    return model(mx.array([tokenizer.encode(text)]))[0].astype(mx.float32)


def nll(model: nn.Module, tokenizer, text: str) -> float:
    ids = mx.array(tokenizer.encode(text))
    return nn.losses.cross_entropy(model(ids[None, :-1])[0].astype(mx.float32), ids[1:]).mean().item()


def test_output_folder_is_an_mlx_4bit_model(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    assert config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is True
    assert {p.name for p in converted.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_4bit_tensors_are_kept_bit_for_bit(converted):
    source = mx.load(str(GGUF))
    out = mx.load(str(converted / "model.safetensors"))
    kept = 0
    for name, w in source.items():
        if (
            name.endswith(".weight")
            and w.dtype == mx.uint32
            and w.shape[-1] * 8 == source[name[:-6] + "scales"].shape[-1] * 32
        ):
            key = gguf.mlx_name(name)[: -len("weight")]
            for part in ("weight", "scales", "biases"):
                assert mx.array_equal(out[key + part], source[name[:-6] + part]).item(), key + part
            kept += 1
    assert kept == 210  # every Q4_1 matrix of the 30 layers


def test_logits_match_the_same_weights_in_float32(quantized, quantized_logits):
    _, tokenizer = quantized
    reference = reference_model(requantize_embedding=True)
    for prompt in PROMPTS:
        got, want = quantized_logits[prompt], logits(reference, tokenizer, prompt)
        assert mx.abs(got - want).max().item() < TOL_SAME_WEIGHTS, prompt
        assert mx.argmax(got[-1]).item() == mx.argmax(want[-1]).item(), prompt


def test_logits_close_to_the_gguf_model(quantized, quantized_logits):
    model, tokenizer = quantized
    reference = reference_model(requantize_embedding=False)
    for prompt in PROMPTS:
        got, want = quantized_logits[prompt], logits(reference, tokenizer, prompt)
        assert mx.abs(got - want).max().item() < TOL_GGUF, prompt
        top5 = mx.argsort(-want[-1])[:5].tolist()
        assert mx.argmax(got[-1]).item() in top5, prompt
    # The model is right, not only consistent: a wrong RoPE layout or swapped tensors gives 5+ nats.
    assert nll(reference, tokenizer, TEXT) < 4.4
    assert nll(model, tokenizer, TEXT) < nll(reference, tokenizer, TEXT) + 0.15  # measured +0.04
    assert tokenizer.decode([mx.argmax(logits(model, tokenizer, "The capital of France is")[-1]).item()]) == " Paris"


def test_quantized_forward_matches_dequantized_float32(converted, quantized, quantized_logits):
    _, tokenizer = quantized
    full, _ = mlx_load(str(converted))
    full.apply(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p)
    full = dequantize_model(full)
    for prompt in PROMPTS:
        diff = mx.abs(quantized_logits[prompt] - logits(full, tokenizer, prompt)).max().item()
        assert diff < TOL_DEQUANTIZED, prompt


@pytest.mark.parametrize("lang", TEXTS)
def test_tokenizer_round_trips(quantized, lang):
    _, tokenizer = quantized
    text = TEXTS[lang]
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_and_digits(quantized):
    _, tokenizer = quantized
    start, end = tokenizer.encode("<|im_start|>"), tokenizer.encode("<|im_end|>")
    assert len(start) == 1 and len(end) == 1
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>") == [*start, *tokenizer.encode("user\nhi"), *end]
    assert end[0] == tokenizer.eos_token_id
    assert len(tokenizer.encode("2025")) == 4  # SmolLM2's pre-tokenizer splits digits one by one


def test_chat_template_renders_chatml(quantized):
    _, tokenizer = quantized
    messages = [{"role": "system", "content": "Classify."}, {"role": "user", "content": "Merhaba"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nClassify.<|im_end|>\n<|im_start|>user\nMerhaba<|im_end|>\n<|im_start|>assistant\n"
    )


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    def interrupt(_weights):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "convert_weights", interrupt)
    out = tmp_path / "smollm2"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(GGUF, out)
    assert list(tmp_path.iterdir()) == []  # neither the model nor a .partial folder


def test_interrupted_reconversion_keeps_the_old_model(converted, tmp_path, monkeypatch):
    out = tmp_path / "smollm2"
    shutil.copytree(converted, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.setattr(mx, "save_safetensors", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(GGUF, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]


def small_gguf(path, architecture: str = "llama"):
    """A tiny valid GGUF written by MLX: one 256x256 F32 matrix and a norm."""
    tensors = {"blk.0.attn_q.weight": mx.zeros((256, 256)), "output_norm.weight": mx.ones((256,))}
    meta = {"general.architecture": architecture, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}
    mx.save_gguf(str(path), tensors, meta)
    return path


def set_tensor_type(path, name: str, ggml_type: int) -> None:
    """Patch the type field of ``name`` in the tensor table (after its name, ndim and dims)."""
    data = bytearray(path.read_bytes())
    key = name.encode()
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    ndim = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * ndim, ggml_type)
    path.write_bytes(bytes(data))


def truncated(tmp_path):
    path = tmp_path / "half.gguf"
    with open(GGUF, "rb") as f:
        path.write_bytes(f.read(GGUF.stat().st_size // 2))
    return path


def wrong_magic(tmp_path):
    path = small_gguf(tmp_path / "magic.gguf")
    path.write_bytes(b"GGML" + path.read_bytes()[4:])
    return path


def q4_k(tmp_path):
    path = small_gguf(tmp_path / "q4k.gguf")
    set_tensor_type(path, "blk.0.attn_q.weight", 12)
    return path


def qwen(tmp_path):
    return small_gguf(tmp_path / "qwen.gguf", architecture="qwen2")


BAD = {
    "truncated": (truncated, "file is truncated"),
    "wrong magic": (wrong_magic, "not a GGUF file (magic b'GGML', expected b'GGUF')"),
    "Q4_K": (q4_k, "unsupported tensor type(s) Q4_K (e.g. blk.0.attn_q.weight); supported: F32, F16"),
    "architecture": (qwen, "unsupported architecture 'qwen2' (supported: llama)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_gguf_gives_clear_error(tmp_path, case):
    make, message = BAD[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(GGUFError) as e:
        convert_gguf(path, out)
    assert str(path) in str(e.value) and message in str(e.value)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("case", BAD)
def test_cli_convert_reports_bad_gguf(tmp_path, monkeypatch, case):
    make, message = BAD[case]
    monkeypatch.setenv("MLX_INTENT_HOME", str(tmp_path / "home"))
    path = make(tmp_path)
    result = CliRunner().invoke(main, ["models", "convert", "--gguf", str(path), "--name", "bad"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # reported in words, no traceback
    assert "Traceback" not in result.output
    assert f"Error: {path}" in result.output and message in result.output


def test_cli_convert_succeeds(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_INTENT_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["models", "convert", "--gguf", str(GGUF), "--name", "smol"])
    assert result.exit_code == 0, result.output
    assert registry.is_mlx_folder(tmp_path / "smol")
    again = CliRunner().invoke(main, ["models", "convert", "--gguf", str(GGUF), "--name", "smol"])
    assert again.exit_code == 1 and "use --force" in again.output


def test_cli_convert_and_list_agree_on_the_home_they_are_given(tmp_path, monkeypatch):
    """``models convert`` and ``models list`` take the home setting (--home, --env-file) as classify does,
    with MLX_INTENT_HOME unset; neither writes it into the environment."""
    import os

    from mlx_intent import settings

    monkeypatch.delenv("MLX_INTENT_HOME", raising=False)
    monkeypatch.setattr(settings, "default_home", lambda: tmp_path / "default")
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "x"
    before = {k: v for k, v in os.environ.items() if k.startswith("MLX_INTENT")}  # mlx-lm sets others
    made = CliRunner().invoke(
        main, ["models", "convert", "--gguf", str(GGUF), "--name", "smollm2-135m", "--home", str(home)]
    )
    assert made.exit_code == 0, made.output
    assert registry.is_mlx_folder(home / "smollm2-135m")

    def state_of(output: str) -> str:
        cells = next(line for line in output.splitlines() if "smollm2-135m " in line).split()
        return cells[cells.index("smollm2-135m") + 1]

    listed = CliRunner().invoke(main, ["models", "list", "--home", str(home)])
    assert listed.exit_code == 0, listed.output
    assert f"models folder: {home}" in listed.output and state_of(listed.output) == "converted"
    env_file = tmp_path / "settings.env"
    env_file.write_text(f"MLX_INTENT_HOME={home}\n")
    from_file = CliRunner().invoke(main, ["models", "list", "--env-file", str(env_file)])
    assert from_file.exit_code == 0 and from_file.output == listed.output
    default = CliRunner().invoke(main, ["models", "list"])
    assert f"models folder: {tmp_path / 'default'}" in default.output and state_of(default.output) == "downloaded"
    assert {k: v for k, v in os.environ.items() if k.startswith("MLX_INTENT")} == before


def _tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else b"") for p in root.rglob("*"))


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "adapters", "Adapters", "data", "corpora", "e5-small", ".hub", "hub-state", "../x", "a/b"]
    + ["x.source"],
)
def test_cli_convert_refuses_a_name_that_is_not_a_plain_model_name(tmp_path, monkeypatch, name):
    """--name '' or '.' used to wipe the models folder, 'adapters' every adapter, '../x' a folder outside it."""
    home = tmp_path / "home"
    (home / "adapters" / "smollm2-135m").mkdir(parents=True)
    (home / "adapters" / "smollm2-135m" / "adapters.safetensors").write_bytes(b"lora")
    (home / "data").mkdir()
    (home / "data" / "train.jsonl").write_text("{}\n")
    (home / "e5-small").mkdir()
    (home / "e5-small" / "config.json").write_text("{}")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    before = _tree(tmp_path)
    monkeypatch.setenv("MLX_INTENT_HOME", str(home))
    result = CliRunner().invoke(main, ["models", "convert", "--gguf", str(GGUF), "--name", name, "--force"])
    assert result.exit_code == 2, result.output
    assert "plain model name" in result.output or "not directly in the models folder" in result.output
    assert _tree(tmp_path) == before


def test_cli_convert_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path, monkeypatch):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    monkeypatch.setenv("MLX_INTENT_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["models", "convert", "--gguf", str(GGUF), "--name", "notes", "--force"])
    assert result.exit_code == 1 and "not a converted MLX model" in result.output
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"
    with pytest.raises(GGUFError, match="not an MLX model folder"):
        convert_gguf(GGUF, tmp_path / "notes")
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine" and not list(tmp_path.glob(".*partial"))
