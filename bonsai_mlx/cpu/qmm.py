"""The compiled quantized matmul (csrc/, built by `pip install -e .` on Linux): Python side.

`quantized_matmul(x, w, scales, biases, group_size, bits)` = `mx.quantized_matmul(x, w, scales, biases,
transpose=True, …)` for float32 x on the CPU, at the speed of a vectorized, multi-threaded kernel (few rows) or of
the BLAS on small dequantized tiles (many rows); its vjp gives the input's gradient (the weights are frozen), and it
works under `mx.compile`. `status()` says why it is unavailable when it is (not built, another MLX, macOS,
BONSAI_QMM=off): everything then runs MLX's own kernels.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def _load():
    """(module, None) or (None, why not)."""
    if os.environ.get("BONSAI_QMM", "").strip().lower() in ("off", "0", "none", "false"):
        return None, "disabled (BONSAI_QMM=off)"
    if sys.platform != "linux":
        return None, "not built on this platform (Metal's kernels are the fast path)"
    import mlx.core as mx  # first: libmlx.so must be loaded before the extension that links it

    built = HERE / "_qmm_build.txt"
    if not built.exists():
        return None, "not built (pip install -e . with a C++ compiler builds it)"
    want = built.read_text().split()[-1]
    if want != mx.__version__:
        return None, f"built for mlx {want}, this is mlx {mx.__version__} (reinstall bonsai-mlx to rebuild it)"
    try:
        from . import _qmm
    except ImportError as e:
        return None, f"failed to load: {e}"
    return _qmm, None


def extension():
    """The compiled module (also home of fused.py's ops), or None where it is unavailable."""
    return _load()[0]


def available() -> bool:
    return _load()[0] is not None


def status() -> str:
    """One line for `doctor`: the kernel in use, or why MLX's own runs."""
    mod, why = _load()
    if mod is None:
        return f"MLX's own (bonsai kernel {why})"
    acts = (f"4-bit: int8 activations below {mod.int8_rows()} rows" if mod.activations() == "int8"
            else "float activations")
    if mod.packed_kernel():
        acts += "; 4-bit packed tiles: int8 activations at every row count"
    return f"bonsai {mod.kernel_isa()} kernel ({acts}), {mod.num_threads()} threads"


def set_activations(kind: str) -> None:
    """"int8" (the default where this CPU has an int8 kernel) or "float" (exact to float32 rounding) for the few-row
    4-bit products from now on; as BONSAI_QMM_ACTIVATIONS at start-up."""
    mod = _load()[0]
    if mod is not None:
        mod.set_activations(kind)


def int8_rows() -> int:
    """4-bit products with fewer rows than this round the activations to int8 (csrc/kernels.h states the bound;
    8-bit products never do: csrc/qmm.cpp says why); 0 when
    every product is exact to float32 rounding (no int8 kernel for this CPU, BONSAI_QMM_ACTIVATIONS=float, or the
    extension unavailable)."""
    mod = _load()[0]
    return mod.int8_rows() if mod is not None else 0


# a decode step of a batch of sequences (the server) keeps up to this many rows on the row kernels, which read each
# weight once for all of them; the default crossover (8, for prefill) would dequantize whole layers every step
DECODE_ROWS = 17


def quantized_matmul(x, w, scales, biases, group_size: int, bits: int, transpose: bool = True, bias=None,
                     decode: bool = False, packed_n: int = 0):
    """x @ dequantize(w).T (+ bias, the layer's own [N]) in float32, by the compiled kernel; callers check
    `supports` first. decode: the rows are one token of each of a batch of sequences (see DECODE_ROWS).
    packed_n: w, scales, biases are csrc/packed.h's tiles of a weight with this many output rows (pages.py)."""
    return _load()[0].quantized_matmul(x, w, scales, biases, transpose, group_size, bits, bias=bias,
                                       row_kernel_rows=DECODE_ROWS if decode else 0, packed_n=packed_n)


def supports(x, group_size: int, bits: int, mode: Optional[str] = "affine") -> bool:
    """Whether the kernel computes this product: float32 on the CPU, affine 4/8-bit, groups 32/64/128."""
    import mlx.core as mx

    return (available() and mode in (None, "affine") and bits in (4, 8) and group_size in (32, 64, 128)
            and x.dtype == mx.float32 and mx.default_device() == mx.cpu)
