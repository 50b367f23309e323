"""Where a call runs, decided per call by the CPU stand-ins (cheap checks, no environment reads): the device of the
default stream, the dtype, and whether the input has prefill-sized rows."""

from __future__ import annotations

import mlx.core as mx

# inputs with at least this many rows use dequantize + GEMM on the CPU (decode has 1 row per sequence)
PREFILL_ROWS = 8


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu



def fast_ok(x: mx.array) -> bool:
    """The rational-tanh and fast-softmax paths apply to float32 on the CPU."""
    return x.dtype == mx.float32 and on_cpu()
