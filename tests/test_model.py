"""Whole-student parity with transformers' LlavaForConditionalGeneration (SigLIP vision + Qwen2 text, fp32)."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import build_llava, image_token_id

from bonsai_mlx.io import load_model
from bonsai_mlx.language import normalize_text_config

P = 16  # image tokens of the tiny tower (32 / 8) ** 2


def _rows(tok, rng):
    """Two rows of different lengths (right padding): image first, and image in the middle of the text."""
    img = image_token_id(tok)
    text = lambda n: list(rng.integers(3, len(tok) - 2, size=n))  # noqa: E731
    row_a = text(3) + [img] * P + text(9)
    row_b = text(7) + [img] * P + text(4) + [img] * P + text(2)  # two images in one row, the first mid-text
    T = max(len(row_a), len(row_b))
    ids = np.full((2, T), tok.pad_token_id, dtype=np.int64)
    mask = np.zeros((2, T), dtype=np.int64)
    for r, row in enumerate((row_a, row_b)):
        ids[r, : len(row)] = row
        mask[r, : len(row)] = 1
    return ids, mask


@pytest.mark.parametrize(
    "layer,layout,tie", [(-1, "published", True), (-2, "published", True), (-1, "v5", False), (-2, "v5", True)]
)
def test_logits_match_transformers(tmp_path, tokenizer, rng, layer, layout, tie):
    d, hf = build_llava(tmp_path / "m", tokenizer, vision_feature_layer=layer, layout=layout, tie=tie)
    ids, mask = _rows(tokenizer, rng)
    pix = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)  # 3 images: 1 in row 0, 2 in row 1
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 pixel_values=torch.from_numpy(pix), output_hidden_states=True)
    model = load_model(d)
    logits, hidden = model(mx.array(ids), mx.array(pix.transpose(0, 2, 3, 1)), output_hidden_states=True)
    logits = np.array(logits)
    valid = mask.astype(bool)
    assert np.abs(logits[valid] - ref.logits.numpy()[valid]).max() <= 1e-4
    # per-layer LM hidden states (what HSD distills) match transformers' output_hidden_states too
    assert len(hidden) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(hidden, ref.hidden_states, strict=True)):
        assert np.abs(np.array(a)[valid] - b.numpy()[valid]).max() <= 1e-4, f"hidden_states[{i}]"


def test_last_only_logits_equal_full(tmp_path, tokenizer, rng):
    d, _ = build_llava(tmp_path / "m", tokenizer)
    model = load_model(d)
    ids, _ = _rows(tokenizer, rng)
    ids = mx.array(ids[1:2])
    pix = mx.array(rng.standard_normal((2, 32, 32, 3)).astype(np.float32))
    full = model(ids, pix)
    last = model(ids, pix, last_only=True)
    assert last.shape == (1, 1, full.shape[-1])
    assert np.abs(np.array(last[0, 0]) - np.array(full[0, -1])).max() <= 1e-5


def test_image_token_count_mismatch_is_a_clear_error(tmp_path, tokenizer, rng):
    d, _ = build_llava(tmp_path / "m", tokenizer)
    model = load_model(d)
    ids = mx.array([[5, 6] + [image_token_id(tokenizer)] * (P - 1) + [7]])
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(ids, mx.array(rng.standard_normal((1, 32, 32, 3)).astype(np.float32)))


def test_rope_theta_from_rope_parameters_or_top_level():
    a = normalize_text_config({"model_type": "qwen2", "rope_parameters": {"rope_theta": 1234.0, "rope_type": "default"}})
    b = normalize_text_config({"model_type": "qwen2", "rope_theta": 1234.0})
    assert a["rope_theta"] == b["rope_theta"] == 1234.0
    assert a["rope_scaling"] is None
    # defaults of a sparse published text_config come from the transformers config class
    c = normalize_text_config({"model_type": "qwen2", "vocab_size": 100, "rope_theta": 5.0})
    assert c["hidden_size"] == 4096 and c["vocab_size"] == 100
