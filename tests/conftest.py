"""Tiny random checkpoints built with transformers in the published layouts, tokenizers trained on the fly.

Nothing here touches the network: every model is random and small, every tokenizer is trained from a few sentences.
"""

from __future__ import annotations

import bonsai_mlx  # noqa: F401  (first: on Linux it loads OpenBLAS before any test imports mlx.core)

# isort: split
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the prepared-data cache of every run in the suite goes to a fresh folder, not ~/.cache
os.environ.setdefault("BONSAI_MLX_CACHE", tempfile.mkdtemp(prefix="bonsai-test-cache-"))

try:
    import torch  # the parity tests need the PyTorch reference implementations
except ImportError as e:  # fail loudly: a suite that skips everything would pass vacuously
    raise ImportError('the tests need torch: pip install torch==2.13.0 && pip install -e ".[dev]"') from e


def siglip_vision_kwargs(**over):
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    kw.update(over)
    return kw


def qwen2_kwargs(vocab_size, **over):
    # rope_theta 1e4 on purpose: mlx-lm's Qwen2 default is 1e6, so a config reader that misses
    # transformers-5's `rope_parameters` gives wrong logits and the parity tests fail.
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=vocab_size, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
              rope_theta=10000.0)
    kw.update(over)
    return kw


@pytest.fixture(scope="session")
def tokenizer():
    from bonsai_mlx.pico import train_tokenizer

    return train_tokenizer()


def _vocab_rows(tokenizer):
    return -(-len(tokenizer) // 64) * 64


def to_published_layout(model_dir: Path) -> None:
    """Rewrite a transformers-5 llava save (`vision_tower.*`) in the published llava-hf layout
    (`vision_tower.vision_model.*`), as `llava-hf/llava-interleave-qwen-0.5b-hf` ships it."""
    from safetensors.numpy import load_file, save_file

    f = model_dir / "model.safetensors"
    w = load_file(str(f))
    out = {}
    for k, v in w.items():
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        out[k] = np.ascontiguousarray(v)
    save_file(out, str(f), metadata={"format": "pt"})


def build_llava(out: Path, tokenizer, vision_feature_layer=-1, layout="published", seed=0, tie=True, noise=0.02,
                projector_hidden_act="gelu", projector_bias=True, **text_over):
    """A tiny random SigLIP + Qwen2 `LlavaForConditionalGeneration`, saved with the tokenizer; returns (dir, hf model)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    torch.manual_seed(seed)
    v = SiglipVisionConfig(**siglip_vision_kwargs(vision_use_head=False))
    t = Qwen2Config(**qwen2_kwargs(_vocab_rows(tokenizer), tie_word_embeddings=tie, **text_over))
    cfg = LlavaConfig(
        vision_config=v, text_config=t, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="full",
        projector_hidden_act=projector_hidden_act, image_seq_length=(32 // 8) ** 2, tie_word_embeddings=tie,
        multimodal_projector_bias=projector_bias,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    # random init leaves LayerNorm/RMSNorm at exactly 1/0: perturb every parameter so parity covers them too
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if layout == "published":
        to_published_layout(out)
    return out, model


def image_token_id(tokenizer):
    return tokenizer.convert_tokens_to_ids("<image>")


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def read_json(p: Path):
    return json.loads(Path(p).read_text())


from teacher_cache.testing import train_llama_tokenizer  # noqa: E402,F401  (re-exported for the tests)

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("square", "circle")


def make_shapes_data(root: Path, n: int, size: int = 32, seed: int = 0, name: str = "train.json"):
    """A small LLaVA-Instruct-format set: one coloured shape per image, a 2-question conversation about it."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        img = Image.new("RGB", (size, size), "white")
        d = ImageDraw.Draw(img)
        box = [size // 4, size // 4, 3 * size // 4, 3 * size // 4]
        (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLOURS[colour])
        img.save(root / "images" / f"{seed}_{i}.png")
        records.append({
            "id": f"{seed}-{i}",
            "image": f"{seed}_{i}.png",
            "conversations": [
                {"from": "human", "value": "What colour is the shape?\n<image>"},
                {"from": "gpt", "value": colour},
                {"from": "human", "value": "Which shape is it?"},
                {"from": "gpt", "value": shape},
            ],
        })
    path = root / name
    path.write_text(json.dumps(records))
    return path


def build_teacher(out: Path, tokenizer, seed=0):
    """A tiny LLaVA-1.5-style teacher (CLIP vision, Llama text, vision layer -2, "default" strategy) saved in the
    llava-hf layout with its tokenizer and CLIP image processor. Image 48px / patch 8 → a 6×6 grid (36 tokens)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    v = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         image_size=48, patch_size=8, projection_dim=32)
    t = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=-(-len(tokenizer) // 64) * 64, max_position_embeddings=1024,
                    pad_token_id=tokenizer.pad_token_id)
    cfg = LlavaConfig(vision_config=v, text_config=t, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=36,
                      projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(str(out))
    return out, model
