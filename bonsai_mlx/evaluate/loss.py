"""Held-out loss: mean cross-entropy (and perplexity) over the assistant tokens, with a bootstrap interval — the
training loss on other data."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..errors import BonsaiError
from .stats import bootstrap_ci


def per_sample_ce(model, dataset, image_processor, pad_id: int, batch_size: int = 4) -> tuple:
    """(CE sums, supervised-token counts) per sample of a tokenized `SFTDataset`, in batches (right padding does not
    change a row's logits). The trainer's eval loss and `eval --task loss` both come from here."""
    import mlx.core as mx

    from ..train.data import BatchIterator
    from ..train.losses import masked_ce

    it = BatchIterator(dataset, batch_size, 0, image_processor, pad_id, drop_last=False)
    model.eval()
    sums, counts = [], []
    for idx in it.buckets:
        b = it.make_batch(idx)
        if b.input_ids.shape[0] == 0:
            continue
        ids = mx.array(b.input_ids)
        px = mx.array(b.pixel_values) if b.pixel_values is not None else None
        logits = model(ids, px)
        for r in range(ids.shape[0]):
            s, n = masked_ce(logits[r : r + 1], ids[r : r + 1], mx.array(b.labels_mask[r : r + 1]))
            sums.append(float(s))
            counts.append(float(n))
    return np.array(sums), np.array(counts)


def eval_loss(model, processor, records: list, image_root, limit: Optional[int] = None, batch_size: int = 4,
              max_seq_len: int = 2048, source: str = "data") -> dict:
    from ..train.data import SFTDataset

    if limit is not None:
        records = records[:limit]
    tok = processor.tokenizer._tokenizer
    ds = SFTDataset(records, tok, image_root, processor.image_seq_length, max_seq_len, source=source)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    sums_a, counts_a = per_sample_ce(model, ds, processor.image_processor, pad, batch_size)
    if counts_a.sum() == 0:
        raise BonsaiError(f"{source}: no supervised tokens to evaluate\n{ds.report()}")
    loss = float(sums_a.sum() / counts_a.sum())
    ci = bootstrap_ci(lambda ix: sums_a[ix].sum() / max(counts_a[ix].sum(), 1.0), len(sums_a))
    return {"task": "loss", "loss": {"value": loss, "ci95": ci, "n": len(sums_a)},
            "perplexity": {"value": math.exp(min(loss, 50)), "ci95": [math.exp(min(c, 50)) for c in ci],
                           "n": len(sums_a)},
            "tokens": int(counts_a.sum()), "skipped": dict(ds.skipped)}

