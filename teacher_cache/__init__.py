"""teacher_cache: precompute a LLaVA teacher's hidden states, aligned to the student's tokens, sharded to disk.

PyTorch + transformers; never imports mlx. The student side reads the shards with `mx.load` / `safetensors.numpy`
(see `teacher_cache.format`, which is framework-free). Run as `python -m teacher_cache {plan,build,verify}`.
"""

import os
import sys

# The prompting code lives in bonsai_mlx (framework-free); importing that package must not load a BLAS for MLX
# into this PyTorch process (unless bonsai_mlx is already in use here, as in the tests).
if "bonsai_mlx" not in sys.modules:
    os.environ.setdefault("BONSAI_BLAS", "none")

from bonsai_mlx.prompting import PROMPT_TEMPLATE_VERSION  # noqa: E402,F401  (one source for both sides)

FORMAT_VERSION = 2  # 2: shards map samples to image rows (text-only records keep their text states)
