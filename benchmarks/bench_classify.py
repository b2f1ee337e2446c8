"""Latency, memory and JSON validity of the classifier's modes, against free generation and llama.cpp.

Run:  python benchmarks/bench_classify.py [--queries benchmarks/data/bench_queries.jsonl]
          [--report benchmarks/reports/classify.md] [--naive-limit N] [--no-llama-cpp]

One process, one model (the bundled SmolLM2-135M), one machine, one pass per approach over
the same queries after one warm-up query each:

- scoring: ``IntentClassifier.classify(mode="score")``, one forward pass per query;
- generation: ``classify(mode="generate")``, the constrained sampler with jump-forward;
- batch: ``classify_batch`` over batches of 8 (queries per second);
- naive: ``mlx_lm.generate`` of the same prompt tokens, unconstrained, no prompt cache,
  ``max_tokens`` 60, then ``json.loads`` and the schema;
- llama.cpp: ``llama-cpp-python`` on the same GGUF with a grammar from the JSON schema, the
  same system prompt through its chat handler (it keeps the previous prompt's KV, so the
  system prompt is computed once, as ours is).  Optional: ``pip install -e '.[bench]'``.

The mask time is the time spent in ``JSONMachine.allowed`` and ``advance`` during generation,
per token the machine emits (forced tokens included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from common import percentile, read_jsonl, save_report

from mlx_intent import prompts, schema
from mlx_intent.evaluation.bench import BATCH, NAIVE_MAX_TOKENS, naive_answer, package_version
from mlx_intent.evaluation.bench import valid_json as is_valid
from mlx_intent.metrics import MB, peak_rss_mb

# mlx_intent loads OpenBLAS on import; mlx.core is only imported inside the functions, after it.
from mlx_intent.models import backend, registry
from mlx_intent.sampler import JSONMachine

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
MAX_TOKENS = NAIVE_MAX_TOKENS  # llama.cpp's limit too


class MaskTimer:
    """Time spent in the machine's mask and transitions; nested calls (advance checks allowed)
    are counted once."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.tokens = 0
        self._depth = 0
        self._saved = {name: getattr(JSONMachine, name) for name in ("allowed", "advance")}

    def _wrap(self, fn: Callable, counts_token: bool) -> Callable:
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self._depth -= 1
                self.tokens += counts_token

        return timed

    def __enter__(self) -> MaskTimer:
        JSONMachine.allowed = self._wrap(self._saved["allowed"], False)
        JSONMachine.advance = self._wrap(self._saved["advance"], True)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(JSONMachine, name, fn)


def timed_run(name: str, texts: list[str], answer: Callable[[str], str]) -> dict:
    """Latency per query and validity of each answer; peak MLX memory since the start."""
    import mlx.core as mx

    answer(texts[0])  # warm-up: first-call allocations and kernel set-up are not a query's cost
    mx.reset_peak_memory()
    latencies, parsed, valid = [], 0, 0
    for text in texts:
        start = time.perf_counter()
        out = answer(text)
        latencies.append((time.perf_counter() - start) * 1000)
        ok_json, ok_schema = is_valid(out)
        parsed += ok_json
        valid += ok_schema
    print(f"{name}: {len(texts)} queries, p50 {percentile(sorted(latencies), 50):.0f} ms", file=sys.stderr)
    return {
        "name": name,
        "n": len(texts),
        "ms": sorted(latencies),
        "json": parsed,
        "valid": valid,
        "peak": mx.get_peak_memory(),
        "load": os.getloadavg()[0],
    }


def run_batches(clf, texts: list[str]) -> dict:
    import mlx.core as mx

    clf.classify_batch(texts[:BATCH])  # warm-up
    mx.reset_peak_memory()
    latencies, parsed, valid = [], 0, 0
    start_all = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        start = time.perf_counter()
        results = clf.classify_batch(texts[i : i + BATCH])
        latencies.append((time.perf_counter() - start) * 1000)
        for res in results:
            ok_json, ok_schema = is_valid(res["json"])
            parsed += ok_json
            valid += ok_schema
    total = time.perf_counter() - start_all
    return {
        "name": f"batch of {BATCH} (latency per batch)",
        "n": len(texts),
        "ms": sorted(latencies),
        "json": parsed,
        "valid": valid,
        "peak": mx.get_peak_memory(),
        "qps": len(texts) / total,
        "load": os.getloadavg()[0],
    }


