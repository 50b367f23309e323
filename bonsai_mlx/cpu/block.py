"""A quantized transformer block's decode step as one CPU op (csrc/decode_block.cpp says why and what it computes).

`CPUDecoderBlock` stands in for mlx-lm's Qwen2 / Llama `TransformerBlock` (same children and names). Inside
`decoding()` (generate's decode steps: nothing is differentiated there), for one token of one sequence, with a plain
`KVCache` and every linear quantized the same way on bonsai's kernel, the whole block — norms, q/k/v/o, RoPE,
attention over the cache and the new position, SwiGLU MLP, residuals — is one op that also returns the new key and
value rows, which are then appended to the cache. Everywhere else (prefill, training, batches, other caches, float
weights, LoRA layers) it runs mlx-lm's block on the other CPU stand-ins.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from . import qmm
from .decode import decoding_active
from .device import on_cpu
from .quantized import CPUQuantizedLinear


def _linears(block):
    """q k v o gate up down: the order csrc/decode_block.h takes them in."""
    a, m = block.self_attn, block.mlp
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]


def _fused_inputs(block, x: mx.array, caches: list):
    """(ext, inputs, params) when the one-op decode step applies to x [B, 1, D] with one cache per row, else None."""
    if not decoding_active() or not on_cpu() or x.shape[1] != 1 or x.shape[0] != len(caches) \
            or x.dtype != mx.float32:
        return None
    if any(type(c) is not KVCache or c.keys is None or c.keys.dtype != mx.float32 for c in caches):
        return None
    a, n1, n2 = block.self_attn, block.input_layernorm, block.post_attention_layernorm
    rope = getattr(a, "rope", None)
    lins = _linears(block)
    if type(rope) is not nn.RoPE or not all(type(m) is CPUQuantizedLinear for m in lins):
        return None
    if not (isinstance(n1, nn.RMSNorm) and isinstance(n2, nn.RMSNorm) and n1.eps == n2.eps):
        return None
    gs, bits = lins[0].group_size, lins[0].bits
    if any((m.group_size, m.bits, getattr(m, "mode", "affine")) != (gs, bits, "affine") for m in lins):
        return None
    packed = ["packed_weight" in m for m in lins]
    if any(packed) and not all(packed):
        return None
    keys = ("packed_weight", "packed_scales", "packed_biases") if packed[0] else ("weight", "scales", "biases")
    packed_n = [m.packed_n for m in lins] if packed[0] else []
    head_dim = (packed_n[0] if packed_n else lins[0]["scales"].shape[0]) // a.n_heads
    if rope.dims != head_dim or not qmm.supports(x, gs, bits):
        return None
    ext = qmm.extension()
    inputs = [x, n1["weight"], n2["weight"]]
    for c in caches:
        inputs += [c.keys, c.values]
    bias_mask, biases = 0, []
    for i, m in enumerate(lins):
        inputs += [m[k] for k in keys]
        if "bias" in m:
            bias_mask |= 1 << i
            biases.append(m["bias"])
    params = dict(eps=n1.eps, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, head_dim=head_dim,
                  rope_traditional=rope.traditional, rope_base=rope.base, rope_scale=rope.scale,
                  offsets=[c.offset for c in caches],
                  attn_scale=a.scale, group_size=gs, bits=bits, bias_mask=bias_mask, packed_n=packed_n)
    return ext, inputs + biases, params


class CPUDecoderBlock(nn.Module):
    """Stands in for mlx-lm's Qwen2 / Llama `TransformerBlock`: its decode step as one op where `_fused_inputs`
    applies, else the original block (mlx_lm.models.qwen2.TransformerBlock.__call__)."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        fused = _fused_inputs(self, x, [cache]) if mask is None and x.shape[0] == 1 else None
        if fused is not None:
            ext, inputs, params = fused
            out, k, v = ext.decode_block(inputs, **params)
            cache.update_and_fetch(k, v)  # the block already attended to the new position
            return out
        r = self.self_attn(self.input_layernorm(x), mask, cache)
        h = x + r
        return h + self.mlp(self.post_attention_layernorm(h))

    def decode_rows(self, x: mx.array, caches: list) -> mx.array:
        """One decode step of B sequences, x [B, 1, D], row b with its own KV cache `caches[b]` (positions may
        differ): one op where `_fused_inputs` applies, else each row through the block alone."""
        fused = _fused_inputs(self, x, caches)
        if fused is None:
            return decode_rows(self, x, caches)
        ext, inputs, params = fused
        out, *kv = ext.decode_block(inputs, **params)
        for b, c in enumerate(caches):
            c.update_and_fetch(kv[2 * b], kv[2 * b + 1])
        return out


def decode_rows(block, x: mx.array, caches: list) -> mx.array:
    """x [B, 1, D] through any mlx-lm block, row b with its own cache (the path where the one op does not apply:
    other devices, float weights, other caches). Each row reads the weights again."""
    if len(caches) == 1:
        return block(x, None, caches[0])
    return mx.concatenate([block(x[b : b + 1], None, c) for b, c in enumerate(caches)], axis=0)
