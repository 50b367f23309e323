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
        last_only: compute logits for the last position only (prefill for generation); with a KV cache the last
            layer then runs its queries, attention and MLP for that position only (`_tail_block`).
        compute_logits: False: only fill the cache (a prefill chunk); then returns (None, None).

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
    # prefill: when at most the last position's output is wanted, the last layer only needs K/V for every position
    tail = (last_only or not compute_logits) and not output_hidden_states and _tail_ok(layers[-1], cache[-1])
    for layer, c in zip(layers[:-1] if tail else layers, cache, strict=False):
        h = layer(h, mask, c)
        if output_hidden_states:
            hidden_states.append(h)
    if tail:
        h = _tail_block(layers[-1], h, cache[-1], keep=compute_logits)
        if h is None:
            return None, None
    h = inner.norm(h)
    if output_hidden_states:
        hidden_states[-1] = h  # transformers replaces the last entry with the normed output
    logits = None
    if compute_logits:
        if last_only:
            h = h[:, -1:]
        logits = lm_head(lm, h)
    return logits, hidden_states


def _tail_ok(layer: nn.Module, cache) -> bool:
    """`_tail_block` reproduces mlx-lm's Qwen2 / Llama TransformerBlock, without a cache or with a plain KVCache."""
    from mlx_lm.models.cache import KVCache

    attn = getattr(layer, "self_attn", None)
    return (
        (cache is None or type(cache) is KVCache)
        and type(layer).__module__ in ("mlx_lm.models.qwen2", "mlx_lm.models.llama")
        and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "n_kv_heads"))
    )


def _tail_block(layer: nn.Module, h: mx.array, cache, keep: bool) -> Optional[mx.array]:
    """The last decoder layer when only the last position's output is needed (`keep`) or none (a prefill chunk
    that only fills the cache): keys/values of every position go to the cache, but queries, attention and the MLP
    run for the last row only — exactly the rows mlx-lm's TransformerBlock would have given there (llama.cpp skips
    the unused rows of its last layer the same way). h [B, L, D] → [B, 1, D] or None."""
    from mlx_lm.models.base import scaled_dot_product_attention

    attn = layer.self_attn
    B, L, _ = h.shape
    r = layer.input_layernorm(h)  # [B, L, D]
    offset = cache.offset if cache is not None else 0
    keys = attn.k_proj(r).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)  # [B, Hk, L, Dh]
    values = attn.v_proj(r).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    keys = attn.rope(keys, offset=offset)
    if cache is not None:
        keys, values = cache.update_and_fetch(keys, values)
    if not keep:
        return None
    q = attn.q_proj(r[:, -1:]).reshape(B, 1, attn.n_heads, -1).transpose(0, 2, 1, 3)  # [B, H, 1, Dh]
    q = attn.rope(q, offset=offset + L - 1)
    # the last query sees every key: no mask; one query takes mlx-lm's attention on every device (cpu/attention.py)
    out = scaled_dot_product_attention(q, keys, values, cache=cache, scale=attn.scale, mask=None)
    x = h[:, -1:] + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, 1, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def lm_head(lm: nn.Module, h: mx.array) -> mx.array:
    if getattr(lm.args, "tie_word_embeddings", False):
        return lm.model.embed_tokens.as_linear(h)
    return lm.lm_head(h)
