"""Quantized language model: saved and reloaded, identical logits; the vision tower and projector stay full precision."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import build_llava, image_token_id

from bonsai_mlx.cpu import accelerate
from bonsai_mlx.io import load_model, save_model
from bonsai_mlx.model import quantize_language_model


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_save_load_round_trip(tmp_path, tokenizer, bits):
    d, _ = build_llava(tmp_path / "m", tokenizer)
    model = load_model(d)
    ids = mx.array([[4, 5] + [image_token_id(tokenizer)] * 16 + [6, 7, 8, 9]])
    pix = mx.array(np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32))
    full = np.array(model(ids, pix))

    quantize_language_model(model, bits=bits)
    accelerate(model)  # the new quantized layers get the CPU kernels, as load_model(quantize=...) gives them
    assert isinstance(model.language_model.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert isinstance(model.language_model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.multi_modal_projector.linear_1, nn.Linear)
    assert not isinstance(model.vision_tower.vision_model.encoder.layers[0].mlp.fc1, nn.QuantizedLinear)
    q_logits = np.array(model(ids, pix))
    assert np.abs(q_logits - full).max() > 0  # quantization did something

    out = save_model(model, tmp_path / f"q{bits}", extra_files_from=d)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits
    reloaded = load_model(out)
    assert np.array_equal(np.array(reloaded(ids, pix)), q_logits)
    # quantize-on-load gives the same model as quantize-in-memory
    assert np.array_equal(np.array(load_model(d, quantize=bits)(ids, pix)), q_logits)
