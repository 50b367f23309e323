"""Training losses.

`masked_ce`: next-token cross-entropy summed over supervised target positions (the label mask of
`prompting.encode_example`), returned with the count so gradient accumulation can take the mean over the supervised
tokens of the whole accumulated batch (README "Train"), not a mean of per-micro-batch means.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def masked_ce(logits: mx.array, input_ids: mx.array, labels_mask: mx.array):
    """logits [B, T, V] (position t predicts token t+1); labels_mask [B, T] marks supervised *tokens*.

    Returns (sum of CE over supervised targets, number of supervised targets), both float32 scalars.
    """
    targets = input_ids[:, 1:]  # [B, T-1]
    mask = labels_mask[:, 1:].astype(mx.float32)  # [B, T-1]
    ce = nn.losses.cross_entropy(logits[:, :-1].astype(mx.float32), targets, reduction="none")  # [B, T-1]
    return (ce * mask).sum(), mask.sum()
