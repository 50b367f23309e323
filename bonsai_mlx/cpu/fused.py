"""The decode step's small operations as single CPU ops (csrc/fused.cpp): RMSNorm, RoPE, one-query attention,
SwiGLU.

On the CPU `mx.fast.rms_norm` and `mx.fast.rope` run MLX's fallback graphs (~6 and ~15 ops) and mlx-lm's attention
for one query several more; at one token each op costs more to schedule than to compute (`python
bench/cpu_decode_ops.py` times both). Each function here returns None where it does not apply — outside
`decoding()` (nothing may be differentiated through these: they have no vjp), not float32 on the CPU, the extension
unavailable — and the caller then runs the original code.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import qmm
from .decode import decoding_active
from .device import on_cpu


def _ext(*xs: mx.array):
    """The extension module when every input is float32 inside `decoding()` on the CPU, else None."""
    if not decoding_active() or not on_cpu() or any(x.dtype != mx.float32 for x in xs):
        return None
    return qmm.extension()


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> Optional[mx.array]:
    """`mx.fast.rms_norm(x, weight, eps)` (the same arithmetic) as one op, or None."""
    ext = _ext(x, weight)
    return None if ext is None else ext.rms_norm(x, weight, eps)


def rope(x: mx.array, module, offset: int) -> Optional[mx.array]:
    """`module(x, offset)` for an exact `nn.RoPE` over the whole head ([..., L, D]) as one op, or None. The angles
    are formed in double precision (csrc/fused.cpp): within float32 rounding of the exact rotation, where MLX's
    float32 angles are off by ~1e-4 at position 2,000."""
    ext = _ext(x)
    if ext is None or type(module) is not nn.RoPE or module.dims != x.shape[-1] or not isinstance(offset, int):
        return None
    return ext.rope(x, module.traditional, module.base, module.scale, offset)


def attend_one(q: mx.array, keys: mx.array, values: mx.array, scale: float, mask=None) -> Optional[mx.array]:
    """softmax(scale · q·Kᵀ)·V for one query position (q [B, H, 1, D], keys/values [B, Hk, S, D]) as one op, or
    None (a mask, several queries)."""
    ext = _ext(q, keys, values)
    if ext is None or mask is not None or q.ndim != 4 or q.shape[2] != 1:
        return None
    return ext.attend_one(q, keys, values, scale)


def swiglu(gate: mx.array, up: mx.array) -> Optional[mx.array]:
    """silu(gate) · up (mlx-lm's `swiglu`, exact sigmoid) as one op, or None."""
    ext = _ext(gate, up)
    return None if ext is None or gate.shape != up.shape else ext.swiglu(gate, up)


class CPURMSNorm(nn.RMSNorm):
    """The LM's `nn.RMSNorm` (same weight) as one op inside `decoding()`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = rms_norm(x, self["weight"], self.eps)
        return super().__call__(x) if y is None else y
