"""One record → what the teacher build needs: the student side (tokenizer, image tokens, grid), the aligned student
and teacher positions of one record (`prepare`, `prepare_many`: the student trainer's own encoding and LLaVA-1.5's
Vicuna-v1 prompt, paired by `align.py`), and the teacher's image framing. PyTorch-free; `build.py` and `plan` use
it (split out of build.py, which runs the teacher).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import List, Optional

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.hub import resolve
from bonsai_mlx.processing import to_rgb
from bonsai_mlx.prompting import RecordError, parse_turns
from bonsai_mlx.train.data import file_sha256
from bonsai_mlx.train.prepare import encode_many

from .align import align
from .prompt import vicuna_text


# --- the student side ------------------------------------------------------------------------------------------------
@dataclass
class StudentSide:
    tokenizer: object
    image_tokens: int  # image tokens per image in the student's sequence (196 for the real student)
    grid: tuple  # the student's patch grid (14, 14)
    repo: str
    tokenizer_sha256: str


def student_side(ref: str, image_tokens: Optional[int] = None) -> StudentSide:
    from transformers import AutoTokenizer

    d = resolve(ref, what="student tokenizer")
    tok = AutoTokenizer.from_pretrained(str(d))
    cfg_file = d / "config.json"
    if image_tokens is None:
        if not cfg_file.exists():
            raise BonsaiError(f"{d}: no config.json to read the student's image-token count from; pass "
                              "--student-image-tokens")
        image_tokens = int(json.loads(cfg_file.read_text())["image_seq_length"])
    side = int(math.isqrt(image_tokens))
    tj = d / "tokenizer.json"
    return StudentSide(tok, image_tokens, (side, side), ref, file_sha256(tj) if tj.exists() else "")


# --- one record → aligned positions ------------------------------------------------------------------------------------
@dataclass
class Prepared:
    index: int
    teacher_ids: List[int]
    student_positions: List[int]
    teacher_positions: List[int]
    response_tokens: int
    image: Optional[str] = None


def prepare(index: int, record, student: StudentSide, teacher_tok, teacher_image_tokens: int,
            image_token_id: int) -> Prepared:
    """One record's aligned positions (raises RecordError): `prepare_many` for one."""
    p = prepare_many([index], [record], student, teacher_tok, teacher_image_tokens, image_token_id)[0]
    if isinstance(p, RecordError):
        raise p
    return p


def prepare_many(indices, records, student: StudentSide, teacher_tok, teacher_image_tokens: int,
                 image_token_id: int) -> list:
    """Per record, its `Prepared` or the `RecordError` that refuses it. The student side is the trainer's own
    preparation (`bonsai_mlx.train.prepare.encode_many`: one batched tokenizer call); the teacher side is one batched
    call too."""
    exs = encode_many(student.tokenizer, records, student.image_tokens)
    out: list = list(exs)
    todo = [k for k, ex in enumerate(exs) if not isinstance(ex, RecordError)]
    texts, spans = [], []
    for k in todo:
        turns, image = parse_turns(records[k])
        text, sp = vicuna_text(turns, teacher_image_tokens if image is not None else 0)
        texts.append(text)
        spans.append(sp)
    if not todo:
        return out
    enc = teacher_tok(texts, add_special_tokens=True, return_offsets_mapping=True)
    for k, ids, offs, sp in zip(todo, enc["input_ids"], enc["offset_mapping"], spans, strict=True):
        ex = exs[k]
        ids = list(ids)
        if ex.image is not None and ids.count(image_token_id) != teacher_image_tokens:
            raise BonsaiError(f"teacher tokenizer: <image> gave {ids.count(image_token_id)} image ids, the config "
                              f"expects {teacher_image_tokens} (is <image> a special token of this tokenizer?)")
        s_pos, t_pos, n_resp = align(ex.offsets, ex.spans, offs, sp)
        out[k] = Prepared(indices[k], ids, s_pos, t_pos, n_resp, ex.image)
    return out


# --- images --------------------------------------------------------------------------------------------------------------
def frame_image(img, framing: str, size: int, mean) -> object:
    """"resize": stretch to a square (no crop), as the student's SigLIP processor frames it, so the teacher's and
    the student's patch grids cover the same pixels. "pad": LLaVA-1.5's expand2square with the mean colour."""
    from PIL import Image

    img = to_rgb(img)
    if framing == "resize":
        return img.resize((size, size), resample=Image.BICUBIC)
    w, h = img.size
    if w == h:
        return img
    bg = tuple(int(x * 255) for x in mean)
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), bg)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas
