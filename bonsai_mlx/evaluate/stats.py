"""Statistics and answer matching for evaluation: Wilson intervals, bootstrap intervals, VQA-v2 answer normalization.
Framework-free (the PyTorch teacher example uses it too)."""

from __future__ import annotations

import math
import re
from typing import List

import numpy as np

Z95 = 1.959963984540054


# --- statistics -------------------------------------------------------------------------------------------------


def wilson(k: float, n: int, z: float = Z95) -> List[float]:
    """95% Wilson score interval of a proportion k/n ([nan, nan] when n is 0)."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, centre - half), min(1.0, centre + half)]


def proportion(k: float, n: int) -> dict:
    return {"value": k / n if n else float("nan"), "ci95": wilson(k, n), "n": n}


def bootstrap_ci(stat, n: int, reps: int = 1000, seed: int = 0) -> List[float]:
    """Percentile bootstrap 95% interval of `stat(indices)` over n samples."""
    if n == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(reps)], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return [float("nan"), float("nan")]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


# --- answers ----------------------------------------------------------------------------------------------------

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$.:']")


def normalize_answer(s: str) -> str:
    """VQA-v2-style normalization: 'Two.' → '2', 'The Circle!' → 'circle', 'colour' spelling kept as given."""
    s = _PUNCT.sub(" ", s.lower().replace("\n", " "))
    words = [_NUMBERS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)

