"""`bonsai-mlx init`: a new student from a full SigLIP checkpoint and a Qwen2 checkpoint."""

import json

import mlx.core as mx
import numpy as np
import torch
from click.testing import CliRunner
from conftest import qwen2_kwargs, siglip_vision_kwargs
from transformers import (
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

from bonsai_mlx.cli import cli
from bonsai_mlx.io import load_model
from bonsai_mlx.pico import train_tokenizer


def _backbones(tmp_path):
    torch.manual_seed(0)
    sig = SiglipModel(SiglipConfig(
        vision_config=siglip_vision_kwargs(),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=16),
    )).eval()
    sig.save_pretrained(str(tmp_path / "siglip"))
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(tmp_path / "siglip"))
    tok = train_tokenizer(image_token=False)  # as Qwen2.5 ships it: no <image> yet
    qwen = Qwen2ForCausalLM(Qwen2Config(**qwen2_kwargs(-(-(len(tok) + 1) // 64) * 64))).eval()
    qwen.save_pretrained(str(tmp_path / "qwen"))
    tok.save_pretrained(str(tmp_path / "qwen"))
    return sig, qwen, tok


def test_init_writes_a_directory_transformers_loads(tmp_path):
    sig, qwen, tok = _backbones(tmp_path)
    out = tmp_path / "student"
    res = CliRunner().invoke(cli, ["init", "--vision", str(tmp_path / "siglip"), "--language", str(tmp_path / "qwen"),
                                   "--out", str(out), "--vision-feature-layer", "-2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output

    hf, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["vision_use_head"] is False
    assert cfg["text_config"]["rope_theta"] == 10000.0 and cfg["image_seq_length"] == 16
    assert cfg["vision_feature_select_strategy"] == "full" and cfg["vision_feature_layer"] == -2

    # the backbones' weights arrive unchanged; the SigLIP text tower is gone
    sig_vision = sig.vision_model.state_dict()
    for k, v in hf.model.vision_tower.state_dict().items():
        assert torch.equal(v, sig_vision[k]), k
    for k, v in qwen.model.state_dict().items():
        assert torch.equal(hf.model.language_model.state_dict()[k], v), k
    w1 = hf.model.multi_modal_projector.linear_1.weight
    assert 0.01 < w1.std().item() < 0.03 and hf.model.multi_modal_projector.linear_1.bias.abs().max() == 0

    # <image> added within the existing embedding rows; our chat template is installed
    from transformers import AutoTokenizer

    t2 = AutoTokenizer.from_pretrained(str(out))
    assert t2.convert_tokens_to_ids("<image>") == cfg["image_token_index"] == len(tok)
    assert "<image>" in t2.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], tokenize=False)

    # and bonsai-mlx runs it with the same logits as transformers
    ids = np.array([[3, 4] + [cfg["image_token_index"]] * 16 + [5, 6, 7]])
    pix = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pix)).logits.numpy()
    got = np.array(load_model(out)(mx.array(ids), mx.array(pix)))
    assert np.abs(got - ref).max() <= 1e-4


def test_init_refuses_non_empty_out_and_missing_args(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    r = CliRunner().invoke(cli, ["init", "--pico", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "not empty" in str(r.exception)
    assert (tmp_path / "x" / "f").read_text() == "keep me"
    r = CliRunner().invoke(cli, ["init", "--vision", "a", "--out", str(tmp_path / "y")])
    assert r.exit_code != 0 and "--language" in str(r.exception)
