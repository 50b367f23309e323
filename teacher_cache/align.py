"""Token alignment between two tokenizations of the same assistant text (docs/architecture.md, "Data flow").

Both prompts are built from the same turns, so each side knows the character span of every assistant turn's content.
A student token and a teacher token are paired when both end at the same character inside the same assistant span:
at that point both models have read exactly the same text. Framework-free.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np


def token_ends_in_spans(offsets: Sequence[Tuple[int, int]], spans: Sequence[Tuple[int, int]]) -> Dict[tuple, int]:
    """{(turn, end char relative to the turn's content start): token index} for tokens ending inside a span.

    A token "ends inside" span [s, e) when s < end <= e (its last character is part of the answer). Zero-width
    tokens (special tokens with empty offsets) are ignored. When several tokens end at the same character (byte
    pieces of one multi-byte character), the last one is kept: it is the one that has read the whole character.
    With arrays (a teacher sequence is ~700 tokens, 576 of them image tokens): the spans are sorted and disjoint, so
    the only candidate for a token is the last span starting before its end.
    """
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    sp = np.asarray(spans, np.int64).reshape(-1, 2)
    if not len(off) or not len(sp):
        return {}
    a, b = off[:, 0], off[:, 1]
    t = np.searchsorted(sp[:, 0], b, side="left") - 1  # the last span with s < b
    tc = np.maximum(t, 0)
    hit = np.flatnonzero((b > a) & (t >= 0) & (b <= sp[tc, 1]))
    rel = b[hit] - sp[tc[hit], 0]
    keys = zip(t[hit].tolist(), rel.tolist(), strict=True)
    return dict(zip(keys, hit.tolist(), strict=True))  # later tokens overwrite earlier ones: the last one is kept


def align(student_offsets, student_spans, teacher_offsets, teacher_spans) -> Tuple[List[int], List[int], int]:
    """Pairs (student positions, teacher positions) in order, and the number of student response tokens."""
    if len(student_spans) != len(teacher_spans):
        raise ValueError(f"{len(student_spans)} student answers vs {len(teacher_spans)} teacher answers")
    s_ends = token_ends_in_spans(student_offsets, student_spans)
    t_ends = token_ends_in_spans(teacher_offsets, teacher_spans)
    keys = sorted(k for k in s_ends if k in t_ends)
    return [s_ends[k] for k in keys], [t_ends[k] for k in keys], len(s_ends)