def run_llama_cpp(texts: list[str], threads: int) -> dict | None:
    """llama.cpp with a JSON-schema grammar on the bundled GGUF; None when not installed."""
    try:
        from llama_cpp import Llama, LlamaGrammar
    except ImportError:
        return None
    gguf = registry.bundled_gguf(registry.get_spec(MODEL))
    before = peak_rss_mb() * MB
    llm = Llama(str(gguf), n_ctx=2048, n_threads=threads, n_gpu_layers=-1, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(schema.JSON_SCHEMA), verbose=False)
    system = prompts.system_prompt()

    tokens = []

    def answer(text: str) -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        out = llm.create_chat_completion(messages, grammar=grammar, temperature=0.0, max_tokens=MAX_TOKENS)
        tokens.append(out["usage"]["completion_tokens"])
        return out["choices"][0]["message"]["content"]

    result = timed_run("llama.cpp", texts, answer)
    result["peak"] = None  # not MLX memory
    result["rss"] = peak_rss_mb() * MB - before
    result["chat_format"] = llm.chat_format
    result["tokens"] = sum(tokens[1:]) / len(texts)  # the warm-up call excluded
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=Path, default=ROOT / "benchmarks/data/bench_queries.jsonl")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/reports/classify.md")
    parser.add_argument("--naive-limit", type=int, default=None, help="run the naive approach on the first N only")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = parser.parse_args(argv)

    rows = read_jsonl(args.queries)
    texts = [r["text"] for r in rows]
    languages = Counter(r.get("lang", "?") for r in rows)
    load_before = os.getloadavg()
    # llama.cpp first: its RSS growth is then not hidden under the MLX model's peak.
    llama = None if args.no_llama_cpp else run_llama_cpp(texts, args.threads)

    from mlx_intent.classifier import IntentClassifier

    start = time.perf_counter()
    clf = IntentClassifier(MODEL, use_adapter=False)  # the full prompt, as llama.cpp gets
    load_s = time.perf_counter() - start
    runs = [timed_run("scoring", texts, lambda t: clf.classify(t, mode="score")["json"])]
    with MaskTimer() as mask:
        runs.append(timed_run("generation", texts, lambda t: clf.classify(t, mode="generate")["json"]))
    mask_us = mask.seconds / max(1, mask.tokens) * 1e6
    runs.append(run_batches(clf, texts))

    naive_texts = texts[: args.naive_limit] if args.naive_limit else texts
    runs.append(timed_run("naive (free generation + json.loads)", naive_texts, lambda t: naive_answer(clf, t)))
    if llama is not None:
        runs.append(llama)
    load_after = os.getloadavg()

    report = render(args, runs, languages, mask_us, mask.tokens, load_s, (load_before, load_after), llama)
    save_report(report, args.report)
    return 0


