"""`python -m bonsai_mlx …` = `bonsai-mlx …` (as `python -m mlx_lm`; `mlx.launch --python` users rely on it)."""

from .cli import main

main()
