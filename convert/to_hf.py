"""Export a bonsai-mlx student to a transformers `LlavaForConditionalGeneration` directory.

    python convert/to_hf.py --model STUDENT_DIR [--adapter RUN_DIR/checkpoint] --out DIR
                            [--dtype float16|bfloat16|float32] [--shard-size 2GB] [--peft] [--force]

The same as `bonsai-mlx export`. The result loads with `LlavaForConditionalGeneration.from_pretrained(DIR)` and
`AutoProcessor.from_pretrained(DIR)` (no custom code) and serves with vLLM. See bonsai_mlx/export/hf.py for details.
"""

import bonsai_mlx  # noqa: F401  (first: loads OpenBLAS before mlx on Linux)

# isort: split
from bonsai_mlx.cli import run_click
from bonsai_mlx.cli.export import export

if __name__ == "__main__":
    run_click(export)  # the `bonsai-mlx export` command itself, on this script's arguments
