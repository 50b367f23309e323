"""LM prefill on the CPU with MLX's default 32 MB buffer cache vs the policy's 1 GB, alternating, one process each.

    python bench/cpu_prefill.py [--tokens 287] [--rounds 3]

Real-size random-weight student (Qwen2.5-0.5B shapes, float32); the KV cache of a --tokens prompt of random
embeddings is evaluated (as mlx-lm's prefill does: no logits), once after a warm-up prefill. Prints the best and
median seconds, the minor page faults of the timed prefill and the peak memory per cache limit; the ratio last.
"""

from __future__ import annotations

import bonsai_mlx  # noqa: F401  (first: on Linux it loads OpenBLAS before mlx.core is imported)

# isort: split
import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternating_rounds, real_size_student  # noqa: E402

from bonsai_mlx.cpu.policy import CPU_CACHE_LIMIT  # noqa: E402


def worker(tokens: int, limit: int) -> dict:
    """One fresh process per measurement: the allocator's history (glibc adapts its mmap threshold to what was
    freed before) would otherwise carry over from one setting to the next."""
    model, _ = real_size_student(mx.float32)
    mx.set_cache_limit(limit)  # after the model: building it applied the policy's limit
    lm = model.language_model
    emb = mx.random.normal((1, tokens, 896)) * 0.02
    ids = mx.zeros((1, tokens), dtype=mx.int32)
    mx.eval(emb, ids)

    def prefill():
        c = make_prompt_cache(lm)
        lm(ids, cache=c, input_embeddings=emb)
        mx.eval([x.state for x in c])

    prefill()  # warm-up, as a generate call after loading would be
    mx.reset_peak_memory()
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    prefill()
    return {"s": time.perf_counter() - t0, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
            "peak_gb": mx.get_peak_memory() / 1e9}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=287, help="prompt length (the bench prompt with an image: 287+1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", nargs=2, type=int, metavar=("TOKENS", "LIMIT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return
    limits = {"default 32 MB": 32 << 20, f"policy {CPU_CACHE_LIMIT >> 20} MB": CPU_CACHE_LIMIT}
    res = alternating_rounds(__file__, {name: (a.tokens, limit) for name, limit in limits.items()}, a.rounds)
    print(f"LM prefill of {a.tokens} tokens (KV cache only), {a.rounds} alternating rounds, one process each")
    for name, rs in res.items():
        ts = [r["s"] for r in rs]
        print(f"  {name:>16}: best {min(ts):.3f} s, median {statistics.median(ts):.3f} s, "
              f"{statistics.median([r['faults'] for r in rs]):,.0f} minor faults, peak {rs[0]['peak_gb']:.2f} GB")
    a_, b_ = (statistics.median([r["s"] for r in rs]) for rs in res.values())
    print(f"median default / policy: {a_ / b_:.2f}")


if __name__ == "__main__":
    main()
