"""Export a student (optionally with a training checkpoint's adapters fused) to a transformers
`LlavaForConditionalGeneration` directory: what `python convert/to_hf.py` and `bonsai-mlx export` run.

- LoRA is fused into the base weights with mlx-lm's `fuse(dequantize=True)` (a quantized base is dequantized, so
  the export holds exactly the weights the adapters were trained against plus their update);
- weights are written in the published llava-hf layout (`vision_tower.vision_model.*`, conv OIHW,
  `language_model.model.*`), sharded with an index, as safetensors;
- config.json (SigLIP vision config with `vision_use_head: false`, Qwen2 text config with top-level `rope_theta`,
  image token, `image_seq_length`, feature layer, "full", "gelu"), the tokenizer with `<image>` and the chat template,
  `preprocessor_config.json` / `processor_config.json` for `LlavaProcessor` + `SiglipImageProcessor`, and
  `generation_config.json`;
- `peft=True` also writes `peft/`: the adapters as a PEFT LoRA adapter (A as (r, in), `lora_alpha = scale · r`) with
  the trained projector as `modules_to_save`, for users who keep the base model separate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from ..assemble import write_processor_files
from ..atomic import atomic_dir
from ..errors import BonsaiError
from ..hub import resolve
from ..io import DTYPES, save_weights
from ..model import config_to_dict
from ..units import parse_size


def peft_state(model, lora_cfg: dict) -> tuple:
    """(PEFT tensors, PEFT adapter_config) from the mlx-lm LoRA layers of `model.language_model`.

    mlx-lm stores A as (in, r) and B as (r, out) with y += scale · x A B; PEFT stores lora_A.weight (r, in),
    lora_B.weight (out, r) with y += (alpha / r) · B A x. Keys follow transformers 5's module tree
    (`model.language_model.layers.N…`), prefixed `base_model.model.` as PEFT saves them.
    """
    tensors = {}
    lm_params = dict(tree_flatten(model.language_model.parameters()))
    for k, v in lm_params.items():
        if not k.endswith((".lora_a", ".lora_b")):
            continue
        module = k.rsplit(".", 1)[0]  # model.layers.0.self_attn.q_proj
        assert module.startswith("model.")
        hf_module = "base_model.model.model.language_model." + module[len("model."):]
        if k.endswith("lora_a"):
            tensors[f"{hf_module}.lora_A.weight"] = v.T
        else:
            tensors[f"{hf_module}.lora_B.weight"] = v.T
    for k, v in tree_flatten(model.multi_modal_projector.parameters()):
        tensors[f"base_model.model.model.multi_modal_projector.{k}"] = v
    p = lora_cfg["lora_parameters"]
    names = sorted({k.split(".")[-1] for k in p["keys"]})
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": p["rank"],
        "lora_alpha": p["scale"] * p["rank"],
        "lora_dropout": p["dropout"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        # the language model's linears only (SigLIP has q/k/v_proj too)
        "target_modules": r".*language_model.*\.(" + "|".join(names) + r")$",
        "modules_to_save": ["multi_modal_projector"],
        "inference_mode": True,
    }
    return tensors, config


def export(model_path: str, out: Union[str, Path], adapter: Optional[str] = None, dtype: str = "float32",
           shard_size: Union[str, int] = "2GB", peft: bool = False, force: bool = False) -> Path:
    from transformers import AutoTokenizer

    from ..adapters import fuse_lora
    from ..io import load
    from ..processing import ImageProcessor

    if dtype not in DTYPES:
        raise BonsaiError(f"--dtype must be one of {sorted(DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise BonsaiError(f"--out {out} exists and is not empty; pass --force to replace it")
    if peft and adapter is None:
        raise BonsaiError("--peft needs --adapter (the checkpoint whose LoRA to write)")
    max_shard = parse_size(shard_size)
    src = resolve(model_path)
    model, _ = load(src, adapter=adapter, pack=False)  # export reads the weights back: MLX layout
    peft_files = None
    if peft:
        lora_cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
        peft_files = peft_state(model, lora_cfg)
    fuse_lora(model, dequantize=True)
    weights = {k: v.astype(DTYPES[dtype]) for k, v in model.hf_weights().items()}

    cfg = config_to_dict(model.config)
    cfg.pop("quantization", None)
    cfg.pop("quantization_config", None)
    cfg["vision_config"] = {**cfg.get("vision_config", {}), "vision_use_head": False}
    cfg["text_config"] = {**cfg["text_config"], "rope_theta": model.config.text_config["rope_theta"]}
    cfg["projector_hidden_act"] = model.config.projector_hidden_act
    cfg["dtype"] = dtype  # torch dtype names are ours
    cfg["text_config"]["dtype"] = dtype

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    if tokenizer.convert_tokens_to_ids("<image>") != model.config.image_token_index:
        raise BonsaiError(f"{src}: the tokenizer's <image> id does not match image_token_index in config.json")
    image_processor = ImageProcessor.from_pretrained(src, default_size=model.config.vision_config.image_size)
    with atomic_dir(out) as tmp:
        save_weights(weights, tmp, max_shard_bytes=max_shard, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        write_processor_files(tmp, tokenizer, image_processor, model.config)
        if peft_files is not None:
            tensors, pcfg = peft_files
            (tmp / "peft").mkdir()
            mx.save_safetensors(str(tmp / "peft" / "adapter_model.safetensors"),
                                {k: v.astype(DTYPES[dtype]) for k, v in tensors.items()}, metadata={"format": "pt"})
            (tmp / "peft" / "adapter_config.json").write_text(json.dumps(pcfg, indent=2) + "\n")
    return out
