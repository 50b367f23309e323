"""Export a bonsai-mlx student to a transformers `LlavaForConditionalGeneration` directory.

    python convert/to_hf.py --model STUDENT_DIR [--adapter RUN_DIR/checkpoint] --out DIR
                            [--dtype float16|bfloat16|float32] [--shard-size 2GB] [--peft] [--force]

The same as `bonsai-mlx export`. The result loads with `LlavaForConditionalGeneration.from_pretrained(DIR)` and
`AutoProcessor.from_pretrained(DIR)` (no custom code) and serves with vLLM. See bonsai_mlx/export.py for details.
"""

import bonsai_mlx  # noqa: F401  (first: loads OpenBLAS before mlx on Linux)

# isort: split
import sys

from bonsai_mlx.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "export", *sys.argv[1:]]
    main()
