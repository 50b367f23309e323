"""4-bit prefill on the CPU: peak memory and time of the policy's sliced dequantize vs one whole-weight dequantize.

    python bench/cpu_dequant.py [--tokens 288] [--rounds 2]

Real-size random-weight student (Qwen2.5-0.5B shapes), LM quantized to 4 bits; the prefill of a --tokens prompt of
random embeddings (KV cache + last-position logits, as `bonsai_mlx.generate` runs it), once after a warm-up. The
baseline is the earlier `x @ dequantize(W).T` (the whole weight at once, scheduled wherever the lazy graph puts it);
each setting in its own process, alternating. Prints the peak memory above the loaded weights and the seconds.
"""

from __future__ import annotations

import bonsai_mlx  # noqa: F401  (first: on Linux it loads OpenBLAS before mlx.core is imported)

# isort: split
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternating_rounds, real_size_student  # noqa: E402

from bonsai_mlx.cpu import quantized  # noqa: E402
from bonsai_mlx.generate import prefill  # noqa: E402


def whole_dequantized_matmul(x, wq, scales, biases, group_size, bits):
    return x @ mx.dequantize(wq, scales, biases, group_size, bits).astype(x.dtype).T


def worker(tokens: int, setting: str) -> dict:
    if setting == "whole":
        quantized.dequantized_matmul = whole_dequantized_matmul
    model, _ = real_size_student(mx.float32, quantize=4, pack=False)  # MLX's layout: the slices path
    emb = mx.random.normal((tokens, 896)) * 0.02
    mx.eval(emb)

    def run():
        c = make_prompt_cache(model.language_model)
        mx.eval(prefill(model, emb, c), [x.state for x in c])

    run()  # warm-up
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    run()
    return {"s": time.perf_counter() - t0, "above_mb": (mx.get_peak_memory() - base) / 1e6, "weights_gb": base / 1e9}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=288, help="prompt length (the bench prompt with an image: 288)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("TOKENS", "SETTING"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(int(a.worker[0]), a.worker[1])))
        return
    res = alternating_rounds(__file__, {name: (a.tokens, name) for name in ("whole", "sliced")}, a.rounds)
    print(f"4-bit LM prefill of {a.tokens} tokens, {a.rounds} alternating rounds, one process each "
          f"(weights incl. vision: {res['sliced'][0]['weights_gb']:.3f} GB)")
    for name, rs in res.items():
        print(f"  {name:>6} dequantize: peak +{statistics.median([r['above_mb'] for r in rs]):.1f} MB above the "
              f"weights, median {statistics.median([r['s'] for r in rs]):.2f} s")
    w, s = (statistics.median([r["above_mb"] for r in rs]) for rs in res.values())
    print(f"peak above the weights, whole / sliced: {w / s:.2f}")


if __name__ == "__main__":
    main()
