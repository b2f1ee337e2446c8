"""The LLM classifier: single-pass intent scoring (default) and constrained generation.

Scoring mode runs one forward pass over the user's tokens (the system prompt's KV
cache is computed once per loaded model), then reads the probability of every
intent name from the sampler's token trie: the first branch point comes free with
that pass, and so do the deeper branch points (names sharing a first token) on the
one path appended to the row; any others get one small batched pass.  The JSON is then
written by the sampler in forced mode.
Generation mode lets the constrained sampler write the JSON token by token, with
jump-forward over forced stretches.  Both report the same calibrated confidence.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mlx_intent import calibration
from mlx_intent.models import cache as kv
from mlx_intent.models import loading, registry
from mlx_intent.prompts import PROMPT_STYLES, chat_prompt, clean_user_text, special_strings
from mlx_intent.sampler import AnswerVocab, JSONMachine, Node, branch_probs, valid_children
from mlx_intent.schema import INTENTS, MAX_INTENTS
from mlx_intent.settings import MODES, settings_home

CALIBRATION = "calibration.json"
DEFAULT_THRESHOLD = 0.2  # a second intent joins all_intents at this probability
KEEP_PROMPT_CACHES = 4  # system-prompt KV caches kept per model folder (prompt styles x adapter or not)
SKIP_MASS = 2e-5  # deeper branch points below this mass are skipped (error < SKIP_MASS / 2)
MAX_QUERY_TOKENS = 512  # longer queries are truncated (and flagged)
_PAD = 0


class EmptyTextError(ValueError):
    """Text that is empty or only whitespace / control characters."""


def _parse_calibration(record: dict, path: Path) -> dict[str, float]:
    """temperature (required, in calibration.T_RANGE: 0 would make every confidence 1.0) and threshold (in (0, 1])."""
    return {
        "temperature": calibration.number(record, "temperature", *calibration.T_RANGE),
        "threshold": calibration.number(record, "threshold", 0.0, 1.0, default=DEFAULT_THRESHOLD, open_low=True),
    }


def load_calibration(folder: Path | None, name: str = "LLM", home_fit: Path | None = None) -> calibration.Loaded:
    """The fit in ``folder``/calibration.json, checked; a bad file is warned about and the model answers raw.
    ``home_fit``: a fit under the models home for a shipped adapter in ``folder`` (which `mlx-intent calibrate`
    never writes into), preferred while it names that adapter's weights."""
    if folder is None:
        return calibration.load([], _parse_calibration, name)
    if home_fit is None:
        return calibration.load([folder / CALIBRATION], _parse_calibration, name)

    def parse(record: dict, path: Path) -> dict[str, float]:
        if path == home_fit and record.get("weights") != adapter_fingerprint(folder):
            raise calibration.CalibrationError(f"fitted for other weights than {folder} (refit: mlx-intent calibrate)")
        return _parse_calibration(record, path)

    return calibration.load([home_fit, folder / CALIBRATION], parse, name)


def shipped_adapter_fit(name: str, adapter: Path | None, home: Path) -> Path | None:
    """Where `mlx-intent calibrate` keeps the fit for ``adapter`` when it is one the package ships (under the
    models home: never written into the package); None for an adapter trained into the home, or none."""
    if adapter is None or registry.PACKAGED_ADAPTERS not in Path(adapter).resolve().parents:
        return None
    return calibration.home_file(name, home)


def model_calibration(name: str, home: Path) -> calibration.Loaded | None:
    """The fit model ``name`` reads as it would load now (its adapter's, else its folder's); None when it is
    not on disk.  For `models list`."""
    adapter = registry.find_adapter(name, home)
    weights = registry.resolve_dir(name, home)
    folder = adapter or (registry.state_dir(weights, home) if weights is not None else None)
    return None if folder is None else load_calibration(folder, name, shipped_adapter_fit(name, adapter, home))


def adapter_fingerprint(folder: Path) -> str:
    """What a fit under the models home was fitted for: the adapter's weights and config."""
    return calibration.fingerprint(sorted(p for p in folder.iterdir() if p.name != CALIBRATION and p.is_file()))


