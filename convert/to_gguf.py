"""Export a bonsai-mlx student to llama.cpp: a `qwen2` text GGUF and a `clip` mmproj GGUF.

    python convert/to_gguf.py --model STUDENT_DIR [--adapter RUN_DIR/checkpoint] --out DIR [--type f16|q8_0|q4_0]
                              [--force]

The same as `bonsai-mlx export --format gguf`. Writes DIR/NAME-TYPE.gguf and DIR/mmproj-NAME-F16.gguf for
`llama-mtmd-cli -m … --mmproj …`, `llama-server`, or llama-cpp-python. See bonsai_mlx/export/gguf.py for details.
"""

import bonsai_mlx  # noqa: F401  (first: loads OpenBLAS before mlx on Linux)

# isort: split
from bonsai_mlx.cli import run_click
from bonsai_mlx.cli.export import export_gguf

if __name__ == "__main__":
    run_click(export_gguf)
