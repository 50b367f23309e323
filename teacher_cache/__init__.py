"""teacher_cache: precompute a LLaVA teacher's hidden states, aligned to the student's tokens, sharded to disk.

PyTorch + transformers; never imports mlx. The student side reads the shards with `mx.load` / `safetensors.numpy`
(see `teacher_cache.format`, which is framework-free). Run as `python -m teacher_cache {plan,build,verify}`.
"""

import os

# The prompting code lives in bonsai_mlx (framework-free); importing that package must not load a BLAS for MLX
# into this PyTorch process.
os.environ.setdefault("BONSAI_BLAS", "none")

FORMAT_VERSION = 1
PROMPT_TEMPLATE_VERSION = "vicuna_v1+chatml-qwen/1"
