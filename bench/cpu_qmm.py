"""Quantized products on the CPU, one run: MLX's `quantized_matmul`, dequantize-in-slices + float32 GEMM (the path
without the extension) and bonsai's compiled kernel (bonsai_mlx/cpu/qmm.py), on the Qwen2.5-0.5B MLP shapes.

    python bench/cpu_qmm.py [--bits 4 8] [--rows 1 2 4 8 16 64 288] [--reps 20] [--copies 24]

Per (bits, rows, shape): best-of-reps milliseconds of each path, the weight bytes read per ms (GB/s), and the
largest difference from dequantize-then-matmul relative to its largest magnitude. The machine's read bandwidth is
measured in the same run. Rows below the kernel's threshold (BONSAI_QMM_MANY_ROWS, default 8) take its row kernel,
the others its dequantized tiles + sgemm. "packed" (4-bit, where the CPU has AVX-512 VNNI): the same weights as
csrc/packed.h's 16-row tiles in 2 MB pages, as `io.load` holds them. Each timed product reads the next of --copies
copies of the weight (24: ~65 MB at 4 bits, beyond the L3 cache, as a decode step streams its weights from DRAM;
1: the cache-resident figure).
"""

from __future__ import annotations

import argparse
import itertools
import time

import bonsai_mlx  # noqa: F401  (first: BLAS before mlx)

# isort: split
import mlx.core as mx

from bonsai_mlx.cpu import blas, qmm
from bonsai_mlx.cpu.quantized import dequantized_matmul
from bonsai_mlx.doctor import read_bandwidth

SHAPES = [(4864, 896), (896, 4864)]  # gate/up [N, K], down [N, K]


def cycling(f, copies):
    """A call of f on the next of `copies` each time (the weights a product reads come from DRAM, not cache)."""
    nxt = itertools.cycle(copies).__next__
    return lambda: f(nxt())


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
    ap.add_argument("--copies", type=int, default=24, help="distinct weight copies the timed products cycle through")
    args = ap.parse_args()
    ext = qmm.extension()
    packed = ext is not None and ext.packed_kernel()
    print(f"BLAS: {blas.status}; kernel: {qmm.status()}; read bandwidth {read_bandwidth():.1f} GB/s")
    print(f"{'bits':>4} {'rows':>5} {'N×K':>10} {'mlx qmm ms':>11} {'dequant+gemm':>13} {'bonsai ms':>10} "
          f"{'bonsai GB/s':>12} {'max rel diff':>13}" + (f" {'packed ms':>10} {'packed GB/s':>12}" if packed else ""))
    for bits in args.bits:
        for n, k in SHAPES:
            qs = []
            for _ in range(args.copies):
                w = mx.random.normal((n, k)) * 0.05
                qs.append(mx.quantize(w, group_size=64, bits=bits))
                mx.eval(*qs[-1])
            wq, s, b = qs[0]
            nbytes = wq.nbytes + s.nbytes + b.nbytes
            tiles = []
            if packed and bits == 4:
                arena = ext.PageArena(args.copies * ext.PageArena.packed_bytes(n, k, 64))
                tiles = [arena.place_packed(*q, 64) for q in qs]
            for rows in args.rows:
                x = mx.random.normal((rows, k))
                mx.eval(x)
                ref = x @ mx.dequantize(wq, s, b, group_size=64, bits=bits).T
                t_mlx = best_ms(cycling(lambda q, x=x, bits=bits: mx.quantized_matmul(x, *q, group_size=64, bits=bits),
                                        qs), max(2, args.reps // 4)) if rows <= 16 else float("nan")
                t_dq = best_ms(cycling(lambda q, x=x, bits=bits: dequantized_matmul(x, *q, 64, bits), qs), args.reps)
                t_q = best_ms(cycling(lambda q, x=x, bits=bits: qmm.quantized_matmul(x, *q, 64, bits), qs), args.reps)
                diff = float(mx.abs(qmm.quantized_matmul(x, wq, s, b, 64, bits) - ref).max() / mx.abs(ref).max())
                line = (f"{bits:>4} {rows:>5} {f'{n}×{k}':>10} {t_mlx:>11.2f} {t_dq:>13.2f} {t_q:>10.2f} "
                        f"{nbytes / t_q / 1e6:>12.1f} {diff:>13.1e}")
                if tiles:
                    t_p = best_ms(cycling(lambda t, x=x, n=n: qmm.quantized_matmul(x, *t, 64, 4, packed_n=n), tiles),
                                  args.reps)
                    line += f" {t_p:>10.2f} {nbytes / t_p / 1e6:>12.1f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
