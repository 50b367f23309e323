"""The language model: mlx-lm's implementation (Qwen2 for the student), driven layer by layer.

We reuse mlx-lm's model classes (attention, RoPE, KV cache, quantization, LoRA all come with them) and only add a
forward that starts from input embeddings and can return per-layer hidden states, which mlx-lm's `__call__` does not.
"""

from __future__ import annotations

import copy
from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.utils import _get_classes


def normalize_text_config(text_config: dict) -> dict:
    """Fill a llava `text_config` with its model class's defaults and make RoPE readable by mlx-lm.

    Published llava-hf configs list only non-default fields (the defaults live in the transformers config class), and
    transformers 5 writes `rope_parameters` where mlx-lm reads a top-level `rope_theta` (without it the logits are off
    by ~10x on Qwen2). Uses transformers' config classes (no torch needed) for the defaults.
    """
    from transformers import AutoConfig

    cfg = dict(text_config)
    model_type = cfg.get("model_type", "llama")  # LlavaConfig's default text backbone is llama
    try:
        full = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k != "model_type"}).to_dict()
    except (KeyError, ValueError):
        full = {}
    full.update({k: v for k, v in cfg.items() if k not in full or full[k] is None})
    full["model_type"] = model_type
    rope = full.get("rope_parameters") or full.get("rope_scaling") or {}
    if full.get("rope_theta") is None and isinstance(rope, dict) and "rope_theta" in rope:
        full["rope_theta"] = rope["rope_theta"]
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type in (None, "default"):
        full["rope_scaling"] = None
    else:
        full["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if full.get("rope_theta") is None:
        raise ValueError("text_config has neither `rope_theta` nor `rope_parameters.rope_theta`")
    return full


def build_language_model(text_config: dict) -> nn.Module:
    """An mlx-lm `Model` for the (normalized) text config; its params are named `model.*` / `lm_head.*`."""
    model_cls, args_cls = _get_classes(text_config)
    return model_cls(args_cls.from_dict(copy.deepcopy(text_config)))


def embed_tokens(lm: nn.Module) -> nn.Module:
    return lm.model.embed_tokens


def lm_forward(
    lm: nn.Module,
    input_embeddings: mx.array,
    cache: Optional[List[Any]] = None,
    output_hidden_states: bool = False,
    last_only: bool = False,
    compute_logits: bool = True,
):
    """Run mlx-lm's decoder from embeddings.

    Args:
        input_embeddings: [B, T, D]
        cache: mlx-lm KV caches (one per layer) or None.
        output_hidden_states: also return transformers-style hidden states: [embeddings, layer 1, …, layer N-1,
            final-norm(layer N)] — exactly `output_hidden_states=True` of transformers' Qwen2/Llama models.
        last_only: compute logits for the last position only (prefill for generation).

    Returns:
        (logits [B, T or 1, V] or None, hidden_states list or None)
    """
    inner = lm.model
    h = input_embeddings
    layers = inner.layers
    if cache is None:
        cache = [None] * len(layers)
    mask = create_attention_mask(h, cache[0])
    hidden_states = [h] if output_hidden_states else None
    for layer, c in zip(layers, cache, strict=True):
        h = layer(h, mask, c)
        if output_hidden_states:
            hidden_states.append(h)
    h = inner.norm(h)
    if output_hidden_states:
        hidden_states[-1] = h  # transformers replaces the last entry with the normed output
    logits = None
    if compute_logits:
        if last_only:
            h = h[:, -1:]
        logits = lm_head(lm, h)
    return logits, hidden_states


def lm_head(lm: nn.Module, h: mx.array) -> mx.array:
    if getattr(lm.args, "tie_word_embeddings", False):
        return lm.model.embed_tokens.as_linear(h)
    return lm.lm_head(h)
