"""The server's batched decode step alone, one run: B sequences (each with its own 250-token KV cache) take one token
each through the real-size random 4-bit student — `CPUDecoderBlock.decode_rows` (one op per block for all rows) and
the head — for B = 1, 2, 4, 8, in alternating rounds (medians). Beside it, the same step's weight products alone (the
24 layers' 7 products on B rows, bonsai's kernel), which says how much of a row's cost batching can share.

    python bench/serve_step.py [--rounds 3] [--steps 20] [--context 250]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bonsai_mlx  # noqa: F401,E402  (first: BLAS before mlx)

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--context", type=int, default=250)
    args = ap.parse_args()

    from common import real_size_student
    from mlx_lm.models.cache import make_prompt_cache

    from bonsai_mlx.cpu import accelerate, qmm
    from bonsai_mlx.cpu.decode import decoding
    from bonsai_mlx.language import lm_head

    model, _ = real_size_student(mx.float32)
    lm = model.language_model
    nn.quantize(lm, group_size=64, bits=4)
    accelerate(model, pack=True)  # as the server's `load` does
    print(f"real-size random student, 4-bit, {args.context}-token caches; kernel: {qmm.status()}", flush=True)
    sizes = (1, 2, 4, 8)
    caches = {}
    for B in sizes:
        rows = []
        for _ in range(B):
            c = make_prompt_cache(lm)
            lm(mx.array([list(range(3, 3 + args.context))]), cache=c)
            mx.eval([x.state for x in c])
            rows.append(c)
        caches[B] = rows
    lins = [m for layer in lm.model.layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                      layer.self_attn.v_proj, layer.self_attn.o_proj,
                                                      layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]

    def step(B):
        rows = caches[B]
        h = lm.model.embed_tokens(mx.array([[5]] * B))  # [B, 1, D]
        for i, layer in enumerate(lm.model.layers):
            h = layer.decode_rows(h, [c[i] for c in rows])
        y = mx.argmax(lm_head(lm, lm.model.norm(h))[:, 0], axis=-1)
        mx.eval(y)
        for c in rows:  # keep every cache at its length
            for x in c:
                x.offset -= 1

    xs = {B: {k: mx.random.normal((B, k)) for k in (896, 4864)} for B in sizes}
    mx.eval(xs)

    def product(m, B):
        if "packed_weight" in m:  # 16-row tiles (csrc/packed.h)
            k = m["packed_weight"].shape[1] // 8
            return qmm.quantized_matmul(xs[B][k], m["packed_weight"], m["packed_scales"], m["packed_biases"],
                                        m.group_size, 4, decode=True, packed_n=m.packed_n)
        return qmm.quantized_matmul(xs[B][m.weight.shape[1] * 32 // m.bits], m["weight"], m["scales"], m["biases"],
                                    m.group_size, m.bits, decode=True)

    def products(B):
        mx.eval([product(m, B) for m in lins])

    steps = {B: [] for B in sizes}
    prods = {B: [] for B in sizes}
    with decoding():
        for B in sizes:
            step(B)
            products(B)
        for _ in range(args.rounds):
            for B in sizes:
                t = time.perf_counter()
                for _ in range(args.steps):
                    step(B)
                steps[B].append((time.perf_counter() - t) / args.steps * 1e3)
                t = time.perf_counter()
                for _ in range(args.steps):
                    products(B)
                prods[B].append((time.perf_counter() - t) / args.steps * 1e3)
    s1, p1 = statistics.median(steps[1]), statistics.median(prods[1])
    for B in sizes:
        s, p = statistics.median(steps[B]), statistics.median(prods[B])
        print(f"  B={B}: step {s:.1f} ms (×{s / s1:.2f} of B=1) = {B * 1e3 / s:.1f} tok/s aggregate (×{B * s1 / s:.2f});"
              f" products alone {p:.1f} ms (×{p / p1:.2f}); per round {', '.join(f'{v:.1f}' for v in steps[B])}",
              flush=True)


if __name__ == "__main__":
    main()
