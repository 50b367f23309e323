"""Units and names the command line takes: sizes (`--shard-size 2GB`) and dtype names (`--dtype`). Framework-free
(the teacher tool uses it)."""

from __future__ import annotations

import re
from typing import Union

from .errors import BonsaiError

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # io.DTYPES maps them to mlx dtypes


def parse_size(s: Union[str, int]) -> int:
    """"2GB" / "500MB" / "1.5G" / 123 → bytes (powers of 1024)."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", s.upper())
    if not m:
        raise BonsaiError(f"--shard-size {s!r}: use a size like 2GB or 500MB")
    mult = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30,
            "T": 1 << 40, "TB": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)
