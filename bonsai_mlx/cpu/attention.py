"""Attention for the CPU: the fast softmax (activations.py) with its own backward, GQA heads as rows of one product,
causal queries in chunks against the keys they see."""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

from .activations import _fast_exp_rows, _fast_softmax, _row_sums
from .device import PREFILL_ROWS, fast_ok


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
    if fast_ok(q) and q.shape[2] >= PREFILL_ROWS and not hasattr(cache, "bits"):
        return fast_sdpa(q, k, v, scale, mask)
    from mlx_lm.models.base import scaled_dot_product_attention

    return scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)

