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
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mlx_intent import calibration
from mlx_intent.models import loading, registry
from mlx_intent.prompts import PROMPT_STYLES, clean_user_text, split_prompt
from mlx_intent.sampler import AnswerVocab, JSONMachine, Node, branch_probs, valid_children, write_answer
from mlx_intent.schema import INTENTS, MAX_INTENTS, validate
from mlx_intent.settings import MODES

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


def load_calibration(folder: Path | None, name: str = "LLM") -> calibration.Loaded:
    """The fit in ``folder``/calibration.json, checked; a bad file is warned about and the model answers raw."""
    return calibration.load([folder / CALIBRATION] if folder is not None else [], _parse_calibration, name)


class IntentClassifier:
    """One loaded model, its system-prompt cache and its answer grammar.

    ``IntentClassifier()`` picks the best available model, honouring LLM_MODEL and
    LLM_FALLBACK_MODEL (see ``loading.select_from_settings``); pass ``model_name`` to choose one, or an already
    loaded ``model``/``tokenizer`` pair.  ``home`` is the models folder (``Settings.home``; None: the
    registry default).  ``temperature`` is the calibration temperature of the confidence; ``sample`` makes
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
        self.name = model_name or loading.select_from_settings(home=home)
        self.spec = registry.get_spec(self.name)
        self.home = home
        # A LoRA adapter from `mlx-intent train` is used automatically, with the prompt it learnt.
        has_adapter = use_adapter and registry.has_adapter(self.name, home)
        adapter = registry.adapter_dir(self.name, home) if has_adapter else None
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
        # A calibration belongs to the weights as used: beside the adapter (committed) when there is one.
        self.calibration_dir = adapter or folder
        self.calibration = load_calibration(self.calibration_dir, self.name)  # .problems: files it ignored
        calib = self.calibration.fit or {}
        self.temperature = float(temperature if temperature is not None else calib.get("temperature", 1.0))
        self.threshold = float(threshold if threshold is not None else calib.get("threshold", DEFAULT_THRESHOLD))
        self.vocab = AnswerVocab(self.encode)
        self._specials = special_strings(tokenizer)
        parts = split_prompt(tokenizer, self.spec.chat_format, PROMPT_STYLES[style]())
        self.prefix_ids = self.encode(parts.prefix)
        self.suffix_ids = self.encode(parts.suffix)
        self._chain, self._branch = self._root_chain()
        # Branch points below the first name token, and the longest path to one of them:
        # it rides along at the end of every scoring row (see ``distributions``).
        self._deeper = [(node, path) for node, path in _branch_nodes(self._branch) if path]
        self._tail = max((path for _, path in self._deeper), key=len, default=[])
        self._system = self._system_cache(cache_dir or folder, adapter)

    # ---- tokens -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _root_chain(self) -> tuple[list[int], Node]:
        """The tokens every answer starts with, up to the first branch between names."""
        stem, node = self.vocab.stem()
        return [*self.vocab.prefix, *stem], node

    def query_ids(self, text: str) -> tuple[list[int], bool]:
        """Token ids of the cleaned user text, truncated to the budget, and whether it was."""
        cleaned = clean_user_text(text, self._specials) if isinstance(text, str) else ""
        if not cleaned:
            raise EmptyTextError("text is empty")
        ids = self.encode(cleaned)
        budget = min(MAX_QUERY_TOKENS, self.spec.context - len(self.prefix_ids) - 64)
        return ids[:budget], len(ids) > budget

    # ---- the model ----------------------------------------------------------------------------

    def _system_cache(self, folder: Path | None, adapter: Path | None) -> list[tuple]:
        """KV of the system prompt: computed once, saved next to the model, reused."""
        import mlx.core as mx
        from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

        dtype = str(self.model.model.embed_tokens.weight.dtype)
        stamp = (adapter / "adapters.safetensors").stat().st_mtime if adapter else None
        key = hashlib.sha256(json.dumps([self.prefix_ids, dtype, str(adapter), stamp]).encode()).hexdigest()[:16]
        path = folder / f"prompt_cache_{key}.safetensors" if folder else None
        if path is not None and path.is_file():
            try:
                cache = load_prompt_cache(str(path))
                os.utime(path)  # recently used: pruning keeps it
                return [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in cache]
            except Exception:  # a stale or damaged file is recomputed
                path.unlink(missing_ok=True)
        cache = make_prompt_cache(self.model)
        self.model(mx.array([self.prefix_ids]), cache=cache)
        mx.eval([c.state for c in cache])
        if path is not None:
            try:
                save_prompt_cache(str(path), cache)
                prune_prompt_caches(path.parent)
            except OSError:
                pass  # a read-only models folder only costs the prefill next time
        return [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in cache]

    def _batch_cache(self, rows: int):
        import mlx.core as mx
        from mlx_lm.models.cache import BatchKVCache

        caches = []
        for keys, values in self._system:
            c = BatchKVCache([0] * rows)
            c.keys, c.values = mx.repeat(keys, rows, axis=0), mx.repeat(values, rows, axis=0)
            c._idx = keys.shape[2]
            c.offset = mx.array([keys.shape[2]] * rows)
            caches.append(c)
        return caches

    def _hidden(self, rows: list[list[int]], cache, back: int = 0) -> tuple:
        """Run right-padded ``rows`` through the model; the hidden states at each row's last
        ``back + 1`` tokens, shape (rows, back + 1, dim)."""
        import mlx.core as mx

        width = max(len(r) for r in rows)
        pad = [width - len(r) for r in rows]
        x = mx.array([r + [_PAD] * p for r, p in zip(rows, pad)])
        if max(pad):
            for c in cache:
                c.prepare(right_padding=pad)
        h = self.model.model(x, cache=cache)
        if max(pad):
            for c in cache:
                c.finalize()  # rolls the padding to the left so rows continue where they end
        at = mx.array([[len(r) - 1 - back + j for j in range(back + 1)] for r in rows])
        return mx.take_along_axis(h, at[..., None], axis=1)

    def _logits(self, h, tokens: list[int]) -> np.ndarray:
        """Logits of ``tokens`` only (rows of the output matrix), for each hidden state."""
        import mlx.core as mx

        head = self.model.lm_head if "lm_head" in self.model else self.model.model.embed_tokens
        weight = head.weight
        if "scales" in head:  # quantized (Metal): full logits, then pick
            full = head(h) if head is getattr(self.model, "lm_head", None) else head.as_linear(h)
            out = full[:, mx.array(tokens)]
        else:
            out = h @ weight[mx.array(tokens)].T
        return np.array(out.astype(mx.float32))

    @staticmethod
    def _fork(cache, index: list[int], drop: int = 0):
        """Copies of rows ``index`` of a batch cache, without its last ``drop`` tokens."""
        import mlx.core as mx
        from mlx_lm.models.cache import BatchKVCache

        idx = mx.array(index)
        forks = []
        for c in cache:
            f = BatchKVCache([0] * len(index))
            end = c._idx - drop
            f.keys, f.values = c.keys[idx, :, :end], c.values[idx, :, :end]
            f.offset, f.left_padding, f._idx = c.offset[idx] - drop, c.left_padding[idx], end
            forks.append(f)
        return forks

    # ---- scoring ------------------------------------------------------------------------------

    def distributions(self, texts: list[str]) -> list[dict[str, float]]:
        """P(intent) for each text: the constrained sampler's probability of writing each name."""
        import mlx.core as mx

        # Names that share a first token need the model's next-token distribution deeper in
        # the trie.  The longest such path rides along at the end of every row (causal
        # attention leaves the earlier positions untouched), so one pass serves it and its
        # ancestors; any other branch point gets a small second pass, and only where the
        # first token left it real mass (elsewhere its share is split evenly).
        tail = self._tail
        rows = [self.query_ids(t)[0] + self.suffix_ids + self._chain + tail for t in texts]
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
        mx.clear_cache()
        return [_leaf_probs(self._branch, p) for p in probs]

    def _answer(self, dist: dict[str, float]) -> tuple[str, float, list[str]]:
        ranked = sorted(dist, key=dist.get, reverse=True)
        primary = ranked[0]
        extra = [n for n in ranked[1:MAX_INTENTS] if dist[n] >= self.threshold]
        return primary, dist[primary], [primary, *extra]

    def classify_batch(self, texts: list[str], mode: str | None = None) -> list[dict]:
        """Classify several texts together (one batched pass); same answers as one at a time."""
        mode = mode or self.mode
        if mode == "generate":
            return [self.classify(t, mode="generate") for t in texts]
        start = time.perf_counter()
        truncated = [self.query_ids(t)[1] for t in texts]
        dists = self.distributions(list(texts))
        elapsed = (time.perf_counter() - start) * 1000
        results = []
        for dist, trunc in zip(dists, truncated):
            primary, conf, all_intents = self._answer(dist)
            machine = write_answer(self.vocab, primary, conf, all_intents)
            results.append(self._result(machine, dist, elapsed, trunc, "score"))
        return results

    def classify(self, text: str, mode: str | None = None) -> dict:
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "score":
            return self.classify_batch([text], mode)[0]
        *_, result = self.stream(text)
        return result

    # ---- generation ---------------------------------------------------------------------------

    def stream(
        self, text: str, temperature: float | None = None, seed: int | None = None, sample: bool | None = None
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
        ids, truncated = self.query_ids(text)
        rng = np.random.default_rng(seed)
        machine = JSONMachine(self.vocab, max_intents=MAX_INTENTS)
        pending = ids + self.suffix_ids + machine.forced_run()
        cache = self._batch_cache(1)
        dist: dict[str, float] = {}
        written = ""
        while not machine.done:
            h = self._hidden([pending], cache)[:, -1]
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
        if machine.primary:
            dist = {machine.primary: machine.confidence}
        elapsed = (time.perf_counter() - start) * 1000
        if len(machine.text) > len(written):
            yield machine.text[len(written) :]
        yield self._result(machine, dist, elapsed, truncated, "generate")

    def _result(self, machine: JSONMachine, dist: dict, elapsed_ms: float, truncated: bool, mode: str) -> dict:
        answer = validate(json.loads(machine.text))
        top = sorted(dist.items(), key=lambda kv: kv[1], reverse=True)[:5]
        return {
            **answer,
            "model": self.name,
            "tier": self.name,
            "mode": mode,
            "latency_ms": round(elapsed_ms, 2),
            "truncated": truncated,
            "json": machine.text,
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


def special_strings(tokenizer) -> list[str]:
    """Every special token's text, longest first: the declared ones and every added token marked
    special (SmolLM2's <filename>, <jupyter_code>... are not in ``all_special_tokens``)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    found = {*getattr(tokenizer, "all_special_tokens", []), *(t.content for t in added.values() if t.special)}
    return sorted(found - {""}, key=len, reverse=True)


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


_DEFAULT: dict[str, IntentClassifier] = {}


def classify(text: str, model: str | None = None, mode: str = "score", user: str | None = None) -> dict:
    """Classify one text with a shared classifier (loaded on first use); the result's ``id`` is its own, as
    the chain's are (``mlx_intent.feedback``).  ``ambiguous`` says whether its top two intents are closer than
    ``user``'s margin (``mlx-intent users``; else MLX_INTENT_MARGIN).  One model has no tier to pass a text
    to: a user's min_confidence takes effect in the chain (``build_chain().classify(text, user=)``)."""
    from mlx_intent.chain import top_gap
    from mlx_intent.feedback import check_user, new_id, user_thresholds
    from mlx_intent.settings import load_settings

    settings = load_settings()
    limits = (user_thresholds(settings.home)(check_user(user)) if user is not None else None) or {}
    name = model or loading.select_from_settings()
    if name not in _DEFAULT:
        _DEFAULT[name] = IntentClassifier(name)
    result = _DEFAULT[name].classify(text, mode=mode)
    gap = top_gap(result)
    ambiguous = gap is not None and gap < limits.get("margin", settings.margin)
    return {**result, "ambiguous": ambiguous, "id": new_id()}
