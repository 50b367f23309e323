"""`accelerate(model)`: every CPU-specific change to a loaded student, in one place, reported.

Called once where a model is loaded (`io.load_model`, after any quantization). On the CPU, with the policy on, it
1. casts half-precision weights to float32 (MLX's CPU half matmuls do not reach the BLAS: 200×896 @ 896×4864 takes
   311 ms in bfloat16 vs 9.8 ms in float32, `python bench/cpu_kernels.py`);
2. gives layers CPU stand-ins with the same weights and names (`__class__` swaps, nothing else is patched):
   - the LM's mlx-lm `Attention` / `MLP` (Qwen2, Llama) → `layers.CPUAttention` / `layers.CPUSwiGLUMLP`, and its
     `TransformerBlock` → `block.CPUDecoderBlock` (a quantized block's decode step as one op);
   - the LM's `nn.Linear` → `decode.CPULinear` and its `nn.Embedding` → `decode.CPUTiedHead` (decode GEMV, sliced
     head); `nn.QuantizedLinear` / `nn.QuantizedEmbedding` → `quantized.CPUQuantized*` (many rows dequantized);
     `nn.RMSNorm` → `fused.CPURMSNorm` (one op per decode-step norm; the attention's decode step, above, uses
     fused.py's rotations and attention too);
   - the vision tower's `Attention` / `MLP` → `layers.CPUVisionAttention` / `layers.CPUVisionMLP`;
3. moves the LM's weights into 2 MB pages (pages.py; BONSAI_HUGEPAGES=off skips it) and, with `pack` (inference:
   `io.load`), repacks 4-bit ones into the 16-row tiles of the AVX-512 VNNI kernel (csrc/packed.h; BONSAI_PACK=off
   keeps MLX's layout);
4. keeps 1 GB of freed MLX buffers for reuse (the default 32 MB made each prefill page-fault its activations in
   again: `python bench/cpu_prefill.py`, minor faults per prefill 12,698 → 10, median 1.62 → 1.39 s).
Each stand-in still decides per call (float32, on the CPU, rows) and otherwise runs its original class's code; none
changes results beyond float tolerance (tests/test_cpu.py). On a GPU, or with BONSAI_CPU_POLICY=off (read here, once
per call of `accelerate`), nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .block import CPUDecoderBlock
from .decode import CPULinear, CPUTiedHead
from .device import on_cpu
from .fused import CPURMSNorm
from .layers import CPUAttention, CPUSwiGLUMLP, CPUVisionAttention, CPUVisionMLP
from .pages import place_weights
from .quantized import CPUQuantizedEmbedding, CPUQuantizedLinear

POLICY_ENV = "BONSAI_CPU_POLICY"
CPU_CACHE_LIMIT = 1 << 30

# mlx-lm modules whose `Attention` / `MLP` classes the stand-ins match (same attribute names and call signature)
_MLX_LM_MODULES = ("mlx_lm.models.qwen2", "mlx_lm.models.llama")
_LM_SWAPS = {  # class name → (stand-in, the children it must have)
    "MLP": (CPUSwiGLUMLP, {"gate_proj", "up_proj", "down_proj"}),
    "Attention": (CPUAttention, {"q_proj", "k_proj", "v_proj", "o_proj", "rope"}),
    "TransformerBlock": (CPUDecoderBlock, {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}),
}
# exact classes → stand-ins (subclasses of them, so isinstance checks and the weights stay as they were)
_EXACT = {nn.Linear: CPULinear, nn.Embedding: CPUTiedHead, nn.QuantizedLinear: CPUQuantizedLinear,
          nn.QuantizedEmbedding: CPUQuantizedEmbedding, nn.RMSNorm: CPURMSNorm}


def policy_enabled() -> bool:
    """False when BONSAI_CPU_POLICY is off / 0 / none (to measure the plain MLX path)."""
    return os.environ.get(POLICY_ENV, "").strip().lower() not in ("off", "0", "none", "false")


@dataclass
class Acceleration:
    """What `accelerate` changed: `swapped` counts "original class → stand-in" pairs."""

    enabled: bool
    reason: str
    upcast: bool = False
    cache_limit: Optional[int] = None
    paged_bytes: int = 0
    huge_pages: bool = False
    packed: int = 0
    swapped: Dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.enabled:
            return f"CPU fast paths off ({self.reason})"
        parts = [f"{n} × {k}" for k, n in sorted(self.swapped.items())]
        parts += ["half → float32"] if self.upcast else []
        parts += [f"{self.packed} × 4-bit → 16-row tiles"] if self.packed else []
        parts += [f"LM weights in 2 MB pages ({self.paged_bytes / 1e6:.0f} MB)"] if self.huge_pages else []
        return "CPU fast paths: " + ", ".join(parts)


@lru_cache(maxsize=None)
def _combined(stand_in: type, cls: type) -> type:
    # a subclass of both: the stand-in's methods first, the original's for everything else (and for isinstance)
    return type(cls.__name__, (stand_in, cls), {"__module__": stand_in.__module__})


def _swap(m: nn.Module, stand_in: type, report: Acceleration) -> None:
    cls = type(m)
    m.__class__ = stand_in if issubclass(stand_in, cls) else _combined(stand_in, cls)
    key = f"{cls.__name__} → {stand_in.__name__}"
    report.swapped[key] = report.swapped.get(key, 0) + 1


def accelerate(model: nn.Module, upcast: bool = True, enabled: Optional[bool] = None, pack: bool = False) -> Acceleration:
    """Apply every CPU fast path to a `LlavaModel` (see the module docstring); returns what changed.

    upcast: cast half-precision weights to float32 (off when the caller asked for a dtype, e.g. bf16 training).
    pack: repack 4-bit LM weights into tiles (inference only: the weights no longer have MLX's layout).
    enabled: override BONSAI_CPU_POLICY. Idempotent: layers already swapped are left alone."""
    from ..vision import MLP as VisionMLP
    from ..vision import Attention as VisionAttention

    if enabled is None:
        enabled = policy_enabled()
    if not enabled:
        return Acceleration(False, f"{POLICY_ENV}={os.environ.get(POLICY_ENV)}")
    if not on_cpu():
        return Acceleration(False, f"device {mx.default_device()}: the GPU kernels are the fast path")
    report = Acceleration(True, "cpu")
    if upcast and any(v.dtype in (mx.bfloat16, mx.float16) for _, v in tree_flatten(model.parameters())):
        model.set_dtype(mx.float32)
        report.upcast = True
    lm = getattr(model, "language_model", model)
    for _, m in lm.named_modules():
        cls = type(m)
        if cls.__module__ in _MLX_LM_MODULES and cls.__name__ in _LM_SWAPS:
            stand_in, children = _LM_SWAPS[cls.__name__]
            if children <= set(m.children()):
                _swap(m, stand_in, report)
        elif cls in _EXACT:
            _swap(m, _EXACT[cls], report)
    tower = getattr(model, "vision_tower", None)
    for _, m in (tower.named_modules() if tower is not None else []):
        if type(m) is VisionAttention:
            _swap(m, CPUVisionAttention, report)
        elif type(m) is VisionMLP:
            _swap(m, CPUVisionMLP, report)
    placed = place_weights(lm, pack=pack)
    report.paged_bytes, report.huge_pages, report.packed = placed["bytes"], placed["huge_pages"], placed["packed"]
    prev = mx.set_cache_limit(CPU_CACHE_LIMIT)
    if prev > CPU_CACHE_LIMIT:  # never lower a limit the user set higher
        mx.set_cache_limit(prev)
    report.cache_limit = max(prev, CPU_CACHE_LIMIT)
    return report
