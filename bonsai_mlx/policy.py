"""Execution policy per device, chosen from measurements (bench/cpu_inference.py, `bonsai-mlx doctor`).

On the CPU (Linux `mlx[cpu]`; `python bench/cpu_kernels.py` on a 2-core EPYC with OpenBLAS, 200×896 @ 896×4864):
- float32 GEMM 9.8 ms, bfloat16 311 ms: MLX's CPU half-precision matmuls do not reach BLAS → weights that are not
  quantized run in float32 (a bf16 checkpoint is upcast at load);
- 4-bit `quantized_matmul` 749 ms (scalar kernels) vs dequantize + float32 GEMM 18.7 ms → quantized layers (and the
  tied LM head) keep their 4-bit weights in memory (what `--quantize` promises) but multiply many-row inputs
  (prefill, training) through a transient dequantized copy; single rows (decode: 3.8 ms vs 10.0 ms) stay on the
  quantized kernel. Measured (bench/): 4-bit TTFT 4.7 s for 240 prompt tokens; a 4-bit 512-token training step
  306 s → 19 s, but its peak memory 4.9 → 7.4 GB (the dequantized copies live until the backward pass), so for
  memory-bound CPU training set BONSAI_CPU_POLICY=off.
- MLX's CPU `exp`/`tanh` (and so SiLU, tanh-GELU) cost ~12-17 ns per element: at 240 prompt tokens the
  Qwen2.5-0.5B SiLUs alone take ~0.5 s of the time to first token. `fast_tanh` is Eigen's rational float tanh
  (absolute error ≤ 4e-7) in plain arithmetic, written so that the JIT behind `mx.compile` emits vectorized
  kernels (see "Why the functions below are written as they are"): the LM's SwiGLU, the vision tower's tanh-GELU and
  the attention's exponentials use it on the CPU in float32 (`python bench/cpu_kernels.py` times them).
On an Apple GPU none of this applies: 4-bit `quantized_matmul` is the fast path and nothing changes.
The policy never changes results beyond floating-point tolerance (tests/test_policy.py). BONSAI_CPU_POLICY=off
turns it off (to measure it).
"""

from __future__ import annotations

import contextvars
import ctypes
from contextlib import contextmanager
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import _blas

# inputs with at least this many rows use dequantize + GEMM on the CPU (decode has 1 row per sequence)
PREFILL_ROWS = 8


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


# MLX's CPU `dequantize` holds a temporary as large as its output, and the lazy graph is free to dequantize several
# weights before their products: a 4-bit prefill peaked 141 MB above the weights. So weights are dequantized in
# slices of about DEQUANT_SLICE float32 elements (along the longer of the output rows / input columns), each slice
# ordered after the previous slice's product (`mx.depends`): one transient slice at a time. `python
# bench/cpu_dequant.py` (288 tokens, 3 rounds): peak +141 → +83 MB, 2.19 vs 2.20 s (2^20-element slices: +74 MB but
# 2.63 s; 2^22: +100 MB).
DEQUANT_SLICE = 1 << 21


