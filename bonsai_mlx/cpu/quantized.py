"""Products of MLX-quantized layers on the CPU.

MLX's CPU `quantized_matmul` is scalar (`python bench/cpu_kernels.py`, 200×896 @ 896×4864: 749 ms vs dequantize +
float32 GEMM 18.7 ms). Quantized layers keep their 4-bit weights in memory (what `--quantize` promises) and
- with the compiled kernel (qmm.py; `python bench/cpu_qmm.py` times it): every product goes through it — few rows
  on its vectorized row kernel, many rows on the BLAS over small dequantized tiles;
- without it: many-row inputs (prefill, training) multiply through a transient dequantized slice (below); single
  rows (decode) stay on MLX's kernel.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import qmm
from .decode import decoding_active
from .device import PREFILL_ROWS, on_cpu

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


def packed_product(layer, x: mx.array, bias=None) -> mx.array:
    """x @ W.T (+ bias) of a layer packed into tiles (pages.py): always the compiled kernel, in float32."""
    x32 = x if x.dtype == mx.float32 else x.astype(mx.float32)  # no extra graph node in the common case
    y = qmm.quantized_matmul(x32, layer["packed_weight"], layer["packed_scales"], layer["packed_biases"],
                             layer.group_size, 4, bias=bias, decode=decoding_active(), packed_n=layer.packed_n)
    return y if x.dtype == mx.float32 else y.astype(x.dtype)


def packed_rows(layer, ids: mx.array) -> mx.array:
    """Rows `ids` of a packed embedding, dequantized [..., K] (what QuantizedEmbedding.__call__ gives): each id's tile
    gathered, its lane picked (csrc/packed.h's layout in MLX ops: a prompt's rows are few)."""
    pw, ps, pb = layer["packed_weight"], layer["packed_scales"], layer["packed_biases"]
    flat = ids.reshape(-1)
    tile, lane = flat // 16, (flat % 16).astype(mx.int32)
    K = pw.shape[1] // 8
    b = pw[tile].reshape(-1, K // 8, 16, 4)  # [L, chunks, rows, 4 bytes]
    b = mx.take_along_axis(b, lane.reshape(-1, 1, 1, 1), axis=2).squeeze(2)  # [L, chunks, 4]
    q = mx.concatenate([b & 0xF, b >> 4], axis=-1).astype(mx.float32)  # [L, chunks, 8]: values 8c .. 8c+7
    q = q.reshape(flat.shape[0], K // layer.group_size, layer.group_size)
    s = mx.take_along_axis(ps[tile], lane.reshape(-1, 1, 1), axis=2)  # [L, G, 1]
    o = mx.take_along_axis(pb[tile], lane.reshape(-1, 1, 1), axis=2)
    return (q * s + o).reshape(*ids.shape, K)


def cpu_product(layer, x: mx.array, bias=None):
    """x @ W.T (+ bias) of a quantized layer on the CPU's fastest path, or None where MLX's own kernel is the one to
    run. The compiled kernel adds the bias in the same op (a decode step has 72 of them: q/k/v in every layer)."""
    if "packed_weight" in layer:
        return packed_product(layer, x, bias)
    mode = getattr(layer, "mode", "affine")
    if qmm.supports(x, layer.group_size, layer.bits, mode):
        return qmm.quantized_matmul(x, layer["weight"], layer["scales"], layer["biases"], layer.group_size,
                                    layer.bits, bias=bias, decode=decoding_active())
    if x.size // x.shape[-1] < PREFILL_ROWS or not on_cpu() or mode != "affine":
        return None
    y = dequantized_matmul(x, layer["weight"], layer["scales"], layer["biases"], layer.group_size, layer.bits)
    return y if bias is None else y + bias


def _packed_repr(layer) -> str:
    n, k = layer.packed_n, layer["packed_weight"].shape[1] // 8
    return f"{k}, {n}, group_size={layer.group_size}, bits=4, packed in 16-row tiles"


class CPUQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear whose products take `cpu_product` on the CPU (also when packed into tiles)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = cpu_product(self, x, self["bias"] if "bias" in self else None)
        return super().__call__(x) if y is None else y

    def _extra_repr(self) -> str:
        return _packed_repr(self) if "packed_weight" in self else super()._extra_repr()


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """The tied LM head (`as_linear`) of a quantized embedding, with the same CPU products; a packed one also looks
    its rows up from the tiles."""

    def __call__(self, x: mx.array) -> mx.array:
        return packed_rows(self, x) if "packed_weight" in self else super().__call__(x)

    def as_linear(self, x: mx.array) -> mx.array:
        y = cpu_product(self, x)
        return super().as_linear(x) if y is None else y

    def _extra_repr(self) -> str:
        return _packed_repr(self) if "packed_weight" in self else super()._extra_repr()

