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
On an Apple GPU none of this applies: 4-bit `quantized_matmul` is the fast path and nothing changes.
The policy never changes results beyond floating-point tolerance (tests/test_policy.py). BONSAI_CPU_POLICY=off
turns it off (to measure it).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# inputs with at least this many rows use dequantize + GEMM on the CPU (decode has 1 row per sequence)
PREFILL_ROWS = 8


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def dequantized_matmul(x, wq, scales, biases, group_size: int, bits: int) -> mx.array:
    """x @ dequantize(W).T in the input's dtype."""
    return x @ mx.dequantize(wq, scales, biases, group_size, bits).astype(x.dtype).T


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
