"""GGUF (Llama architecture) to an MLX 4-bit model folder that ``mlx_lm.load`` opens.

The header is parsed here, before MLX touches the file, so that a truncated file, a
wrong magic or an unsupported tensor type gets an error that names the problem
instead of a crash deep inside ``mx.load``.  The weights themselves are read by
``mx.load``, which maps Q4_0/Q4_1/Q8_0 blocks straight onto MLX quantized tensors
(group size 32).  Output is always 4-bit, group size 32: 4-bit tensors are kept
bit for bit, everything else is quantized once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mlx_intent.staging import staging_dir

GGUF_MAGIC = b"GGUF"
GROUP_SIZE = 32
BITS = 4

# ggml tensor types: name, block size (elements), bytes per block.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    30: ("BF16", 1, 2),
}
SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF metadata value types: struct format for scalars; 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# The fewest bytes one item can take (a string: its length; an array: item type and count), so that a count
# is checked against what is left of the file before anything is allocated for it.
_MIN_BYTES = {**{t: struct.calcsize(f) for t, f in _SCALAR.items()}, _STRING: 8, _ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, ndim, type, offset
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays: llama.cpp writes none; a crafted file could recurse without end
# The metadata the converter reads: these are required, and must be positive integers.
REQUIRED_LLAMA = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")

# GGUF tensor names -> mlx-lm llama names.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Llama 3's split regex in front of byte-level BPE (GPT-2's is ByteLevel's own: use_regex=True).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "default": ("gpt2", False),
    "gpt2": ("gpt2", False),
    "smollm": ("gpt2", True),
    "starcoder": ("gpt2", True),
    "refact": ("gpt2", True),
    "llama-bpe": ("llama3", False),
    "llama3": ("llama3", False),
}


class GGUFError(ValueError):
    """A GGUF file this converter cannot read, with what is wrong in words: the one error a GGUF file, however
    malformed, makes read_header, check_supported or convert_gguf raise (the CLI reports it in words)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_start: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))


def _read(f: BinaryIO, n: int, what: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise GGUFError(f"{f.name}: file is truncated (ended while reading {what})")
    return b


def _unpack(f: BinaryIO, fmt: str, what: str) -> Any:
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt), what))[0]


def _left(f: BinaryIO) -> int:
    """Bytes from the current position to the end of the file."""
    return os.fstat(f.fileno()).st_size - f.tell()


def _count(f: BinaryIO, n: int, item_bytes: int, what: str) -> int:
    """``n`` items of at least ``item_bytes`` each must fit in the rest of the file: a corrupt count is an error
    here, not a MemoryError or an hour-long loop."""
    if n * item_bytes > _left(f):
        raise GGUFError(f"{f.name}: corrupt header ({n} items in {what}, more than the file can hold)")
    return n


def _string(f: BinaryIO, what: str) -> str:
    n = _count(f, _unpack(f, "<Q", what), 1, what)
    return _read(f, n, what).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, key: str, depth: int = 0) -> Any:
    if vtype in _SCALAR:
        return _unpack(f, _SCALAR[vtype], key)
    if vtype == _STRING:
        return _string(f, key)
    if vtype == _ARRAY:
        itype = _unpack(f, "<I", key)
        if itype not in _MIN_BYTES or (itype == _ARRAY and depth >= MAX_NESTING):
            raise GGUFError(f"{f.name}: corrupt header (array of type {itype} in {key!r})")
        n = _count(f, _unpack(f, "<Q", key), _MIN_BYTES[itype], repr(key))
        if itype in _SCALAR:  # read numeric arrays in one go
            fmt = _SCALAR[itype]
            raw = _read(f, struct.calcsize(fmt) * n, key)
            return list(struct.unpack(f"<{n}{fmt[1]}", raw))
        return [_value(f, itype, key, depth + 1) for _ in range(n)]
    raise GGUFError(f"{f.name}: corrupt header (unknown metadata type {vtype} for {key!r})")


