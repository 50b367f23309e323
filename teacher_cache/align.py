"""Token alignment between two tokenizations of the same assistant text (docs/architecture.md, "Data flow").

Both prompts are built from the same turns, so each side knows the character span of every assistant turn's content.
A student token and a teacher token are paired when both end at the same character inside the same assistant span:
at that point both models have read exactly the same text. Framework-free.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple


def token_ends_in_spans(offsets: Sequence[Tuple[int, int]], spans: Sequence[Tuple[int, int]]) -> Dict[tuple, int]:
    """{(turn, end char relative to the turn's content start): token index} for tokens ending inside a span.

    A token "ends inside" span [s, e) when s < end <= e (its last character is part of the answer). Zero-width
    tokens (special tokens with empty offsets) are ignored. When several tokens end at the same character (byte
    pieces of one multi-byte character), the last one is kept: it is the one that has read the whole character.
    """
    out: Dict[tuple, int] = {}
    for i, (a, b) in enumerate(offsets):
        if b <= a:
            continue
        for t, (s, e) in enumerate(spans):
            if s < b <= e:
                out[(t, b - s)] = i
                break
    return out


def align(student_offsets, student_spans, teacher_offsets, teacher_spans) -> Tuple[List[int], List[int], int]:
    """Pairs (student positions, teacher positions) in order, and the number of student response tokens."""
    if len(student_spans) != len(teacher_spans):
        raise ValueError(f"{len(student_spans)} student answers vs {len(teacher_spans)} teacher answers")
    s_ends = token_ends_in_spans(student_offsets, student_spans)
    t_ends = token_ends_in_spans(teacher_offsets, teacher_spans)
    keys = sorted(k for k in s_ends if k in t_ends)
    return [s_ends[k] for k in keys], [t_ends[k] for k in keys], len(s_ends)
