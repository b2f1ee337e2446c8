"""What the Metal changes of issue 24 save, measured on whatever device MLX runs here (Metal on a Mac).

Run:  python benchmarks/bench_metal.py [--repeats 20]

1. Scoring reads the logits of the names' first tokens (about 15 rows of the output matrix) instead of the whole
   vocabulary's, from a 4-bit head as Metal keeps it: the head's time for one query, at the vocabulary and width of
   SmolLM2-135M (49,152 x 576) and Llama 3.2 3B (128,256 x 3,072), random 4-bit weights.
2. No ``mx.clear_cache()`` after every batch: the bundled model's scoring of one query at a time, with the cache
   cleared after each (as before) and kept (as now), alternating.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from common import percentile, save_report

from mlx_intent.models import backend

backend.use_openblas()  # before MLX's first import, as classify does (else MLX's slow built-in BLAS)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

REPORT = Path(__file__).resolve().parent / "reports" / "metal-cpu.md"
HEADS = {"SmolLM2-135M": (49_152, 576), "Llama 3.2 3B": (128_256, 3_072)}
ROWS = 15  # the primary trie's first tokens: at most one per intent


def _ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return percentile(times, 50)


def head_rows(repeats: int) -> list[str]:
    lines = ["| head (vocabulary x width) | whole vocabulary, then pick (ms) | 15 rows (ms) |", "|---|---:|---:|"]
    for name, (vocab, width) in HEADS.items():
        head = nn.QuantizedEmbedding(vocab, width, group_size=64, bits=4)
        mx.eval(head.parameters())
        h = mx.random.normal((1, width))
        rows = mx.arange(ROWS) * 997 % vocab

        def whole(head=head, h=h, rows=rows):
            mx.eval(head.as_linear(h)[:, rows])

        def picked(head=head, h=h, rows=rows):
            w, scales, biases = head.weight[rows], head.scales[rows], head.biases[rows]
            mx.eval(mx.quantized_matmul(h, w, scales, biases, group_size=64, bits=4))

        lines.append(f"| {name} ({vocab:,} x {width:,}) | {_ms(whole, repeats):.2f} | {_ms(picked, repeats):.3f} |")
    return lines


def cache_rows(repeats: int) -> list[str]:
    from mlx_intent.classifier import IntentClassifier

    clf = IntentClassifier("smollm2-135m", use_adapter=False)
    texts = ["Where can I eat fish near Galata?", "Is Topkapı open on Tuesday?", "taxi to the airport"]
    cleared, kept = [], []
    for i in range(repeats):
        for text in texts:
            for clear in ((True, False) if i % 2 else (False, True)):
                start = time.perf_counter()
                clf.classify_batch([text])
                if clear:
                    mx.clear_cache()
                (cleared if clear else kept).append((time.perf_counter() - start) * 1000)
    return [
        "| bundled SmolLM2, scoring one query | p50 ms | p95 ms |",
        "|---|---:|---:|",
        f"| cache cleared after every batch (before) | {percentile(cleared, 50):.1f} | {percentile(cleared, 95):.1f} |",
        f"| cache kept (now) | {percentile(kept, 50):.1f} | {percentile(kept, 95):.1f} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = backend.device_name()
    report = [
        "# Metal changes, measured here",
        "",
        f"Command: `python benchmarks/bench_metal.py --repeats {args.repeats}`; MLX {mx.__version__} on **{device}**, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}.",
        "",
        "Output head of one query, 4-bit (as Metal keeps it; on the CPU `classify` dequantizes to float32 and has",
        "always read only the rows it needs):",
        "",
        *head_rows(args.repeats),
        "",
        *cache_rows(args.repeats),
        "",
    ]
    save_report("\n".join(report), REPORT)


if __name__ == "__main__":
    main()
