"""Shared helpers for the benchmarks: a real-size random-weight student (no download needed), alternating worker
processes."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from bonsai_mlx.assemble import write_processor_files
from bonsai_mlx.cpu import accelerate
from bonsai_mlx.model import LlavaModel, ModelConfig, quantize_language_model
from bonsai_mlx.pico import train_tokenizer
from bonsai_mlx.processing import ImageProcessor

# google/siglip-base-patch16-224 (vision tower) and Qwen/Qwen2.5-0.5B-Instruct, from their config.json files.
SIGLIP_B16_224 = {
    "model_type": "siglip_vision_model", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
}
QWEN25_05B = {
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu",
}


def real_size_student(dtype=mx.float32, quantize=None, seed=0, pack=True):
    """(model, directory with tokenizer/processor files). Weights are random; the tokenizer is a tiny trained one
    (ids beyond it decode as "!" in mlx-lm's detokenizer, which is fine for timing). pack: 4-bit weights in the CPU's
    packed tiles, as `io.load` (inference) holds them; training benches pass False (`load_model` does not pack)."""
    tok = train_tokenizer()
    cfg = {
        "model_type": "llava", "vision_config": SIGLIP_B16_224, "text_config": QWEN25_05B,
        "image_token_index": tok.convert_tokens_to_ids("<image>"), "image_seq_length": 196,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
    }
    mx.random.seed(seed)
    model = LlavaModel(ModelConfig.from_dict(cfg))
    model.set_dtype(dtype)
    if quantize:
        quantize_language_model(model, bits=quantize)
    accelerate(model, upcast=False, pack=pack)  # as `io.load` / `load_model` do (the dtype is the caller's)
    mx.eval(model.parameters())
    model.eval()
    d = Path(tempfile.mkdtemp(prefix="bonsai-bench-"))
    write_processor_files(d, tok, ImageProcessor(size=224), model.config)
    return model, d


def median(xs):
    return statistics.median(xs)


def alternating_rounds(script: str, settings: dict, rounds: int) -> dict:
    """{name: [result, ...]}: `python script --worker *args` for every setting (name → args), `rounds` times,
    alternating, each run in its own process; a worker prints its result as JSON on its last line."""
    res = {name: [] for name in settings}
    for _ in range(rounds):
        for name, args in settings.items():
            out = subprocess.run([sys.executable, script, "--worker", *map(str, args)], capture_output=True,
                                 text=True, check=True).stdout
            res[name].append(json.loads(out.strip().splitlines()[-1]))
    return res