class IntentClassifier:
    """One loaded model, its system-prompt cache and its answer grammar.

    ``IntentClassifier()`` picks the best available model, honouring LLM_MODEL and
    LLM_FALLBACK_MODEL (see ``loading.select_from_settings``); pass ``model_name`` to choose one, or an already
    loaded ``model``/``tokenizer`` pair.  ``home`` is the models folder (``Settings.home``; None:
    ``settings_home()``).  ``temperature`` is the calibration temperature of the confidence; ``sample`` makes
    generate mode sample at the model's recommended sampling temperature (``ModelSpec.temperature``)
    instead of decoding greedily.
    """

    def __init__(
        self,
        model_name: str | None = None,
        *,
        model=None,
        tokenizer=None,
        mode: str = "score",
        temperature: float | None = None,
        threshold: float | None = None,
        use_adapter: bool = True,
        cache_dir: Path | None = None,
        home: Path | None = None,
        sample: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        home = settings_home() if home is None else Path(home).expanduser()  # a library call: as the settings
        self.name = model_name or loading.select_from_settings(home=home)
        self.spec = registry.get_spec(self.name)
        self.home = home
        # A LoRA adapter from `mlx-intent train` is used automatically, with the prompt it learnt.
        adapter = registry.find_adapter(self.name, home) if use_adapter else None
        self.adapter = adapter
        style = (
            json.loads((adapter / "adapter_config.json").read_text()).get("prompt_style", "full") if adapter else "full"
        )
        if model is None:
            model, tokenizer = loading.load(self.name, adapter=adapter, home=home)
        self.model, self.tokenizer = model, tokenizer
        self.mode = mode
        self.sample = sample
        folder = registry.resolve_dir(self.name, home)
        # The project's files for these weights: never inside a Hub snapshot, which huggingface-hub owns.
        own = registry.state_dir(folder, home) if folder is not None else None
        # A calibration belongs to the weights as used: beside the adapter when there is one, else in ``own``.
        # The package's own adapter is never written into: `mlx-intent calibrate` keeps its fit under the home.
        self.calibration_dir = adapter or own
        home_fit = shipped_adapter_fit(self.name, adapter, home)
        # where a new fit goes (none for a model given in memory, with no folder)
        self.calibration_file = home_fit or (self.calibration_dir / CALIBRATION if self.calibration_dir else None)
        self.calibration_weights = adapter_fingerprint(adapter) if home_fit else None
        self.calibration = load_calibration(self.calibration_dir, self.name, home_fit)  # .problems: files ignored
        calib = self.calibration.fit or {}
        self.temperature = float(temperature if temperature is not None else calib.get("temperature", 1.0))
        self.threshold = float(threshold if threshold is not None else calib.get("threshold", DEFAULT_THRESHOLD))
        self.vocab = AnswerVocab(self.encode)
        self._specials = special_strings(tokenizer)
        self.prompt = chat_prompt(tokenizer, self.spec.chat_format, PROMPT_STYLES[style]())
        self.prefix_ids, self.suffix_ids = self.prompt.prefix, self.prompt.suffix
        self._chain, self._branch = self._root_chain()
        # Branch points below the first name token, and the longest path to one of them:
        # it rides along at the end of every scoring row (see ``distributions``).
        self._deeper = [(node, path) for node, path in _branch_nodes(self._branch) if path]
        self._tail = max((path for _, path in self._deeper), key=len, default=[])
        self._own = own
        self._cache_path = self._cache_file(cache_dir or own, folder, adapter)
        self._system, self._from_disk = self._system_cache()

    # ---- tokens -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _root_chain(self) -> tuple[list[int], Node]:
        """The tokens every answer starts with, up to the first branch between names."""
        stem, node = self.vocab.stem()
        return [*self.vocab.prefix, *stem], node

    def query_ids(self, text: str, context: Sequence[str] = ()) -> tuple[list[int], bool]:
        """Token ids of the cleaned user text, truncated to the budget, and whether it was; after them its
        earlier turns (``context``, oldest first), each a user message, the newest that fit in the model's context."""
        cleaned = clean_user_text(text, self._specials) if isinstance(text, str) else ""
        if not cleaned:
            raise EmptyTextError("text is empty")
        ids = self.prompt.user(cleaned)
        room = self.spec.context - len(self.prefix_ids) - 64
        budget = min(MAX_QUERY_TOKENS, room)
        earlier: list[int] = []
        for turn in reversed(context):  # whole turns, newest first
            turn = clean_user_text(turn, self._specials)
            piece = self.prompt.earlier([turn]) if turn else []
            if len(piece) + len(earlier) + min(len(ids), budget) > room:
                break
            earlier = piece + earlier
        return earlier + ids[:budget], len(ids) > budget

    # ---- the model ----------------------------------------------------------------------------

    def _cache_file(self, folder: Path | None, weights: Path | None, adapter: Path | None) -> Path | None:
        """Where the system prompt's KV cache is saved: keyed on the prompt's tokens, the dtype, and the weights
        (the model's and the adapter's files, by size and time), so that weights restored or replaced never
        meet a cache computed from others."""
        if folder is None:
            return None
        files = sorted(weights.glob("model*.safetensors")) if weights else []
        files += [adapter / "adapters.safetensors"] if adapter else []
        stamps = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
        dtype = str(self.model.model.embed_tokens.weight.dtype)
        key = json.dumps([self.prefix_ids, dtype, str(weights), str(adapter), stamps])
        return folder / f"prompt_cache_{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"

    def _system_cache(self, reuse: bool = True) -> tuple[list[tuple], bool]:
        """KV of the system prompt: computed once, saved with the project's files for the model (``state_dir``),
        reused; and whether it was read from the file.  A file that does not hold a sound cache for this prompt is
        replaced; a cache that is not finite (damaged weights) is never saved, and the model cannot be used."""
        path = self._cache_path
        if reuse and path is not None and path.is_file():
            try:
                system = kv.load(path, len(self.model.layers), len(self.prefix_ids))
                os.utime(path)  # recently used: pruning keeps it
                return system, True
            except Exception:  # damaged, stale or foreign: computed again below
                path.unlink(missing_ok=True)
        system = kv.prefill(self.model, self.prefix_ids)
        if not kv.is_finite(system):
            raise kv.NotFiniteError(f"{self.name}: the model gives NaN or infinite values (damaged weights?)")
        if path is not None:
            try:
                if path.parent == self._own:  # the project's folder for these weights, made on first use
                    path.parent.mkdir(parents=True, exist_ok=True)
                kv.save(path, system)
                prune_prompt_caches(path.parent)
            except (OSError, RuntimeError, ValueError):  # read-only or full folder (MLX raises RuntimeError)
                pass  # costs the prefill next time, not the model
        return system, False

    def _rebuilt(self, run):
        """``run()``; if it fails with a cache read from disk, once more with the cache computed afresh (a file
        that loaded but does not work is replaced)."""
        try:
            return run()
        except EmptyTextError:
            raise
        except Exception:
            if not self._from_disk:
                raise
            if self._cache_path is not None:
                self._cache_path.unlink(missing_ok=True)
            self._system, self._from_disk = self._system_cache(reuse=False)
            return run()

    def _batch_cache(self, rows: int):
        return kv.batch(self._system, rows)

    def _hidden(self, rows: list[list[int]], cache, back: int = 0) -> tuple:
        """Run right-padded ``rows`` through the model; the hidden states at each row's last
        ``back + 1`` tokens, shape (rows, back + 1, dim)."""
        import mlx.core as mx

        width = max(len(r) for r in rows)
        pad = [width - len(r) for r in rows]
        x = mx.array([r + [_PAD] * p for r, p in zip(rows, pad)])
        h = kv.forward(self.model.model, x, cache, pad)
        at = mx.array([[len(r) - 1 - back + j for j in range(back + 1)] for r in rows])
        return mx.take_along_axis(h, at[..., None], axis=1)

    def _logits(self, h, tokens: list[int]) -> np.ndarray:
        """Logits of ``tokens`` only (rows of the output matrix), for each hidden state."""
        import mlx.core as mx

        head = self.model.lm_head if "lm_head" in self.model else self.model.model.embed_tokens
        rows = mx.array(tokens)
        if "scales" in head:  # quantized (Metal): the packed rows, their scales and biases, not the whole vocabulary
            biases = head["biases"][rows] if "biases" in head else None
            out = mx.quantized_matmul(
                h,
                head.weight[rows],
                head.scales[rows],
                biases,
                transpose=True,
                group_size=head.group_size,
                bits=head.bits,
                mode=head.mode,
            )
        else:
            out = h @ head.weight[rows].T
        if "bias" in head:  # an output layer with a bias of its own
            out = out + head.bias[rows]
        return np.array(out.astype(mx.float32))

    @staticmethod
    def _fork(cache, index: list[int], drop: int = 0):
        """Copies of rows ``index`` of a batch cache, without its last ``drop`` tokens."""
        return kv.fork(cache, index, drop)

    # ---- scoring ------------------------------------------------------------------------------

    def distributions(
        self, texts: list[str], contexts: Sequence[Sequence[str]] | None = None
    ) -> list[dict[str, float]]:
        """P(intent) for each text (after its earlier turns, ``contexts``): the constrained sampler's probability
        of writing each name."""
        queries = self._queries(texts, contexts)
        return self._rebuilt(lambda: self._distributions([ids for ids, _ in queries]))

    def _queries(
        self, texts: list[str], contexts: Sequence[Sequence[str]] | None = None
    ) -> list[tuple[list[int], bool]]:
        """Each text's query ids (after its earlier turns) and whether it was truncated: tokenized once a query."""
        return [self.query_ids(t, c) for t, c in zip(texts, contexts or [()] * len(texts))]

    def _distributions(self, queries: list[list[int]]) -> list[dict[str, float]]:
        # Names that share a first token need the model's next-token distribution deeper in
        # the trie.  The longest such path rides along at the end of every row (causal
        # attention leaves the earlier positions untouched), so one pass serves it and its
        # ancestors; any other branch point gets a small second pass, and only where the
        # first token left it real mass (elsewhere its share is split evenly).
        tail = self._tail
        rows = [ids + self.suffix_ids + self._chain + tail for ids in queries]
        cache = self._batch_cache(len(rows))
        h = self._hidden(rows, cache, back=len(tail))
        allowed = frozenset(INTENTS)
        probs = [{} for _ in rows]  # per row: node id -> child probabilities
        todo = []
        for node, path in [(self._branch, []), *self._deeper]:
            kids = valid_children(node, allowed)
            if path == tail[: len(path)]:
                for i, row_logits in enumerate(self._logits(h[:, len(path)], kids)):
                    probs[i][id(node)] = dict(zip(kids, branch_probs(row_logits, self.temperature)))
            else:
                todo += [(i, node, path) for i in range(len(rows))]
        todo = [(i, node, path) for i, node, path in todo if probs[i][id(self._branch)][path[0]] >= SKIP_MASS]
        if todo:
            forks = self._fork(cache, [i for i, _, _ in todo], drop=len(tail))
            h = self._hidden([path for _, _, path in todo], forks)[:, -1]
            for j, (i, node, _) in enumerate(todo):
                kids = valid_children(node, allowed)
                logits = self._logits(h[j : j + 1], kids)[0]
                probs[i][id(node)] = dict(zip(kids, branch_probs(logits, self.temperature)))
        return [_leaf_probs(self._branch, p) for p in probs]

    def _answer(self, dist: dict[str, float]) -> tuple[str, float, list[str]]:
        ranked = sorted(dist, key=dist.get, reverse=True)
        primary = ranked[0]
        extra = [n for n in ranked[1:MAX_INTENTS] if dist[n] >= self.threshold]
        return primary, dist[primary], [primary, *extra]

    def classify_batch(
        self, texts: list[str], mode: str | None = None, contexts: Sequence[Sequence[str]] | None = None
    ) -> list[dict]:
        """Classify several texts together (one batched pass); same answers as one at a time.  ``contexts``: each
        text's earlier user turns of the conversation, oldest first (in the chat before it)."""
        mode = mode or self.mode
        contexts = contexts or [()] * len(texts)
        if mode == "generate":
            return [self.classify(t, mode="generate", context=c) for t, c in zip(texts, contexts)]
        start = time.perf_counter()
        queries = self._queries(list(texts), contexts)  # the truncation flag does not depend on the context
        dists = self._rebuilt(lambda: self._distributions([ids for ids, _ in queries]))
        elapsed = (time.perf_counter() - start) * 1000
        return [
            self._result(*self._answer(dist), dist, elapsed, truncated, "score")
            for dist, (_, truncated) in zip(dists, queries)
        ]

    def classify(self, text: str, mode: str | None = None, context: Sequence[str] = ()) -> dict:
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "score":
            return self.classify_batch([text], mode, [context])[0]
        *_, result = self.stream(text, context=context)
        return result

    # ---- generation ---------------------------------------------------------------------------

    def stream(
        self,
        text: str,
        temperature: float | None = None,
        seed: int | None = None,
        sample: bool | None = None,
        context: Sequence[str] = (),
    ) -> Iterator[str | dict]:
        """Constrained generation: yields pieces of JSON text as they are decided, then the result.

        ``temperature`` 0 is greedy; above 0 samples among the valid tokens at that temperature.  None (the
        default) is greedy unless ``sample`` (default: the classifier's ``sample``) asks for sampling, which
        then runs at the model's recommended temperature, ``ModelSpec.temperature`` (0 for the bundled
        model: greedy still).  The confidence is the calibrated probability of the primary's path, never
        typed, whatever the sampling."""
        if temperature is None:
            sample = self.sample if sample is None else sample
            temperature = self.spec.temperature if sample else 0.0
        start = time.perf_counter()
        ids, truncated = self.query_ids(text, context)
        rng = np.random.default_rng(seed)
        machine = JSONMachine(self.vocab, max_intents=MAX_INTENTS)
        pending = ids + self.suffix_ids + machine.forced_run()

        def first_pass():
            cache = self._batch_cache(1)
            return cache, self._hidden([pending], cache)[:, -1]

        cache, h = self._rebuilt(first_pass)  # the first pass, before anything is written, may rebuild the cache
        dist: dict[str, float] = {}
        written = ""
        while not machine.done:
            allowed = machine.allowed()
            logits = self._logits(h, allowed)[0]
            probs = branch_probs(logits, self.temperature)
            if temperature > 0:
                pick = int(rng.choice(len(allowed), p=branch_probs(logits, temperature)))
            else:
                pick = int(np.argmax(probs))
            machine.advance(allowed[pick], float(probs[pick]))
            pending = [allowed[pick]] + machine.forced_run()
            partial = self.tokenizer.decode(machine.tokens)
            if len(partial) > len(written) and "\ufffd" not in partial:
                yield partial[len(written) :]
                written = partial
            if not machine.done:
                h = self._hidden([pending], cache)[:, -1]
        if machine.primary:
            dist = {machine.primary: machine.confidence}
        elapsed = (time.perf_counter() - start) * 1000
        if len(machine.text) > len(written):
            yield machine.text[len(written) :]
        answer = (machine.primary, machine.confidence, machine.all_intents)
        yield self._result(*answer, dist, elapsed, truncated, "generate")

    def _result(
        self,
        primary: str,
        confidence: float,
        all_intents: list[str],
        dist: dict,
        elapsed_ms: float,
        truncated: bool,
        mode: str,
    ) -> dict:
        """The result of an answer the grammar allows (valid by construction: the chain validates it once), with
        ``json``, the text the machine writes for it (``AnswerVocab.answer_text``: no machine walked, nothing
        parsed back)."""
        text = self.vocab.answer_text(primary, confidence, all_intents)
        written = round(min(max(float(confidence), 0.0), 1.0), 4)  # the confidence as the text says it
        top = sorted(dist.items(), key=lambda kv: kv[1], reverse=True)[:5]
        return {
            "primary_intent": primary,
            "confidence": written,
            "all_intents": list(all_intents),
            "model": self.name,
            "tier": self.name,
            "mode": mode,
            "latency_ms": round(elapsed_ms, 2),
            "truncated": truncated,
            "json": text,
            "top": [[name, round(float(p), 4)] for name, p in top],
        }


def prune_prompt_caches(folder: Path, keep: int = KEEP_PROMPT_CACHES) -> list[Path]:
    """Delete all but the ``keep`` most recently used system-prompt caches in ``folder``.

    Each prompt, adapter or dtype gets its own file (about 12 MB for SmolLM2, 47 MB in float32
    with the full prompt); without pruning, every change to them would leave one behind."""
    caches = sorted(folder.glob("prompt_cache_*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in caches[keep:]:
        stale.unlink(missing_ok=True)
    return caches[keep:]


def _branch_nodes(node: Node, path: tuple[int, ...] = ()) -> Iterator[tuple[Node, list[int]]]:
    """Every node with more than one child, and the tokens from ``node`` to it."""
    if node.leaf is not None:
        return
    if len(node.children) > 1:
        yield node, list(path)
    for tok, child in node.children.items():
        yield from _branch_nodes(child, (*path, tok))


def _leaf_probs(root: Node, probs: dict[int, dict[int, float]]) -> dict[str, float]:
    """Multiply child probabilities down the trie: P(name) for every leaf."""
    out: dict[str, float] = {}

    def walk(node: Node, p: float) -> None:
        if node.leaf is not None:
            out[node.leaf] = p
            return
        table = probs.get(id(node))
        for tok, child in node.children.items():
            walk(child, p * (table[tok] if table is not None else 1.0 / len(node.children)))

    walk(root, 1.0)
    return {name: out[name] for name in INTENTS}
