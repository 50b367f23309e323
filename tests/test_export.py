"""Export to transformers: loads with no missing keys, same logits and greedy tokens, processor parity, PEFT."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import build_llava, make_shapes_data
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from bonsai_mlx.generate import generate
from bonsai_mlx.io import load, load_model
from bonsai_mlx.prompting import render_chat, user_message
from bonsai_mlx.train.config import TrainConfig
from bonsai_mlx.train.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("export")
    student, _ = build_llava(root / "student", tokenizer, seed=5, noise=0.3)
    data = make_shapes_data(root / "data", 16)
    runs = {}
    for q in ("4", "none"):
        cfg = TrainConfig(model=str(student), data=str(data), image_root=str(data.parent / "images"),
                          out=str(root / f"run_{q}"), max_steps=4, batch_size=4, lr=2e-2, lr_projector=2e-2,
                          warmup=0.0, quantize=q, lora_rank=4, lora_alpha=8)
        Trainer(cfg, log=lambda m: None).train()
        runs[q] = root / f"run_{q}" / "checkpoint"
    return root, student, data, runs


def to_hf(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "convert/to_hf.py", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_export_loads_in_transformers_with_same_logits_and_tokens(trained, tmp_path):
    root, student, data, runs = trained
    out = tmp_path / "hf"
    r = to_hf("--model", str(student), "--adapter", str(runs["4"]), "--out", str(out), "--shard-size", "100KB")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors.index.json").exists()  # sharded
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["vision_use_head"] is False and cfg["text_config"]["rope_theta"] == 10000.0
    assert cfg["image_seq_length"] == 16 and cfg["vision_feature_select_strategy"] == "full"
    assert cfg["projector_hidden_act"] == "gelu" and "quantization" not in cfg

    hf, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    processor = AutoProcessor.from_pretrained(str(out))

    # 4-bit base + LoRA + trained projector, unfused, on the exact path (packed layers round a prompt's activations
    # to int8: tests/test_packed.py bounds that)
    model, proc = load(student, adapter=runs["4"], pack=False)
    img = str(data.parent / "images" / "0_3.png")
    ids = proc.prompt_ids("What colour is the shape?", with_image=True)
    pix = proc.image_processor([img])
    ours = np.array(model(mx.array([ids]), mx.array(pix)))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2))).logits
    assert np.abs(ours - ref.numpy()).max() <= 1e-4

    # greedy generation: the same 20 tokens
    res = generate(model, proc, "What colour is the shape?", image=img, max_tokens=20)
    eos = sorted(proc.tokenizer.eos_token_ids)
    with torch.no_grad():
        gen = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2)), do_sample=False,
                          max_new_tokens=20, eos_token_id=eos, pad_token_id=eos[0])
    assert res.token_ids == [t for t in gen[0, len(ids):].tolist() if t not in eos]

    # the processor's chat template takes the transformers multimodal format and renders our prompt
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == render_chat(proc.tokenizer._tokenizer, [user_message("What colour is the shape?")])
    enc = processor(images=Image.open(img), text=text, return_tensors="np")
    assert enc["input_ids"][0].tolist() == ids
    assert np.abs(enc["pixel_values"] - pix.transpose(0, 3, 1, 2)).max() <= 1e-5

    # round trip: bonsai-mlx loads the export back and gives the export's logits
    back = np.array(load_model(out)(mx.array([ids]), mx.array(pix)))
    assert np.abs(back - ref.numpy()).max() <= 1e-4


def test_peft_adapter_on_exported_base_equals_fused_export(trained, tmp_path):
    from peft import PeftModel

    root, student, data, runs = trained
    base, fused = tmp_path / "base", tmp_path / "fused"
    assert to_hf("--model", str(student), "--out", str(base)).returncode == 0
    r = to_hf("--model", str(student), "--adapter", str(runs["none"]), "--out", str(fused), "--peft")
    assert r.returncode == 0, r.stderr[-2000:]
    pcfg = json.loads((fused / "peft" / "adapter_config.json").read_text())
    assert pcfg["r"] == 4 and pcfg["lora_alpha"] == 8

    ids = torch.tensor([[3, 4] + [json.loads((base / "config.json").read_text())["image_token_index"]] * 16 + [5, 6]])
    pix = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32))
    hf_fused = LlavaForConditionalGeneration.from_pretrained(str(fused)).eval()
    hf_base = LlavaForConditionalGeneration.from_pretrained(str(base)).eval()
    with torch.no_grad():
        want = hf_fused(input_ids=ids, pixel_values=pix).logits
        plain = hf_base(input_ids=ids, pixel_values=pix).logits
        peft_model = PeftModel.from_pretrained(hf_base, str(fused / "peft")).eval()
        got = peft_model(input_ids=ids, pixel_values=pix).logits
    assert (plain - want).abs().max() > 1e-3  # the adapter matters
    assert (got - want).abs().max() <= 1e-4


def test_export_refuses_non_empty_out(trained, tmp_path):
    root, student, _, _ = trained
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    r = to_hf("--model", str(student), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "--force" in r.stderr and (tmp_path / "o" / "keep").exists()
    r = to_hf("--model", str(student), "--out", str(tmp_path / "o"), "--force")
    assert r.returncode == 0 and not (tmp_path / "o" / "keep").exists()
