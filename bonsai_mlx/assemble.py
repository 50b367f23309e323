"""`bonsai-mlx init`: assemble a new student from the two published backbones.

vision: a SigLIP checkpoint (the full two-tower `google/siglip-base-patch16-224`, whose text tower is dropped, or a
`siglip_vision_model` one); language: a Qwen2 causal LM (`Qwen/Qwen2.5-0.5B-Instruct`). The projector is freshly
initialised (normal(0, initializer_range), zero bias — transformers' `LlavaPreTrainedModel._init_weights`), `<image>`
is added to the tokenizer (no embedding resize: Qwen's 151936 rows leave room above its 151665 tokens), and the result
is written as a llava-hf directory that transformers' `LlavaForConditionalGeneration` loads as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx

from .atomic import atomic_dir
from .errors import BonsaiError
from .hub import resolve
from .io import DTYPES, load_config, load_weights_dir, write_model_files
from .language import normalize_text_config
from .model import LlavaModel, ModelConfig
from .pico import add_image_token
from .processing import ImageProcessor
from .prompting import CHAT_TEMPLATE, IMAGE_TOKEN


def _vision_config(raw: dict, where: Path) -> dict:
    from transformers import SiglipVisionConfig

    if raw.get("model_type") == "siglip":
        vc = raw.get("vision_config") or {}
    elif raw.get("model_type") == "siglip_vision_model":
        vc = raw
    else:
        raise BonsaiError(f"{where}: expected a SigLIP checkpoint (model_type 'siglip'), got {raw.get('model_type')!r}")
    full = SiglipVisionConfig(**{k: v for k, v in vc.items() if k != "model_type"}).to_dict()  # fill defaults
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")
    out = {k: full[k] for k in keep if k in full}
    out["model_type"] = "siglip_vision_model"
    out["vision_use_head"] = False  # LLaVA reads hidden states; the pooling head is dropped
    return out


def _vision_weights(weights: dict) -> dict:
    """SigLIP vision-tower weights keyed as in the tower (`vision_model.*`); text tower and head dropped."""
    out = {}
    for k, v in weights.items():
        if k.startswith(("text_model.", "logit_scale", "logit_bias")):
            continue
        if not k.startswith("vision_model."):
            k = "vision_model." + k
        out[k] = v
    return out


def _text_config(raw: dict, where: Path) -> dict:
    if raw.get("model_type") != "qwen2":
        raise BonsaiError(f"{where}: expected a Qwen2 causal LM (model_type 'qwen2'), got {raw.get('model_type')!r}")
    cfg = {k: v for k, v in raw.items() if not k.startswith(("_", "transformers_version"))}
    cfg["rope_theta"] = normalize_text_config(raw)["rope_theta"]  # top-level, as mlx-lm / vLLM / transformers 4 read
    return cfg


def write_processor_files(out: Path, tokenizer, image_processor: ImageProcessor, config: ModelConfig) -> None:
    """Tokenizer (with `<image>` and the chat template), processor and generation configs."""
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor.to_dict(), indent=2) + "\n")
    processor = {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_TOKEN,
        "patch_size": config.vision_config.patch_size,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "num_additional_image_tokens": 0,
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    eos = [i for i in (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")) if i is not None]
    gen = {"eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def init_projector(model: LlavaModel, std: float, seed: int) -> None:
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    proj = model.multi_modal_projector
    for lin, k in ((proj.linear_1, k1), (proj.linear_2, k2)):
        lin.weight = mx.random.normal(lin.weight.shape, key=k) * std
        if "bias" in lin:
            lin.bias = mx.zeros_like(lin.bias)


def assemble(
    vision: str,
    language: str,
    out: Union[str, Path],
    vision_feature_layer: int = -1,
    seed: int = 0,
    dtype: Optional[str] = None,
    projector_hidden_act: str = "gelu_pytorch_tanh",
) -> Path:
    from transformers import AutoTokenizer

    vdir = resolve(vision, what="vision model")
    ldir = resolve(language, what="language model")
    vcfg = _vision_config(load_config(vdir), vdir)
    tcfg = _text_config(load_config(ldir), ldir)

    tokenizer = AutoTokenizer.from_pretrained(str(ldir))
    image_id = add_image_token(tokenizer)
    if image_id >= tcfg["vocab_size"]:
        raise BonsaiError(
            f"{ldir}: the tokenizer has {len(tokenizer)} tokens with <image>, but the embedding has only "
            f"{tcfg['vocab_size']} rows; use a language model with spare embedding rows (as Qwen2.5)"
        )
    num_patches = (vcfg["image_size"] // vcfg["patch_size"]) ** 2
    config_dict = {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": vcfg,
        "text_config": tcfg,
        "image_token_index": image_id,
        "image_seq_length": num_patches,
        "vision_feature_layer": vision_feature_layer,
        "vision_feature_select_strategy": "full",
        # the tanh GELU: transformers, vLLM and llama.cpp's mlp projector compute it alike (llama.cpp has no erf one)
        "projector_hidden_act": projector_hidden_act,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(tcfg.get("tie_word_embeddings", False)),
    }
    config = ModelConfig.from_dict(config_dict)
    model = LlavaModel(config)
    init_projector(model, std=float(tcfg.get("initializer_range", 0.02)), seed=seed)

    vision_w = {f"vision_tower.{k}": v for k, v in _vision_weights(load_weights_dir(vdir)).items()}
    lang_w = {f"language_model.{k}": v for k, v in load_weights_dir(ldir).items()}
    weights = model.sanitize({**vision_w, **lang_w})
    weights.update({f"multi_modal_projector.{k}": v for k, v in _flat(model.multi_modal_projector).items()})
    if dtype is not None:
        weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise BonsaiError(f"backbone weights do not match their configs ({vdir}, {ldir}): {e}") from None

    image_processor = ImageProcessor.from_pretrained(vdir, default_size=vcfg["image_size"])
    with atomic_dir(out) as tmp:
        write_model_files(model, tmp)
        write_processor_files(tmp, tokenizer, image_processor, config)
    return Path(out)


def _flat(module) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(module.parameters()))
