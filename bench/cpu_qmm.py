"""Quantized products on the CPU, one run: MLX's `quantized_matmul`, dequantize-in-slices + float32 GEMM (the path
without the extension) and bonsai's compiled kernel (bonsai_mlx/cpu/qmm.py), on the Qwen2.5-0.5B MLP shapes.

    python bench/cpu_qmm.py [--bits 4 8] [--rows 1 2 4 8 16 64 288] [--reps 20]

Per (bits, rows, shape): best-of-reps milliseconds of each path, the weight bytes read per ms (GB/s), and the
largest difference from dequantize-then-matmul relative to its largest magnitude. The machine's read bandwidth is
measured in the same run. Rows below the kernel's threshold (BONSAI_QMM_MANY_ROWS, default 8) take its row kernel,
the others its dequantized tiles + sgemm.
"""

from __future__ import annotations

import argparse
import time

import bonsai_mlx  # noqa: F401  (first: BLAS before mlx)

# isort: split
import mlx.core as mx

from bonsai_mlx.cpu import blas, qmm
from bonsai_mlx.cpu.quantized import dequantized_matmul
from bonsai_mlx.doctor import read_bandwidth

SHAPES = [(4864, 896), (896, 4864)]  # gate/up [N, K], down [N, K]


def best_ms(f, reps: int) -> float:
    mx.eval(f())
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(f())
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 288])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    print(f"BLAS: {blas.status}; kernel: {qmm.status()}; read bandwidth {read_bandwidth():.1f} GB/s")
    print(f"{'bits':>4} {'rows':>5} {'N×K':>10} {'mlx qmm ms':>11} {'dequant+gemm':>13} {'bonsai ms':>10} "
          f"{'bonsai GB/s':>12} {'max rel diff':>13}")
    for bits in args.bits:
        for n, k in SHAPES:
            w = mx.random.normal((n, k)) * 0.05
            wq, s, b = mx.quantize(w, group_size=64, bits=bits)
            mx.eval(wq, s, b)
            nbytes = wq.nbytes + s.nbytes + b.nbytes
            for rows in args.rows:
                x = mx.random.normal((rows, k))
                mx.eval(x)
                ref = x @ mx.dequantize(wq, s, b, group_size=64, bits=bits).T
                t_mlx = best_ms(lambda x=x, q=(wq, s, b), bits=bits: mx.quantized_matmul(x, *q, group_size=64, bits=bits),
                                max(2, args.reps // 4)) if rows <= 16 else float("nan")
                t_dq = best_ms(lambda x=x, q=(wq, s, b), bits=bits: dequantized_matmul(x, *q, 64, bits), args.reps)
                t_q = best_ms(lambda x=x, q=(wq, s, b), bits=bits: qmm.quantized_matmul(x, *q, 64, bits), args.reps)
                diff = float(mx.abs(qmm.quantized_matmul(x, wq, s, b, 64, bits) - ref).max() / mx.abs(ref).max())
                print(f"{bits:>4} {rows:>5} {f'{n}×{k}':>10} {t_mlx:>11.2f} {t_dq:>13.2f} {t_q:>10.2f} "
                      f"{nbytes / t_q / 1e6:>12.1f} {diff:>13.1e}", flush=True)


if __name__ == "__main__":
    main()
