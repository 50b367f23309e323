"""`bonsai-mlx doctor`: what this machine gives MLX, measured, and what that means for the student's speed.

Measures in-process: f32 GEMM GFLOP/s (the BLAS that MLX's CPU matmuls land in), 4-bit quantized matmul GFLOP/s,
and memory read bandwidth (NumPy reductions, one thread per core). Decode of a 0.5 B-parameter LM reads every weight once per token, so
its ceiling is bandwidth / weight bytes; prefill and training are GEMM-bound.
"""

from __future__ import annotations

import platform
import sys
import time

import mlx.core as mx

from .cpu import blas as _blas
from .cpu import qmm
from .cpu.pages import thp_mode

LM_PARAMS = 494_032_768  # Qwen2.5-0.5B, measured by `bonsai-mlx info`


def _best(fn, reps: int = 5) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(size: int = 1024, bandwidth_mb: int = 512) -> dict:
    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a, b)
    gemm = 2 * size**3 / _best(lambda: mx.eval(a @ b)) / 1e9
    wq, scales, biases = mx.quantize(b, group_size=64, bits=4)
    x = mx.random.normal((64, size))
    mx.eval(wq, scales, biases, x)
    q4 = 2 * 64 * size * size / _best(lambda: mx.eval(mx.quantized_matmul(x, wq, scales, biases, True, 64, 4))) / 1e9
    out = {"gemm_f32_gflops": gemm, "q4_matmul_gflops": q4, "read_bandwidth_gbs": read_bandwidth(bandwidth_mb)}
    if qmm.available() and mx.default_device() == mx.cpu:
        # the 4-bit products a CPU student's decode step runs: bonsai's kernel, one row, over 64 different weights
        # (64 MB: from memory, as in a decode step, and many calls, so one call's fixed cost does not dominate)
        x1 = x[:1]
        ws = [mx.quantize(mx.random.normal((size, size)), group_size=64, bits=4) for _ in range(64)]
        mx.eval(x1, ws)
        nbytes = sum(a.nbytes for w in ws for a in w)
        ext = qmm.extension()
        if ext.packed_kernel():  # as inference holds them (cpu/pages.py): 16-row tiles in 2 MB pages
            arena = ext.PageArena(len(ws) * ext.PageArena.packed_bytes(size, size, 64))
            ws = [arena.place_packed(*w, 64) for w in ws]
            t1 = _best(lambda: mx.eval([qmm.quantized_matmul(x1, *w, 64, 4, packed_n=size) for w in ws]))
        else:
            t1 = _best(lambda: mx.eval([qmm.quantized_matmul(x1, *w, 64, 4) for w in ws]))
        out["q4_decode_gbs"] = nbytes / t1 / 1e9
        del ws
        out["q4_kernel_gflops"] = 2 * 64 * size * size / _best(
            lambda: mx.eval(qmm.quantized_matmul(x, wq, scales, biases, 64, 4))) / 1e9
    return out


def read_bandwidth(mb: int = 512) -> float:
    """GB/s of reading a large float32 array with one NumPy reduction per core (NumPy releases the GIL)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = os.cpu_count() or 1
    chunks = np.array_split(np.ones(mb * (1 << 20) // 4, dtype=np.float32), n)
    with ThreadPoolExecutor(n) as pool:
        t = _best(lambda: list(pool.map(np.sum, chunks)), reps=3)
    return sum(c.nbytes for c in chunks) / t / 1e9


def report() -> dict:
    m = measure()
    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "platform": f"{platform.system()} {platform.machine()}, Python {sys.version.split()[0]}",
        "blas": _blas.status,
        "quantized_kernel": qmm.status(),
        "transparent_huge_pages": thp_mode(),
        **m,
        "decode_ceiling_f32_tok_s": m["read_bandwidth_gbs"] * 1e9 / (LM_PARAMS * 4),
        # 4 bits per weight + a float32 scale and bias per group of 64 (the CPU keeps them in float32)
        "decode_ceiling_4bit_tok_s": m["read_bandwidth_gbs"] * 1e9 / (LM_PARAMS * 5 / 8),
        "prefill_estimate_f32_tok_s": m["gemm_f32_gflops"] * 1e9 / (2 * LM_PARAMS),
    }


def advice(r: dict) -> list:
    out = []
    if r["device"].startswith("Device(cpu") and r["gemm_f32_gflops"] < 20:
        out.append(f"GEMM runs at {r['gemm_f32_gflops']:.0f} GFLOP/s: MLX is on its bundled reference BLAS ({r['blas']}). "
                   "Install OpenBLAS (apt install libopenblas0-pthread) — about 50x faster prefill and training.")
    on_cpu = r["device"].startswith("Device(cpu")
    if on_cpu and "q4_kernel_gflops" in r:
        out.append(f"4-bit runs on bonsai's kernel ({r['quantized_kernel']}): decode reads 4-bit weights at "
                   f"{r['q4_decode_gbs']:.1f} GB/s, 64-row products {r['q4_kernel_gflops']:.0f} GFLOP/s; --quantize 4 "
                   "is the fast choice for decode on this CPU and takes a quarter of float32's memory.")
    elif on_cpu and r["q4_matmul_gflops"] < r["gemm_f32_gflops"] / 4:
        out.append(f"4-bit matmuls run at {r['q4_matmul_gflops']:.1f} GFLOP/s against {r['gemm_f32_gflops']:.0f} for "
                   f"float32 ({r['quantized_kernel']}): on this CPU 4-bit saves memory but costs speed; use "
                   "--quantize none where memory allows, or reinstall bonsai-mlx with a C++ compiler for the kernel.")
    return out
