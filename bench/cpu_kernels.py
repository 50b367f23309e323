"""The kernel timings behind the CPU execution policy (bonsai_mlx/cpu/), in one run.

    python bench/cpu_kernels.py

One Qwen2.5-0.5B MLP-sized product (rows × 896 @ 896 × 4864) for 1 row (decode) and 200 rows (prefill):
float32 GEMM, bfloat16 GEMM, 4-bit `quantized_matmul`, and dequantize + float32 GEMM (the policy's prefill path).
Best of 5 after a warm-up; ratios against float32 last.

Then the transcendental functions at Qwen2.5-0.5B / SigLIP-B prefill sizes (240 × 4864 SwiGLU, 196 × 3072 tanh-GELU,
attention 14 heads × 240² causal with 2 KV heads, 12 × 196² bidirectional): MLX's own ops against the policy's fast
CPU paths (rational tanh, fast-softmax attention), with the largest absolute difference.
"""

from __future__ import annotations

import bonsai_mlx  # noqa: F401  (first: on Linux it loads OpenBLAS before mlx.core is imported)

# isort: split
import time

import mlx.core as mx

from bonsai_mlx.cpu import blas as _blas


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

    import mlx.nn as nn

    from bonsai_mlx.cpu.activations import fast_gelu_tanh, fast_swiglu
    from bonsai_mlx.cpu.attention import fast_sdpa
    from bonsai_mlx.cpu.decode import sliced_head
    from bonsai_mlx.cpu.policy import CPU_CACHE_LIMIT

    mx.set_cache_limit(CPU_CACHE_LIMIT)  # as `accelerate` does for a loaded model

    g, u, h = mx.random.normal((240, 4864)) * 3, mx.random.normal((240, 4864)), mx.random.normal((196, 3072)) * 3
    q, k, v = mx.random.normal((1, 14, 240, 64)), mx.random.normal((1, 2, 240, 64)), mx.random.normal((1, 2, 240, 64))
    vq, vk, vv = (mx.random.normal((1, 12, 196, 64)) for _ in range(3))
    head, x1 = mx.random.normal((151936, 896)), mx.random.normal((1, 896))
    cases = [
        ("SwiGLU 240x4864", lambda: nn.silu(g) * u, lambda: fast_swiglu(g, u)),
        ("tanh-GELU 196x3072", lambda: nn.gelu_approx(h), lambda: fast_gelu_tanh(h)),
        ("attention causal 14x240^2", lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal"),
         lambda: fast_sdpa(q, k, v, 0.125, "causal")),
        ("attention 12x196^2", lambda: mx.fast.scaled_dot_product_attention(vq, vk, vv, scale=0.125),
         lambda: fast_sdpa(vq, vk, vv, 0.125)),
        ("tied head decode 1x151936", lambda: x1 @ head.T, lambda: sliced_head(x1, head)),
    ]
    print(f"\n{'':28}{'MLX ms':>9}{'fast ms':>9}{'speed-up':>10}{'max |diff|':>12}")
    for name, ref, fast in cases:
        a, b = best_ms(lambda ref=ref: mx.eval(ref())), best_ms(lambda fast=fast: mx.eval(fast()))
        diff = float(mx.abs(ref() - fast()).max())
        print(f"{name:28}{a:>9.2f}{b:>9.2f}{a / b:>9.1f}x{diff:>12.1e}")


if __name__ == "__main__":
    main()
