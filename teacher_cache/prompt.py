"""The teacher's prompt: LLaVA-1.5's `conv_vicuna_v1`, built from the same turns as the student's.

"A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and
polite answers to the human's questions. USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"

(LLaVA's `conv_vicuna_v1`: sep " ", sep2 "</s>", roles USER/ASSISTANT; the `<image>` moved to the front of the first
human turn, as LLaVA's preprocessing does — `bonsai_mlx.prompting.parse_turns` does that for both sides.)
"""

from __future__ import annotations

from typing import List, Tuple

from bonsai_mlx.prompting import IMAGE_TOKEN

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def vicuna_text(turns: List[Tuple[str, str]], image_seq_length: int) -> tuple:
    """(text with `<image>` expanded, [(start, end)] of each assistant turn's content)."""
    text = VICUNA_SYSTEM + " "
    spans = []
    for role, content in turns:
        if role == "user":
            text += "USER: " + content.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_seq_length) + " "
        else:
            text += "ASSISTANT: "
            spans.append((len(text), len(text) + len(content)))
            text += content + "</s>"
    return text, spans
