"""What runs differently on a CPU, in one package (docs/architecture.md, "The CPU path").

- `blas`: loads an optimized BLAS before `mlx.core` (imported by `bonsai_mlx/__init__`; no mlx import here);
- `accelerate(model)` (policy.py): the one step that switches a loaded model's layers to the CPU kernels below
  and reports what it changed;
- the kernels: `activations` (rational tanh: SiLU, tanh-GELU, softmax exponentials), `attention`, `quantized`
  (dequantized many-row products), `decode` (one-row products by cblas_sgemv, sliced tied head), `layers` (the
  stand-in modules), `device` (the per-call checks), `qmm` (the compiled kernel), `fused` (the decode step's small
  ops as one op each), `block` (a quantized transformer block's decode step as one op).

This `__init__` imports no mlx, so that the BLAS can be loaded first.
"""


def __getattr__(name):
    if name in ("accelerate", "Acceleration", "policy_enabled"):
        from . import policy

        return getattr(policy, name)
    raise AttributeError(f"module 'bonsai_mlx.cpu' has no attribute {name!r}")
