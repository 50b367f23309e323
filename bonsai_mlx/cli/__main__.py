"""`python -m bonsai_mlx.cli …` = `bonsai-mlx …`."""

from . import main

main()