def dequantized_matmul(x, wq, scales, biases, group_size: int, bits: int) -> mx.array:
    """x @ dequantize(W).T in the input's dtype (W [N, K] quantized along K), a slice at a time."""
    N, K = scales.shape[0], scales.shape[1] * group_size
    after = x  # the first slice waits for x: it is not dequantized ahead of the layers before it

    def part(xs, w_rows, w_cols, g_cols):
        nonlocal after
        w = mx.dequantize(mx.depends(wq[w_rows, w_cols], after), scales[w_rows, g_cols], biases[w_rows, g_cols],
                          group_size, bits)
        after = xs @ w.astype(x.dtype).T
        return after

    every = slice(None)
    if N >= K:  # slices of output rows, concatenated: [..., N]
        step = max(1, DEQUANT_SLICE // K)
        outs = [part(x, slice(i, i + step), every, every) for i in range(0, N, step)]
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)
    # slices of input columns (whole quantization groups), summed; packed words hold 32 // bits values
    step = max(1, DEQUANT_SLICE // N // group_size) * group_size
    y = None
    for k in range(0, K, step):
        e = min(K, k + step)
        yk = part(x[..., k:e], every, slice(k * bits // 32, e * bits // 32), slice(k // group_size, e // group_size))
        y = yk if y is None else y + yk
    return y


class CPUQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear whose many-row products go through a dequantized weight on the CPU."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if rows < PREFILL_ROWS or not on_cpu() or getattr(self, "mode", "affine") != "affine":
            return super().__call__(x)
        y = dequantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        if "bias" in self:
            y = y + self["bias"]
        return y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """The tied LM head (`as_linear`) of a quantized embedding, with the same many-row CPU path."""

    def as_linear(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if rows < PREFILL_ROWS or not on_cpu() or getattr(self, "mode", "affine") != "affine":
            return super().as_linear(x)
        return dequantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)


# --- fast transcendental functions for the CPU ----------------------------------------------------------------------

# Eigen's float tanh (`generic_fast_tanh_float`): x·P(x²)/Q(x²) on x clamped to ±7.9053 (where tanh rounds to ±1).
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
           -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
# Evaluated in the Estrin form below, the rational is exactly ±1 at ±8.5 and within 4e-7 of tanh on [-8.5, 8.5]
# (at Eigen's ±7.9053 it gives ±(1 - 3.6e-7)); beyond, it diverges.
_TANH_CLAMP = 8.5
# the exponentials of the softmax clamp at Eigen's bound: exp(2·-7.9053) evaluates to 1.8e-7 (true 1.4e-7)
_EXP_CLAMP = 7.90531110763549805

# Why the functions below are written as they are: the JIT behind `mx.compile` on the CPU (g++ -O3, generic x86-64)
# - fuses at most 11 levels of ops into one kernel; a deeper graph is cut into several kernels that write full-size
#   intermediates and pass scalar constants as strided arrays (not vectorized). Hence P in Estrin form (depth 4, not
#   12 for Horner), each function compiled per shape (a shapeless trace adds broadcast levels to every op), and
#   sigmoid as 0.5 + (0.5·c·P)/Q with the 0.5 folded into P's coefficients (exact: a power of two);
# - does not vectorize a kernel with a comparison or select ahead of its arithmetic (GCC: "control flow in loop"),
#   so the clamp is its own small kernel. It also zeroes the factor that multiplies sigmoid / exp where the argument
#   is clamped from below, so that silu(g), gelu(x) and the softmax's exponentials are exactly 0 there whatever the
#   rounding of the rational at the bound; that test reads the input, not the clamp's intermediate (a shared
#   intermediate becomes a kernel of its own).
# `python bench/cpu_kernels.py` times SwiGLU, tanh-GELU and the attention against MLX's own.


def _clamp(a: mx.array, bound: float, upper: bool = True) -> mx.array:
    """a limited to ±bound (from below only if not upper); the gradient is 0 outside, as `mx.clip`'s."""
    a = mx.where(a < -bound, -bound, a)
    return mx.where(a > bound, bound, a) if upper else a


def _tanh_pq(c: mx.array, scale: float = 1.0):
    """(scale·c·P(c²), Q(c²)): tanh(c) = c·P/Q for |c| ≤ _TANH_CLAMP."""
    P = [scale * v for v in _TANH_P]
    y = c * c
    y2 = y * y
    y4 = y2 * y2
    p = (P[0] + P[1] * y) + y2 * (P[2] + P[3] * y) + y4 * ((P[4] + P[5] * y) + y2 * P[6])
    q = (_TANH_Q[0] + _TANH_Q[1] * y) + y2 * (_TANH_Q[2] + _TANH_Q[3] * y)
    return c * p, q


@mx.compile
def _tanh_clamped(c: mx.array) -> mx.array:
    cp, q = _tanh_pq(c)
    return cp / q


def fast_tanh(x: mx.array) -> mx.array:
    """tanh(x) with absolute error ≤ 4e-7 (Eigen's `generic_fast_tanh_float` rational)."""
    return _tanh_clamped(_clamp(x, _TANH_CLAMP))


@mx.compile
def _swiglu_clamped(g: mx.array):
    return _clamp(0.5 * g, _TANH_CLAMP), mx.where(g < -2 * _TANH_CLAMP, 0.0, g)


@mx.compile
def _swiglu_tail(c: mx.array, gate: mx.array, x: mx.array) -> mx.array:
    half_t_num, q = _tanh_pq(c, 0.5)
    return (gate * x) * (0.5 + half_t_num / q)  # sigmoid(g) = 0.5 + 0.5·tanh(g/2)


def fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x (mlx-lm's `swiglu`), sigmoid(g) = 0.5 + 0.5·tanh(g/2) on the rational tanh."""
    return _swiglu_tail(*_swiglu_clamped(gate), x)


@mx.compile
def _gelu_clamped(x: mx.array):
    # the argument reaches -_TANH_CLAMP at x ≈ -5.0; below x = -5.5, |gelu(x)| < 1e-8
    return _clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), _TANH_CLAMP), mx.where(x < -5.5, 0.0, x)


@mx.compile
def _gelu_tail(c: mx.array, x: mx.array) -> mx.array:
    half_t_num, q = _tanh_pq(c, 0.5)
    return x * (0.5 + half_t_num / q)  # 0.5·x·(1 + tanh(c))


def fast_gelu_tanh(x: mx.array) -> mx.array:
    """The tanh GELU (`gelu_pytorch_tanh`, MLX's `gelu_approx`) on the rational tanh."""
    return _gelu_tail(*_gelu_clamped(x))


@mx.compile
def _exp_clamped(s: mx.array, m: mx.array):
    return _clamp(0.5 * (s - m), _EXP_CLAMP, upper=False), mx.where(s < m - 2 * _EXP_CLAMP, 0.0, 1.0)


@mx.compile
def _exp_tail(c: mx.array, keep: mx.array) -> mx.array:
    cp, q = _tanh_pq(c)
    return keep * ((q + cp) / (q - cp))  # exp(2c) = (1 + tanh(c)) / (1 - tanh(c))


def _fast_exp_rows(scores: mx.array) -> mx.array:
    """exp(s - max over the last axis) with exp(s) = (1 + tanh(s/2)) / (1 - tanh(s/2)) for s ≤ 0; entries below
    e^-15.8 (≈1e-7 of the largest) become 0."""
    return _exp_tail(*_exp_clamped(scores, mx.max(scores, axis=-1, keepdims=True)))


def _row_sums(e: mx.array) -> mx.array:
    """e.sum(-1, keepdims=True) as a product with a ones vector: BLAS's GEMV reads e faster than MLX's CPU reduction
    (a throwaway timing of one 14 × 96 × 288 chunk: 0.27 → 0.04 ms; `python bench/cpu_kernels.py` times the
    attention that uses it)."""
    return e @ mx.ones((e.shape[-1], 1), e.dtype)


def _fast_softmax(scores: mx.array) -> mx.array:
    """softmax over the last axis with `_fast_exp_rows`."""
    e = _fast_exp_rows(scores)
    return e / _row_sums(e)


@mx.custom_function
def _attention_core(q: mx.array, k: mx.array, v: mx.array, bias: mx.array) -> mx.array:
    """softmax(q·kᵀ + bias)·v with `_fast_exp_rows` (q already scaled; bias additive, broadcast to the scores).
    The row sums divide the [.., L, D] output instead of the [.., L, S] probabilities (flash attention's deferred
    normalization): one pass over the scores fewer."""
    e = _fast_exp_rows(q @ k.swapaxes(-1, -2) + bias)
    return (e @ v) / _row_sums(e)


@_attention_core.vjp
def _attention_core_vjp(primals, cotangent, output):
    # The textbook attention backward from the recomputed probabilities (autodiff through the rational softmax
    # is ~2× slower): dV = Pᵀ·dO, dS = P ⊙ (dP − Σ dP⊙P), dP = dO·Vᵀ.
    q, k, v, bias = primals
    p = _fast_softmax(q @ k.swapaxes(-1, -2) + bias)
    dv = p.swapaxes(-1, -2) @ cotangent
    dp = cotangent @ v.swapaxes(-1, -2)
    ds = p * (dp - mx.sum(dp * p, axis=-1, keepdims=True))
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv, mx.zeros_like(bias)


# causal attention over many queries runs in query chunks of about this many rows, each against only the keys it can
# see (the chunked causal attention of flash-attention-style kernels): ~2/3 of the scores at 288 tokens
CAUSAL_CHUNK = 96


def _make_causal_bias(a: int, b: int, offset: int, e: int, g: int, dtype) -> mx.array:
    keep = (np.arange(a, b)[:, None] + offset) >= np.arange(e)[None]
    return mx.array(np.tile(np.where(keep, 0.0, -1e30), (g, 1)), dtype)


_cached_causal_bias = lru_cache(maxsize=16)(_make_causal_bias)


def _causal_bias(a: int, b: int, offset: int, e: int, g: int, dtype) -> mx.array:
    """Additive mask [g·(b-a), e] of the queries at positions offset+a .. offset+b-1 over keys 0 .. e-1, made with
    numpy (a constant: safe inside `mx.compile`). Those up to 4 MB are kept and reused by every layer of a prefill."""
    make = _cached_causal_bias if g * (b - a) * e <= 1 << 20 else _make_causal_bias
    return make(a, b, offset, e, g, dtype)


def fast_sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """`mx.fast.scaled_dot_product_attention` (q [B, H, L, D], k/v [B, Hk, S, D]) with `_fast_softmax`.
    mask: None, "causal" (queries are the last L of the S positions) or a boolean / additive array.

    With no mask or "causal", GQA needs no copies of K/V: the H // Hk query heads that share a KV head become rows
    of one product ([B, Hk, g·L, D] @ [B, Hk, D, S]), and causal queries go in chunks of CAUSAL_CHUNK rows against
    the keys they see. Same results; a throwaway same-run timing at 14 heads × 288², 2 KV heads: 9.5 → 6.4 ms
    (`python bench/cpu_kernels.py` times it against MLX's at 240²)."""
    B, H, L, D = q.shape
    S, Hk = k.shape[2], k.shape[1]
    neg = mx.array(-1e30, q.dtype)
    if mask is None or isinstance(mask, str):
        if mask not in (None, "causal"):
            raise ValueError(f"unsupported mask {mask!r}")
        g = H // Hk
        qg = q.reshape(B, Hk, g, L, D)
        n = max(1, round(L / CAUSAL_CHUNK)) if mask == "causal" else 1
        bounds = [L * i // n for i in range(n + 1)]
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            e = S - L + b if mask == "causal" else S  # keys this chunk's queries see
            if mask == "causal":
                bias = _causal_bias(a, b, S - L, e, g, q.dtype)  # [g·(b-a), e]
            else:
                bias = mx.zeros((1, 1), q.dtype)
            rows = (qg[:, :, :, a:b] * scale).reshape(B, Hk, g * (b - a), D)  # the scaling makes the slice's copy
            out = _attention_core(rows, k[:, :, :e], v[:, :, :e], bias)  # [B, Hk, g·(b-a), D]
            outs.append(out.reshape(B, Hk, g, b - a, D).transpose(0, 3, 1, 2, 4))  # [B, b-a, Hk, g, D] (a view)
        # one copy into [B, L, H, D] order, returned as its [B, H, L, D] view: the caller's transpose back to
        # [B, L, H·D] for o_proj is then free
        out = mx.concatenate(outs, axis=1) if n > 1 else mx.contiguous(outs[0])
        return out.reshape(B, L, H, D).transpose(0, 2, 1, 3)
    if Hk != H:
        k, v = mx.repeat(k, H // Hk, axis=1), mx.repeat(v, H // Hk, axis=1)
    bias = mx.where(mask, mx.array(0.0, q.dtype), neg) if mask.dtype == mx.bool_ else mask.astype(q.dtype)
    return _attention_core(q * scale, k, v, bias)


def sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None, cache=None) -> mx.array:
    """Attention: `fast_sdpa` for float32 on the CPU with at least PREFILL_ROWS queries, else mlx-lm's
    `scaled_dot_product_attention` (which also handles quantized KV caches). Decode takes mlx-lm's: for one query
    the exponentials cost nothing and its fewer ops matter (a throwaway timing of a real-size decode layer: 5.15 →
    4.88 ms)."""
    if fast_activations_ok(q) and q.shape[2] >= PREFILL_ROWS and not hasattr(cache, "bits"):
        return fast_sdpa(q, k, v, scale, mask)
    from mlx_lm.models.base import scaled_dot_product_attention

    return scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)


class CPUAttention(nn.Module):
    """Stands in for mlx-lm's Qwen2 / Llama `Attention` (same weights and names): its `__call__`, with `sdpa`."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        # mlx_lm.models.qwen2.Attention.__call__, with the attention call swapped
        B, L, _ = x.shape
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            queries = self.rope(queries, offset=cache.offset)
            keys = self.rope(keys, offset=cache.offset)
            keys, values = cache.update_and_fetch(keys, values)
        else:
            queries, keys = self.rope(queries), self.rope(keys)
        out = sdpa(queries, keys, values, self.scale, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def fast_activations_ok(x: mx.array) -> bool:
    """Use the rational-tanh paths only for float32 on the CPU with the policy on."""
    return x.dtype == mx.float32 and on_cpu() and enabled()


def gelu_tanh(x: mx.array) -> mx.array:
    return fast_gelu_tanh(x) if fast_activations_ok(x) else nn.gelu_approx(x)


class CPUSwiGLUMLP(nn.Module):
    """Stands in for mlx-lm's Qwen2/Llama `MLP` class (same `gate_proj`/`up_proj`/`down_proj` weights) with the
    SwiGLU on the rational tanh on the CPU."""

    def __call__(self, x: mx.array) -> mx.array:
        g, u = self.gate_proj(x), self.up_proj(x)
        if fast_activations_ok(g):
            return self.down_proj(fast_swiglu(g, u))
        return self.down_proj(nn.silu(g) * u)


# --- decode products through cblas_sgemv ---------------------------------------------------------------------------
# MLX computes every product with cblas_sgemm, and OpenBLAS 0.3.21's sgemm packs the weight matrix even for a single
# row: a decode step streams its weights at 15-17 GB/s where cblas_sgemv reaches 25-29 GB/s on the same matrices
# (`python bench/cpu_gemv.py`). While `decoding()` is active (generate sets it around mlx-lm's decode steps), the
# float32 one-row products of the LM's linears and tied head call cblas_sgemv of the BLAS that `_blas` loaded, on
# numpy views of the weights (no copies) and of the input, which this evaluates: a synchronous step, so only where
# no transform (grad, compile) is tracing. Elsewhere, and with no BLAS loaded, MLX's matmul.
_DECODING = contextvars.ContextVar("bonsai_decoding", default=False)
_SGEMV = None


@contextmanager
def decoding():
    """One-row float32 products of the LM go through cblas_sgemv inside this block (see above)."""
    token = _DECODING.set(True)
    try:
        yield
    finally:
        _DECODING.reset(token)


def _cblas_sgemv():
    global _SGEMV
    if _SGEMV is None:
        _SGEMV = False
        if _blas.loaded:
            try:
                f = ctypes.CDLL(_blas.loaded).cblas_sgemv
            except (OSError, AttributeError):
                return None
            f.restype = None
            i, p = ctypes.c_int, ctypes.c_void_p
            f.argtypes = [i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
            _SGEMV = f
    return _SGEMV or None


def gemv(x: mx.array, weight: mx.array, bias: Optional[mx.array] = None) -> Optional[mx.array]:
    """x @ weight.T (+ bias) for a single row x [..., K] (weight [N, K]) by cblas_sgemv inside `decoding()`, or None
    where that does not apply (the caller then uses MLX's matmul)."""
    if not _DECODING.get() or x.size != x.shape[-1] or x.dtype != mx.float32 or weight.dtype != mx.float32 \
            or weight.ndim != 2 or not on_cpu() or not enabled():
        return None
    f = _cblas_sgemv()
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
        if x.size // x.shape[-1] < PREFILL_ROWS and W.shape[0] > 4 * HEAD_SLICE_ROWS and fast_activations_ok(x) \
                and W.dtype == mx.float32:
            return sliced_head(x, W)
        return super().as_linear(x)


# MLX's CPU allocator keeps only 32 MB of freed buffers by default; the rest go back to malloc, and a later prefill
# may page-fault them in again. With 1 GB kept (`python bench/cpu_prefill.py`, fresh processes, 287 tokens): minor
# faults per prefill 12,698 → 10, median 1.62 → 1.39 s (best 1.36 vs 1.38 s), peak memory 2.43 GB both;
# `python bench/cpu_inference.py` measures it end to end.
CPU_CACHE_LIMIT = 1 << 30


def raise_cpu_cache_limit() -> None:
    """On the CPU with the policy on, keep up to CPU_CACHE_LIMIT of freed buffers for reuse (never lowers a limit
    the user set higher)."""
    if not (on_cpu() and enabled()):
        return
    prev = mx.set_cache_limit(CPU_CACHE_LIMIT)
    if prev > CPU_CACHE_LIMIT:
        mx.set_cache_limit(prev)


_SWAPS = {  # mlx-lm class name → (stand-in, the children it must have); only Qwen2 / Llama are known to match
    "MLP": (CPUSwiGLUMLP, {"gate_proj", "up_proj", "down_proj"}),
    "Attention": (CPUAttention, {"q_proj", "k_proj", "v_proj", "o_proj", "rope"}),
}
_SWAPPED: dict = {}


def use_fast_cpu_layers(module: nn.Module) -> int:
    """Give the LM's SwiGLU MLPs and attention layers (mlx-lm's Qwen2 / Llama classes), its linears (`gemv` for
    decode) and its tied LM head the CPU fast paths, decided per call (on a GPU or in half precision they run
    mlx-lm's own code). Returns the number of layers switched."""
    if not enabled():
        return 0
    n = 0
    for _, m in module.named_modules():
        cls = type(m)
        if cls.__module__ not in ("mlx_lm.models.qwen2", "mlx_lm.models.llama") or cls.__name__ not in _SWAPS:
            continue
        stand_in, children = _SWAPS[cls.__name__]
        if not children <= set(m.children()):
            continue
        if cls not in _SWAPPED:
            _SWAPPED[cls] = type(cls.__name__, (stand_in, cls), {"__call__": stand_in.__call__})
        m.__class__ = _SWAPPED[cls]
        n += 1
    for _, m in module.named_modules():
        if type(m) is nn.Embedding:  # the tied LM head (decode path decided per call)
            m.__class__ = CPUTiedHead
            n += 1
        elif type(m) is nn.Linear:
            m.__class__ = CPULinear
            n += 1
    return n


def enabled() -> bool:
    import os

    return os.environ.get("BONSAI_CPU_POLICY", "").lower() not in ("off", "0", "none")


def use_cpu_kernels(module: nn.Module) -> int:
    """Give the module's quantized layers (linears, tied LM head) the CPU many-row path (a no-op on a GPU,
    decided per call)."""
    n = 0
    if not enabled():
        return n
    for _, m in module.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = CPUQuantizedLinear
            n += 1
        elif type(m) is nn.QuantizedEmbedding:
            m.__class__ = CPUQuantizedEmbedding
            n += 1
    return n


def upcast_for_cpu(model: nn.Module) -> bool:
    """On the CPU, half-precision weights become float32 (30x faster matmuls here); returns whether it cast."""
    if not (on_cpu() and enabled()):
        return False
    from mlx.utils import tree_flatten

    half = any(v.dtype in (mx.bfloat16, mx.float16) for _, v in tree_flatten(model.parameters()))
    if half:
        model.set_dtype(mx.float32)
    return half
