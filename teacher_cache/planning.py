"""`teacher_cache plan`: the bytes a build will write, computed before any weights are loaded.

With --student-tokenizer and --teacher (tokenizers and config.json only), the aligned token count is exact: the same
tokenization and alignment code the build runs. Without them it assumes ~4 characters per token and full coverage.
"""

from __future__ import annotations

import math
from typing import List, Optional

from bonsai_mlx.hub import resolve
from bonsai_mlx.prompting import RecordError, parse_turns
from bonsai_mlx.train.data import read_records


def estimate(data, layers: List[int], limit: Optional[int], image_states: bool, image_layers: Optional[List[int]],
             dtype: str, student_tokenizer: Optional[str], teacher: Optional[str], hidden_size: int,
             image_grid: int, shard_bytes: int = 1_900_000_000, logits_topk: int = 0) -> dict:
    records = read_records(data)
    if limit is not None:
        records = records[:limit]
    img_layers = (image_layers or list(layers)) if image_states else []
    bytes_per = 1 if dtype == "int8" else 2
    tokens, usable, skipped, with_image = 0, 0, 0, 0
    if student_tokenizer and teacher:
        from transformers import AutoTokenizer, LlavaConfig

        from .records import prepare, student_side

        student = student_side(student_tokenizer)
        tdir = resolve(teacher, what="teacher")
        tcfg = LlavaConfig.from_pretrained(str(tdir))
        hidden_size = int(tcfg.text_config.hidden_size)
        ttok = AutoTokenizer.from_pretrained(str(tdir))
        g = tcfg.vision_config.image_size // tcfg.vision_config.patch_size
        image_grid = student.grid[0]
        for i, rec in enumerate(records):
            try:
                p = prepare(i, rec, student, ttok, g * g, int(tcfg.image_token_id))
            except RecordError:
                skipped += 1
                continue
            usable += 1
            tokens += len(p.student_positions)
            with_image += p.image is not None
        method = "exact: student and teacher tokenizers"
    else:
        for rec in records:
            try:
                turns, image = parse_turns(rec)
            except RecordError:
                skipped += 1
                continue
            usable += 1
            with_image += image is not None
            tokens += sum(len(c) for r, c in turns if r == "assistant") // 4
        method = "estimated at 4 characters per token"
    per_token = hidden_size * bytes_per * len(layers) + 4 + (4 * len(layers) if dtype == "int8" else 0) \
        + logits_topk * 6  # float16 log-prob + int32 id
    per_image = image_grid * image_grid * (hidden_size * bytes_per + (4 if dtype == "int8" else 0)) * len(img_layers)
    n_img = with_image if img_layers else 0
    data_bytes = tokens * per_token + n_img * per_image + usable * 16 + 8
    # each shard also carries a safetensors JSON header: ~80 bytes per tensor
    n_tensors = 3 + (len(layers) + len(img_layers)) * (2 if dtype == "int8" else 1) + (2 if logits_topk else 0)
    n_shards = max(1, math.ceil(data_bytes / shard_bytes))
    total = data_bytes + n_shards * (8 + 80 * n_tensors)
    return {
        "records": len(records), "usable": usable, "skipped": skipped, "tokens": tokens, "tokens_method": method,
        "layers": layers, "image_layers": img_layers, "hidden_size": hidden_size, "dtype": dtype,
        "bytes_per_sample": total / max(usable, 1), "total_bytes": int(total), "shards": n_shards,
        "logits_topk": logits_topk,
    }


__all__ = ["estimate"]