def _alignment(path: Path, metadata: dict[str, Any]) -> int:
    """``general.alignment`` (default 32): a positive power of two, or the data offsets mean nothing."""
    alignment = metadata.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: corrupt header (general.alignment = {alignment!r}, expected a power of two)")
    return alignment


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF header and tensor table; check that the data is all there."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        version = _unpack(f, "<I", "version")
        if version not in (2, 3):
            raise GGUFError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = _count(f, _unpack(f, "<Q", "tensor count"), _MIN_TENSOR_BYTES, "the tensor table")
        n_kv = _count(f, _unpack(f, "<Q", "metadata count"), _MIN_KV_BYTES, "the metadata")
        metadata = {}
        for _ in range(n_kv):
            key = _string(f, "metadata key")
            metadata[key] = _value(f, _unpack(f, "<I", key), key)
        infos = []
        for _ in range(n_tensors):
            name = _string(f, "tensor name")
            ndim = _unpack(f, "<I", name)
            if ndim > MAX_DIMS:
                raise GGUFError(f"{path}: corrupt header (tensor {name!r} has {ndim} dimensions, at most {MAX_DIMS})")
            dims = [_unpack(f, "<Q", name) for _ in range(ndim)]
            ttype = _unpack(f, "<I", name)
            offset = _unpack(f, "<Q", name)
            if ttype not in GGML_TYPES:
                raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type {ttype}")
            tname, block, block_bytes = GGML_TYPES[ttype]
            count = 1
            for d in dims:
                count *= d
            infos.append(TensorInfo(name, tuple(reversed(dims)), tname, offset, count // block * block_bytes))
        alignment = _alignment(path, metadata)
        data_start = -(-f.tell() // alignment) * alignment
    end = max((t.offset + t.nbytes for t in infos), default=0)
    if infos and data_start + end > size:  # a vocabulary-only GGUF may end with its header
        raise GGUFError(f"{path}: file is truncated ({size} bytes, the tensor table needs {data_start + end})")
    return GGUFHeader(version, metadata, infos, data_start)


def check_supported(header: GGUFHeader, path: str | os.PathLike = "") -> None:
    """Raise GGUFError naming the architecture or tensor types this converter cannot handle."""
    if header.architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: unsupported architecture {header.architecture!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    bad = sorted({t.type_name for t in header.tensors if t.type_name not in SUPPORTED_TYPES})
    if bad:
        names = [t.name for t in header.tensors if t.type_name in bad][:3]
        raise GGUFError(
            f"{path}: unsupported tensor type(s) {', '.join(bad)} (e.g. {', '.join(names)}); "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )
    if any(t.name == "rope_freqs.weight" for t in header.tensors):
        raise GGUFError(f"{path}: unsupported: Llama 3.1-style rope scaling (rope_freqs tensor)")
    model = header.metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{path}: unsupported tokenizer model {model!r} (supported: byte-level BPE 'gpt2')")
    pre = header.metadata.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"{path}: unsupported pre-tokenizer {pre!r} (supported: {', '.join(sorted(_PRE_TOKENIZERS))})")
    _check_metadata(header.metadata, path)


def _check_metadata(meta: dict[str, Any], path: str | os.PathLike) -> None:
    """Every key model_config, tokenizer_config and build_tokenizer read: present where required, of its type."""

    def bad(key: str, expected: str) -> GGUFError:
        return GGUFError(f"{path}: bad metadata: {key} is {meta.get(key)!r}, expected {expected}")

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for key in REQUIRED_LLAMA:
        if f"llama.{key}" not in meta:
            raise GGUFError(f"{path}: missing metadata llama.{key} (required: llama.{', llama.'.join(REQUIRED_LLAMA)})")
    for key in (*REQUIRED_LLAMA, "attention.head_count_kv", "rope.dimension_count", "vocab_size", "context_length"):
        value = meta.get(f"llama.{key}", 1)
        if not integer(value) or value < 1:
            raise bad(f"llama.{key}", "a positive integer")
    for key in ("attention.layer_norm_rms_epsilon", "rope.freq_base"):
        value = meta.get(f"llama.{key}", 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise bad(f"llama.{key}", "a positive number")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise bad("tokenizer.ggml.tokens", "a list of strings")
    merges = meta.get("tokenizer.ggml.merges", [])
    vocab = set(tokens)
    if not isinstance(merges, list) or not all(
        isinstance(m, str) and " " in m and {*m.split(" ", 1), m.replace(" ", "", 1)} <= vocab for m in merges
    ):
        raise bad("tokenizer.ggml.merges", "a list of 'left right' strings of tokens (whose join is a token)")
    types = meta.get("tokenizer.ggml.token_type", [])
    if not isinstance(types, list) or not all(integer(t) for t in types):
        raise bad("tokenizer.ggml.token_type", "a list of integers")
    for key in ("bos", "eos", "unknown", "padding"):
        value = meta.get(f"tokenizer.ggml.{key}_token_id", 0)
        if not integer(value) or value < 0:
            raise bad(f"tokenizer.ggml.{key}_token_id", "a token id")
    if not isinstance(meta.get("tokenizer.chat_template", ""), str):
        raise bad("tokenizer.chat_template", "a string")


def mlx_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.scales``) to its mlx-lm name."""
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in _LAYER_NAMES:
            raise GGUFError(f"unexpected tensor {gguf_name!r}")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    if base not in _TOP_NAMES:
        raise GGUFError(f"unexpected tensor {gguf_name!r}")
    return f"{_TOP_NAMES[base]}.{suffix}"


def convert_weights(gguf_weights: dict) -> dict:
    """Rename to mlx-lm names and bring every matrix to 4-bit, group size 32."""
    import mlx.core as mx

    out = {}
    for name, w in gguf_weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        key = mlx_name(name)
        base = name[: -len(".weight")]
        scales = gguf_weights.get(f"{base}.scales")
        if scales is not None:
            biases = gguf_weights[f"{base}.biases"]
            bits = w.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
            if bits == BITS:
                out[key], out[key[:-6] + "scales"], out[key[:-6] + "biases"] = w, scales, biases
                continue
            w = mx.dequantize(w, scales, biases, group_size=GROUP_SIZE, bits=bits)
        if w.ndim == 2:
            q, s, b = mx.quantize(w.astype(mx.float16), group_size=GROUP_SIZE, bits=BITS)
            out[key], out[key[:-6] + "scales"], out[key[:-6] + "biases"] = q, s, b
        else:
            out[key] = w.astype(mx.float32)
    return out


def model_config(meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    """The mlx-lm llama config.  GGUF rows of Q/K are permuted for interleaved RoPE,
    so ``rope_traditional`` must be true, or the model emits garbage."""

    def g(key: str, default: Any = None) -> Any:
        return meta.get(f"llama.{key}", default)

    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(g("block_count")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(g("vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "max_position_embeddings": int(g("context_length", 2048)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rope_traditional": True,
        "tie_word_embeddings": tied,
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(meta.get("tokenizer.ggml.eos_token_id", 2)),
        "quantization": {"group_size": GROUP_SIZE, "bits": BITS},
    }


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a llama ``config`` (model_config's) needs, by mlx-lm name, with its shape unquantized."""
    hidden, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    per_layer = {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (ff, hidden),
        "mlp.up_proj": (ff, hidden),
        "mlp.down_proj": (hidden, ff),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
    }
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in per_layer.items()})
    if not config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def check_shapes(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str | os.PathLike) -> None:
    """Raise GGUFError where the architecture's numbers (``config``) and the tensors' ``shapes`` (mlx-lm names,
    unquantized) disagree: a crafted embedding_length of 7 converted, then killed classify with SIGFPE inside
    MLX's quantized embedding; a block_count of 1000 converted a model no load could fill."""
    layers = config["num_hidden_layers"]
    if layers > len(shapes):  # before listing them: a crafted count may be 2**32
        raise GGUFError(f"{where}: the metadata says {layers} layers; the file holds {len(shapes)} tensors in all")
    expected = expected_shapes(config)
    if missing := [name for name in expected if name not in shapes]:
        raise GGUFError(
            f"{where}: the metadata ({layers} layers) needs {len(missing)} tensors the file does not hold, "
            f"e.g. {missing[0]}"
        )
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise GGUFError(f"{where}: tensor {name} has shape {tuple(shapes[name])}, the metadata says {shape}")
    if extra := sorted(set(shapes) - set(expected)):
        raise GGUFError(f"{where}: {len(extra)} tensors the metadata has no place for, e.g. {extra[0]}")


def check_converted(folder: Path) -> None:
    """``check_shapes`` of a folder ``convert_gguf`` wrote (config.json and model.safetensors), before it loads;
    the weights are not read, only the safetensors header (quantized matrices unpacked by their scales)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    with open(folder / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    group = (config.get("quantization") or {}).get("group_size", GROUP_SIZE)
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__" or name.endswith((".scales", ".biases")):
            continue
        scales = header.get(name[: -len("weight")] + "scales")
        shape = tuple(info["shape"])
        shapes[name] = shape[:-1] + (scales["shape"][-1] * group,) if scales else shape
    check_shapes(config, shapes, folder)


def build_tokenizer(meta: dict[str, Any]):
    """Rebuild the byte-level BPE tokenizer (a ``tokenizers.Tokenizer``) from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    regex, digits = _PRE_TOKENIZERS[meta.get("tokenizer.ggml.pre", "default")]
    pre = []
    if digits:
        pre.append(pre_tokenizers.Digits(individual_digits=True))
    if regex == "llama3":
        pre.append(pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"))
        pre.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    else:
        pre.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
    tok.add_special_tokens(special)
    return tok


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and int(i) < len(tokens) else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok("bos"),
        "eos_token": tok("eos"),
        "unk_token": tok("unknown"),
        "pad_token": tok("padding") or tok("eos"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def _check_replaceable(out_dir: Path) -> None:
    """Only an earlier conversion (an MLX model folder: config.json and model*.safetensors) may be replaced."""
    if out_dir.is_symlink() or (
        out_dir.exists() and not ((out_dir / "config.json").is_file() and any(out_dir.glob("model*.safetensors")))
    ):
        raise GGUFError(f"{out_dir} exists and is not an MLX model folder; refusing to replace it")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress=None) -> Path:
    """Convert ``gguf_path`` into the model folder ``out_dir``, atomically.

    Everything is written to a temporary folder beside ``out_dir`` and renamed at
    the end, so an interrupted or failed conversion never leaves a half model.
    ``progress`` is an optional callable taking a short step description.
    """
    import mlx.core as mx

    say = progress or (lambda _msg: None)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    say("reading header")
    header = read_header(gguf_path)
    check_supported(header, gguf_path)
    tied = not any(t.name == "output.weight" for t in header.tensors)
    check_shapes(model_config(header.metadata, tied), {mlx_name(t.name): t.shape for t in header.tensors}, gguf_path)
    _check_replaceable(out_dir)
    tmp = staging_dir(out_dir)
    try:
        say("loading tensors")
        try:
            weights = mx.load(str(gguf_path))
        except (OSError, RuntimeError, ValueError) as e:
            raise GGUFError(f"{gguf_path}: MLX cannot read the tensors ({e})") from None
        meta = header.metadata  # checked by check_supported
        say("converting weights to 4-bit")
        converted = convert_weights(weights)
        mx.save_safetensors(str(tmp / "model.safetensors"), converted, metadata={"format": "mlx"})
        say("writing config and tokenizer")
        (tmp / "config.json").write_text(json.dumps(model_config(meta, tied), indent=2))
        build_tokenizer(meta).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2))
        (tmp / "gguf_source.json").write_text(
            json.dumps({"gguf": str(gguf_path.resolve()), "size": gguf_path.stat().st_size}, indent=2)
        )
        if out_dir.exists():
            _check_replaceable(out_dir)
            shutil.rmtree(out_dir)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say("done")
    return out_dir
