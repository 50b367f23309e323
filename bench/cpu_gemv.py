"""Decode-size products on the CPU: MLX's matmul (cblas_sgemm) vs the policy's cblas_sgemv, streaming real-size weights.

    python bench/cpu_gemv.py [--rounds 5]

One decode step's worth of Qwen2.5-0.5B linears (24 layers × q, k, v, o, gate, up, down: 1.43 GB of float32
weights, more than any cache) and the tied LM head (151936 × 896, 545 MB), each multiplied by one row as in decode,
alternating the two paths round by round. Prints milliseconds and the read rate (weight bytes / time) for both, and
the machine's read bandwidth measured in the same run as the baseline. Both paths give the same products (max |diff|
printed).
"""

from __future__ import annotations

import bonsai_mlx  # noqa: F401  (first: on Linux it loads OpenBLAS before mlx.core is imported)

# isort: split
import argparse
import statistics
import time

import mlx.core as mx

from bonsai_mlx.cpu import blas as _blas
from bonsai_mlx.cpu import decode
from bonsai_mlx.doctor import read_bandwidth


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"device {mx.default_device()}; BLAS: {_blas.status}")
    shapes = [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)] * 24
    layers = [mx.random.normal(s) for s in shapes]
    head = mx.random.normal((151936, 896))
    mx.eval(layers, head)
    x = {896: mx.random.normal((1, 1, 896)), 4864: mx.random.normal((1, 1, 4864))}
    mx.eval(list(x.values()))
    gb_layers = sum(w.nbytes for w in layers) / 1e9
    gb_head = head.nbytes / 1e9

    def run(ws, use_gemv):
        t = time.perf_counter()
        for w in ws:
            if use_gemv:
                with decode.decoding():
                    y = decode.gemv(x[w.shape[1]], w)
                if y is None:
                    raise SystemExit("cblas_sgemv is not available (no OpenBLAS loaded): nothing to compare")
            else:
                y = x[w.shape[1]] @ w.T
            mx.eval(y)
        return time.perf_counter() - t

    times = {(part, g): [] for part in ("layers", "head") for g in (False, True)}
    for r in range(args.rounds + 1):  # round 0 warms up
        for g in ((False, True) if r % 2 else (True, False)):
            a, b = run(layers, g), run([head], g)
            if r:
                times[("layers", g)].append(a)
                times[("head", g)].append(b)
    bw = read_bandwidth()
    with decode.decoding():
        diff = float(mx.abs(decode.gemv(x[896], head) - x[896] @ head.T).max())
    print(f"{args.rounds} alternating rounds, medians; machine read bandwidth {bw:.1f} GB/s (same run)")
    print(f"{'':24}{'sgemm ms':>10}{'GB/s':>7}{'sgemv ms':>10}{'GB/s':>7}{'speed-up':>10}")
    for part, gb in (("layers", gb_layers), ("head", gb_head)):
        a, b = statistics.median(times[(part, False)]), statistics.median(times[(part, True)])
        name = f"{part} ({gb:.2f} GB)"
        print(f"{name:24}{a * 1e3:>10.1f}{gb / a:>7.1f}{b * 1e3:>10.1f}{gb / b:>7.1f}{a / b:>9.2f}x")
    print(f"head products: max |sgemv - sgemm| {diff:.1e}")


if __name__ == "__main__":
    main()
