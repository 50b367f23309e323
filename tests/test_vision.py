"""SigLIP tower parity with transformers' SiglipVisionModel (fp32, same random weights)."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import siglip_vision_kwargs
from transformers import SiglipVisionConfig, SiglipVisionModel

from bonsai_mlx.vision import VisionConfig, VisionTower


def _pair(seed=0, **over):
    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(**siglip_vision_kwargs(**over))
    hf = SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = VisionTower(VisionConfig.from_dict(cfg.to_dict()))
    sd = {k: mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    ours.load_weights(list(VisionTower.sanitize(sd).items()), strict=True)
    return hf, ours


@pytest.mark.parametrize("over", [{}, {"image_size": 48, "patch_size": 16, "num_hidden_layers": 2}])
def test_hidden_states_and_post_layernorm_match(over):
    hf, ours = _pair(**over)
    size = over.get("image_size", 32)
    pix = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(pix), output_hidden_states=True)
    pooled, hidden = ours(mx.array(pix.transpose(0, 2, 3, 1)))
    assert len(hidden) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(hidden, ref.hidden_states, strict=True)):
        assert np.abs(np.array(a) - b.numpy()).max() <= 1e-4, f"hidden_states[{i}]"
    assert np.abs(np.array(pooled) - ref.last_hidden_state.numpy()).max() <= 1e-4
    # channels-first input (transformers' layout) gives the same result
    pooled_cf, _ = ours(mx.array(pix))
    assert np.array_equal(np.array(pooled_cf), np.array(pooled))


def test_stop_at_runs_fewer_layers_with_same_states():
    hf, ours = _pair()
    pix = mx.array(np.random.default_rng(2).standard_normal((1, 32, 32, 3)).astype(np.float32))
    _, full = ours(pix)
    pooled, part = ours(pix, stop_at=2)
    assert pooled is None and len(part) == 3
    for a, b in zip(part, full[:3], strict=True):
        assert np.array_equal(np.array(a), np.array(b))


def test_sanitize_drops_head_and_converts_conv_layout():
    hf, _ = _pair(vision_use_head=True)
    sd = {k: mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    out = VisionTower.sanitize(sd)
    assert not any(".head." in k for k in out)
    w = out["vision_model.embeddings.patch_embedding.weight"]
    assert w.shape == (32, 8, 8, 3)  # OHWI
    back = VisionTower.to_hf(out)["vision_model.embeddings.patch_embedding.weight"]
    assert np.array_equal(np.array(back), hf.state_dict()["embeddings.patch_embedding.weight"].numpy())
