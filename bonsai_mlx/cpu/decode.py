"""Decode-sized products on the CPU: one-row float32 products by cblas_sgemv, the tied head in vocabulary slices."""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import blas
from .device import PREFILL_ROWS, fast_ok, on_cpu

# --- decode products through cblas_sgemv ---------------------------------------------------------------------------
# MLX computes every product with cblas_sgemm, and OpenBLAS 0.3.21's sgemm packs the weight matrix even for a single
# row: a decode step streams its weights at 15-17 GB/s where cblas_sgemv reaches 25-29 GB/s on the same matrices
# (`python bench/cpu_gemv.py`). While `decoding()` is active (generate sets it around mlx-lm's decode steps), the
# float32 one-row products of the LM's linears and tied head call cblas_sgemv of the BLAS that `blas` loaded, on
# numpy views of the weights (no copies) and of the input, which this evaluates: a synchronous step, so only where
# no transform (grad, compile) is tracing. Elsewhere, and with no BLAS loaded, MLX's matmul.
_DECODING = contextvars.ContextVar("bonsai_decoding", default=False)  # per thread / task, not global


@contextmanager
def decoding():
    """One-row float32 products of the LM go through cblas_sgemv inside this block (see above)."""
    token = _DECODING.set(True)
    try:
        yield
    finally:
        _DECODING.reset(token)


def decoding_active() -> bool:
    """Whether this thread / task is inside `decoding()`."""
    return _DECODING.get()


def gemv(x: mx.array, weight: mx.array, bias: Optional[mx.array] = None) -> Optional[mx.array]:
    """x @ weight.T (+ bias) for a single row x [..., K] (weight [N, K]) by cblas_sgemv inside `decoding()`, or None
    where that does not apply (the caller then uses MLX's matmul)."""
    if not _DECODING.get() or x.size != x.shape[-1] or x.dtype != mx.float32 or weight.dtype != mx.float32 \
            or weight.ndim != 2 or not on_cpu():
        return None
    f = blas.sgemv()
    if f is None:
        return None
    w = np.asarray(weight)  # a view of MLX's buffer
    if not w.flags.c_contiguous:
        return None
    xv = np.ascontiguousarray(np.asarray(x).reshape(-1))  # evaluates x
    n, k = w.shape
    if bias is None:
        y, beta = np.empty(n, np.float32), 0.0
    else:
        y, beta = np.array(bias, np.float32), 1.0  # a copy: sgemv accumulates into it
    f(101, 111, n, k, 1.0, w.ctypes.data, k, xv.ctypes.data, 1, beta, y.ctypes.data, 1)  # row-major, no transpose
    return mx.array(y).reshape(*x.shape[:-1], n)


class CPULinear(nn.Linear):
    """`nn.Linear` (same weights) whose decode products use `gemv` inside `decoding()`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = gemv(x, self["weight"], self["bias"] if "bias" in self else None)
        return super().__call__(x) if y is None else y


# where `gemv` does not apply (no BLAS loaded, outside `decoding()`), decode (fewer than PREFILL_ROWS rows) multiplies
# the tied LM head in slices of this many vocabulary rows on the CPU: OpenBLAS's sgemm reads a [2048, 896] slice
# faster than the whole [151936, 896] (545 MB) at once
# (`python bench/cpu_kernels.py`: 60.7 → 46.2 ms per token)
HEAD_SLICE_ROWS = 2048


def sliced_head(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T as concatenated products with row slices of `weight` (views: no copy)."""
    n = weight.shape[0]
    return mx.concatenate([x @ weight[i : i + HEAD_SLICE_ROWS].T for i in range(0, n, HEAD_SLICE_ROWS)], axis=-1)


class CPUTiedHead(nn.Embedding):
    """An `nn.Embedding` whose `as_linear` (the tied LM head) uses `gemv` inside `decoding()`, else slices the
    vocabulary for decode on the CPU."""

    def as_linear(self, x: mx.array) -> mx.array:
        W = self.weight
        y = gemv(x, W)
        if y is not None:
            return y
        if x.size // x.shape[-1] < PREFILL_ROWS and W.shape[0] > 4 * HEAD_SLICE_ROWS and fast_ok(x) \
                and W.dtype == mx.float32:
            return sliced_head(x, W)
        return super().as_linear(x)


# MLX's CPU allocator keeps only 32 MB of freed buffers by default; the rest go back to malloc, and a later prefill
# may page-fault them in again. With 1 GB kept (`python bench/cpu_prefill.py`, fresh processes, 287 tokens): minor