def render(args, runs, languages, mask_us, mask_tokens, load_s, loads, llama) -> str:
    import mlx.core as mx

    load_before, load_after = loads
    by_name = {r["name"]: r for r in runs}
    p50 = {name: percentile(r["ms"], 50) for name, r in by_name.items()}
    queries = args.queries.resolve()
    shown = queries.relative_to(ROOT) if queries.is_relative_to(ROOT) else queries
    command = f"python benchmarks/bench_classify.py --queries {shown}"
    if args.naive_limit:
        command += f" --naive-limit {args.naive_limit}"
    if args.no_llama_cpp:
        command += " --no-llama-cpp"
    rows = []
    for r in runs:
        peak = f"{r['peak'] / 2**20:.0f} MiB" if r["peak"] is not None else f"n/a (RSS +{r['rss'] / 2**20:.0f} MiB)"
        qps = f"{r['qps']:.2f}" if "qps" in r else f"{1000 * r['n'] / sum(r['ms']):.2f}"
        rows.append(
            f"| {r['name']} | {r['n']} | {percentile(r['ms'], 50):.0f} | {percentile(r['ms'], 95):.0f} | "
            f"{percentile(r['ms'], 99):.0f} | {qps} | {peak} | "
            f"{r['json'] / r['n']:.0%} | {r['valid'] / r['n']:.0%} | {r['load']:.1f} |"
        )

    def target(label: str, ok: bool | None, detail: str) -> str:
        mark = "n/a" if ok is None else ("met" if ok else "**missed**")
        return f"| {label} | {detail} | {mark} |"

    llama_p50 = p50.get("llama.cpp")
    naive_p50 = p50["naive (free generation + json.loads)"]
    ours = [by_name["scoring"], by_name["generation"], by_name[f"batch of {BATCH} (latency per batch)"]]
    targets = [
        target(
            "scoring p50 ≤ ½ llama.cpp p50",
            None if llama_p50 is None else p50["scoring"] <= llama_p50 / 2,
            f"{p50['scoring']:.0f} ms vs {llama_p50:.0f} / 2 ms" if llama_p50 else "llama.cpp not run",
        ),
        target(
            "scoring p50 ≤ 1/10 naive p50",
            p50["scoring"] <= naive_p50 / 10,
            f"{p50['scoring']:.0f} ms vs {naive_p50:.0f} / 10 ms",
        ),
        target(
            "generation p50 ≤ llama.cpp p50",
            None if llama_p50 is None else p50["generation"] <= llama_p50,
            f"{p50['generation']:.0f} ms vs {llama_p50:.0f} ms" if llama_p50 else "llama.cpp not run",
        ),
        target(
            "100% valid JSON (our modes)",
            all(r["valid"] == r["n"] for r in ours),
            ", ".join(f"{r['name']} {r['valid']}/{r['n']}" for r in ours),
        ),
    ]
    device = backend.device_name()
    on_cpu = device == "cpu"
    blas = f" (OpenBLAS: {backend.use_openblas() or 'no'})" if on_cpu else ""
    weights = "MLX dequantizes it to float32 on the CPU" if on_cpu else "kept 4-bit by MLX"
    lines = [
        "# Classifier benchmark: scoring, generation, batch vs free generation and llama.cpp",
        "",
        f"Reproduce: `{command}`",
        "",
        f"- Device: MLX on **{device}**{blas}; "
        f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"- mlx {mx.__version__}, mlx-lm {package_version('mlx-lm')}, "
        f"llama-cpp-python {package_version('llama-cpp-python')}",
        f"- Load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in load_before)} at the start, "
        f"{', '.join(f'{x:.1f}' for x in load_after)} at the end (a shared machine inflates every figure)",
        f"- Model: {MODEL} (bundled GGUF, Q4_1; {weights}), no adapter, "
        f"full system prompt ({len(prompts.system_prompt())} characters); classifier set-up {load_s:.1f} s",
        f"- Queries: `{shown}`, {by_name['scoring']['n']} hand-written travel queries "
        f"({', '.join(f'{lang} {n}' for lang, n in languages.items())})",
        "",
        "## Results",
        "",
        "Latency per query in ms (batch: per batch of 8); peak memory is MLX's (`mx.get_peak_memory`, reset "
        "before each approach: weights plus activations); JSON = parses, valid = follows the schema; load = "
        "1-minute load average when the approach finished.",
        "",
        "| approach | n | p50 ms | p95 ms | p99 ms | queries/s | peak memory | JSON | valid | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Mask time in generation: **{mask_us:.1f} µs per token** (JSONMachine.allowed + advance, "
        f"{mask_tokens} tokens over {by_name['generation']['n']} queries: "
        f"{mask_us * mask_tokens / 1e3 / sum(by_name['generation']['ms']):.2%} of the generation time).",
        "",
        "## Targets",
        "",
        "| target | figures | |",
        "|---|---|---|",
        *targets,
        "",
        "## Notes",
        "",
        "- Naive: the same prompt tokens as ours through `mlx_lm.generate`, greedy, no prompt cache (the "
        f"system prompt is prefilled for every query), at most {MAX_TOKENS} tokens, then `json.loads` and "
        "`schema.validate`.",
        "- llama.cpp: "
        + (
            f"chat format `{llama['chat_format']}` from the GGUF, `LlamaGrammar.from_json_schema(JSON_SCHEMA)`, "
            f"greedy, {args.threads} threads, all layers offloaded where a GPU build allows; "
            f"{llama['tokens']:.0f} tokens per answer on average ({MAX_TOKENS} at most). The grammar "
            "carries the schema's `maxItems` but cannot express `uniqueItems`, \"all_intents starts with "
            "primary_intent\" or (in practice) the bounds of `confidence`: the model mostly repeats one "
            "intent in all_intents, writes a confidence out of range, or runs into the token limit. "
            "Its threads wait for each other by spinning, so a busy machine slows it "
            "most: compare the load column."
            if llama
            else "not run (`pip install -e '.[bench]'` installs llama-cpp-python)."
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
