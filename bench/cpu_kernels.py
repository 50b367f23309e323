"""The kernel timings behind the CPU execution policy (bonsai_mlx/policy.py), in one run.

    python bench/cpu_kernels.py

One Qwen2.5-0.5B MLP-sized product (rows × 896 @ 896 × 4864) for 1 row (decode) and 200 rows (prefill):
float32 GEMM, bfloat16 GEMM, 4-bit `quantized_matmul`, and dequantize + float32 GEMM (the policy's prefill path).
Best of 5 after a warm-up; ratios against float32 last.
"""

from __future__ import annotations

import bonsai_mlx  # noqa: F401  (first: on Linux it loads OpenBLAS before mlx.core is imported)

# isort: split
import time

import mlx.core as mx

from bonsai_mlx import _blas


def best_ms(fn, reps: int = 5) -> float:
    fn()
    out = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out * 1e3


def main():
    w = mx.random.normal((4864, 896))
    wb = w.astype(mx.bfloat16)
    q, s, b = mx.quantize(w, 64, 4)
    mx.eval(w, wb, q, s, b)
    print(f"device {mx.default_device()}; BLAS: {_blas.status}")
    print(f"{'rows':>5}{'f32 ms':>10}{'bf16 ms':>10}{'q4 kernel ms':>14}{'dequant+f32 ms':>16}")
    for rows in (1, 200):
        x = mx.random.normal((rows, 896))
        xb = x.astype(mx.bfloat16)
        mx.eval(x, xb)
        f32 = best_ms(lambda x=x: mx.eval(x @ w.T))
        bf16 = best_ms(lambda xb=xb: mx.eval(xb @ wb.T))
        q4 = best_ms(lambda x=x: mx.eval(mx.quantized_matmul(x, q, s, b, True, 64, 4)))
        dq = best_ms(lambda x=x: mx.eval(x @ mx.dequantize(q, s, b, 64, 4).T))
        print(f"{rows:>5}{f32:>10.2f}{bf16:>10.2f}{q4:>14.2f}{dq:>16.2f}")
        print(f"      ratios to f32: bf16 {bf16 / f32:.1f}x, q4 kernel {q4 / f32:.1f}x, dequant+f32 {dq / f32:.1f}x")


if __name__ == "__main__":
    main()
