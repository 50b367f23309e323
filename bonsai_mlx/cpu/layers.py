"""CPU stand-ins for the model's attention and MLP layers: the same weights and module names, other kernels.

`accelerate()` (policy.py) is what puts them in place; each still decides per call (float32 on the CPU, enough
rows) and otherwise runs exactly the code of the class it stands in for.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import fused
from .activations import fast_gelu_tanh, fast_swiglu
from .attention import sdpa
from .device import fast_ok


class CPUAttention(nn.Module):
    """Stands in for mlx-lm's Qwen2 / Llama `Attention` (same weights and names): its `__call__`, with `sdpa`, and
    inside `decoding()` with fused.py's one-op rotations and attention."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        # mlx_lm.models.qwen2.Attention.__call__, with the attention call swapped
        B, L, _ = x.shape
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # [B, H, L, Dh]
        keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # [B, Hk, L, Dh]
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None and L == 1 and mask is None and not hasattr(cache, "bits"):
            # a decode step: one CPU op each for the rotations and the attention where fused.py applies
            q1, k1 = fused.rope(queries, self.rope, cache.offset), fused.rope(keys, self.rope, cache.offset)
            if q1 is not None and k1 is not None:
                keys, values = cache.update_and_fetch(k1, values)
                out = fused.attend_one(q1, keys, values, self.scale)
                if out is not None:
                    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
                queries = q1
            else:
                queries = self.rope(queries, offset=cache.offset)
                keys, values = cache.update_and_fetch(self.rope(keys, offset=cache.offset), values)
        elif cache is not None:
            queries = self.rope(queries, offset=cache.offset)
            keys = self.rope(keys, offset=cache.offset)
            keys, values = cache.update_and_fetch(keys, values)
        else:
            queries, keys = self.rope(queries), self.rope(keys)
        out = sdpa(queries, keys, values, self.scale, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class CPUSwiGLUMLP(nn.Module):
    """Stands in for mlx-lm's Qwen2 / Llama `MLP` (same `gate_proj`/`up_proj`/`down_proj`) with the SwiGLU on the
    rational tanh."""

    def __call__(self, x: mx.array) -> mx.array:
        g, u = self.gate_proj(x), self.up_proj(x)
        y = fused.swiglu(g, u) if g.shape[-2] == 1 else None  # a decode step: one op (fused.py)
        if y is not None:
            return self.down_proj(y)
        if fast_ok(g):
            return self.down_proj(fast_swiglu(g, u))
        return self.down_proj(nn.silu(g) * u)


class CPUVisionAttention(nn.Module):
    """Stands in for `vision.Attention` (SigLIP): the bidirectional attention through `sdpa`."""

    def attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        return sdpa(q, k, v, self.scale)


class CPUVisionMLP(nn.Module):
    """Stands in for `vision.MLP`: its tanh-GELU (`nn.gelu_approx`, SigLIP's `gelu_pytorch_tanh`) on the rational
    tanh; any other activation runs as configured."""

    def __call__(self, x: mx.array) -> mx.array:
        h = self.fc1(x)
        h = fast_gelu_tanh(h) if self.act is nn.gelu_approx and fast_ok(h) else self.act(h)
        return self.fc2(h)
