"""bonsai-mlx: Bonsai-LLaVA (SigLIP + projector + Qwen2.5) in MLX.

Importing the package does not import mlx: submodules that need it import it themselves, so framework-free parts
(prompting, data formats) can be used by the PyTorch teacher tool.
"""

import os as _os

__version__ = "0.1.0"

# bonsai_mlx never needs PyTorch; keep transformers' "PyTorch was not found" advice off stderr so user-facing errors
# stay one line on a torch-free install.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from .cpu import blas as _blas  # noqa: E402

# On Linux, an optimized BLAS must be loaded before mlx.core is first imported (see cpu/blas.py).
_blas.maybe_load()


def __getattr__(name):
    # Lazy re-exports in the style of mlx_lm (`from bonsai_mlx import load_model`).
    if name in ("LlavaModel", "ModelConfig"):
        from . import model

        return getattr(model, name)
    if name in ("load", "load_model", "save_model"):
        from . import io

        return getattr(io, name)
    if name in ("accelerate",):
        from .cpu import policy

        return policy.accelerate
    if name in ("generate", "stream_generate"):
        import importlib

        # import_module, not `from . import generate`: that would look the attribute up here first and recurse
        return getattr(importlib.import_module(".generate", __name__), name)
    raise AttributeError(f"module 'bonsai_mlx' has no attribute {name!r}")
