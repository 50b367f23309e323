"""LoRA adapters and the trained projector, on top of a base student.

A checkpoint directory holds
- `adapter_config.json` + `adapters.safetensors`: mlx-lm's own LoRA adapter format for the language model (keys
  relative to the LM, `model.layers.N.self_attn.q_proj.lora_a`; `lora_parameters` with rank/scale/dropout/keys), so
  mlx-lm's `load_adapters` applies them and `mlx_lm.generate --adapter-path` could run the LM alone;
- `projector.safetensors`: the trained `multi_modal_projector.*` weights;
- `weights.safetensors` (only with `--train-vision` / `--train-lm full`): every trained weight of the vision tower
  and/or the language model, under the model's own parameter names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

from .errors import BonsaiError
from .model import LlavaModel
from .train.config import DEFAULT_LORA_KEYS


def lora_config(rank: int = 16, alpha: float = 32.0, dropout: float = 0.05, keys: Sequence[str] = DEFAULT_LORA_KEYS,
                num_layers: int = -1) -> dict:
    """mlx-lm adapter_config.json content. mlx-lm scales by `scale`; PEFT by alpha / r — we store scale = alpha / r."""
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": alpha / rank, "dropout": dropout, "keys": list(keys)},
    }


def add_lora(model: LlavaModel, config: dict) -> None:
    """Wrap the LM's target linears with mlx-lm LoRA layers (all blocks when num_layers is -1)."""
    lm = model.language_model
    n = config["num_layers"]
    linear_to_lora_layers(lm, len(lm.layers) if n in (-1, None) else n, config["lora_parameters"])


def save_adapter(model: LlavaModel, out_dir: Union[str, Path], config: dict) -> None:
    """Write adapters (mlx-lm format) and projector weights into an existing directory."""
    out_dir = Path(out_dir)
    lm_params = dict(tree_flatten(model.language_model.trainable_parameters()))
    lora = {k: v for k, v in lm_params.items() if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    if lora:
        mx.save_safetensors(str(out_dir / "adapters.safetensors"), lora, metadata={"format": "mlx"})
        (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    proj = {f"multi_modal_projector.{k}": v for k, v in tree_flatten(model.multi_modal_projector.parameters())}
    mx.save_safetensors(str(out_dir / "projector.safetensors"), proj, metadata={"format": "mlx"})
    full = full_trained_weights(model)
    if full:
        mx.save_safetensors(str(out_dir / "weights.safetensors"), full, metadata={"format": "mlx"})


def full_trained_weights(model: LlavaModel) -> dict:
    """Trainable weights of the vision tower and LM that are not LoRA factors (full training)."""
    return {k: v for k, v in tree_flatten(model.trainable_parameters())
            if k.startswith(("vision_tower.", "language_model.")) and k.rsplit(".", 1)[-1] not in ("lora_a", "lora_b")}


def load_full_weights(model: LlavaModel, path: Path) -> None:
    w = mx.load(str(path))
    expected = dict(tree_flatten(model.parameters()))
    bad = sorted(k for k, v in w.items() if k not in expected or expected[k].shape != v.shape)
    if bad:
        raise BonsaiError(f"{path} does not fit this model (e.g. {bad[:3]}); was it trained on another student?")
    model.load_weights(list(w.items()), strict=False)


def adapter_quantization(adapter_dir: Union[str, Path]) -> Optional[int]:
    """The bits of the quantized base a checkpoint was trained on (its `config.json`, written by `train`), or None."""
    cfg = Path(adapter_dir) / "config.json"
    bits = json.loads(cfg.read_text()).get("quantize") if cfg.exists() else None
    return None if bits in (None, "none") else int(bits)


def apply_adapter(model: LlavaModel, adapter_dir: Union[str, Path], projector: Optional[bool] = None) -> LlavaModel:
    """Apply a checkpoint's LoRA adapters (and projector, if present) to `model` in place.

    A checkpoint trained with a quantized base (`--quantize 4`, the default) needs the base loaded quantized the same
    way (`adapter_quantization`), so the adapters act on the weights they were trained against."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise BonsaiError(f"adapter {d}: no such directory (pass a training checkpoint directory)")
    has_lora = (d / "adapters.safetensors").exists()
    has_proj = (d / "projector.safetensors").exists()
    has_full = (d / "weights.safetensors").exists()
    if not (has_lora or has_proj or has_full):
        raise BonsaiError(f"adapter {d}: neither adapters.safetensors nor projector.safetensors found")
    bits = adapter_quantization(d)
    if bits and model.config.quantization is None:
        raise BonsaiError(f"adapter {d} was trained on a {bits}-bit base: load the model quantized "
                          f"(bonsai_mlx.load(..., adapter=...) does, or load_model(..., quantize={bits}))")
    if has_lora:
        if not (d / "adapter_config.json").exists():
            raise BonsaiError(f"adapter {d}: adapters.safetensors without adapter_config.json")
        try:
            load_adapters(model.language_model, str(d))
        except (ValueError, KeyError) as e:
            raise BonsaiError(f"adapter {d} does not fit this model: {str(e).splitlines()[0]}") from None
    if has_proj and projector is not False:
        w = mx.load(str(d / "projector.safetensors"))
        expected = {f"multi_modal_projector.{k}": v for k, v in tree_flatten(model.multi_modal_projector.parameters())}
        bad = [k for k, v in w.items() if k not in expected or expected[k].shape != v.shape]
        if bad or set(w) != set(expected):
            raise BonsaiError(
                f"adapter {d}: projector.safetensors does not fit this model (mismatched or missing: "
                f"{sorted(set(bad) | (set(expected) ^ set(w)))[:3]}); was it trained on another student?"
            )
        model.load_weights(list(w.items()), strict=False)
    if has_full:
        load_full_weights(model, d / "weights.safetensors")
    mx.eval(model.parameters())
    model.eval()  # new LoRA layers start in training mode (dropout on); inference wants it off
    return model


def fuse_lora(model: LlavaModel, dequantize: bool = False) -> LlavaModel:
    """Replace every mlx-lm LoRA layer of the LM by its fused linear (mlx-lm's `fuse`), optionally dequantized."""
    from mlx.utils import tree_unflatten

    lm = model.language_model
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in lm.named_modules() if hasattr(m, "fuse")]
    if fused:
        lm.update_modules(tree_unflatten(fused))
    if dequantize:
        from mlx_lm.utils import dequantize_model

        dequantize_model(lm)
        model.config.quantization = None
    mx.eval(model.parameters())
    return model
