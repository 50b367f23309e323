"""Loading and saving students: a llava-hf directory (or hub id) → `LlavaModel` (+ processor, + adapter), and back.

`load_model` is where a model becomes ready to run: weights, optional quantization, then `cpu.accelerate()` (the
one place that switches in the CPU kernels; docs/architecture.md). Writes are atomic (`atomic.py`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .atomic import atomic_dir
from .errors import BonsaiError
from .hub import resolve
from .model import LlavaModel, ModelConfig, config_to_dict, quantize_language_model
from .units import DTYPE_NAMES

DTYPES = {name: getattr(mx, name) for name in DTYPE_NAMES}


# --- loading -----------------------------------------------------------------------------------------------
def load_config(model_path: Path) -> dict:
    cfg_file = model_path / "config.json"
    if not cfg_file.exists():
        raise BonsaiError(f"{model_path} has no config.json: not a model directory")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise BonsaiError(f"{cfg_file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def load_weights_dir(model_path: Path) -> Dict[str, mx.array]:
    files = sorted(glob.glob(str(model_path / "*.safetensors")))
    files = [f for f in files if not os.path.basename(f).startswith(("adapter", "optimizer"))]
    if not files:
        raise BonsaiError(f"no *.safetensors weights in {model_path} (bonsai-mlx reads safetensors only)")
    weights = {}
    for f in files:
        weights.update(mx.load(f))
    return weights


def load_model(
    path_or_repo: Union[str, Path], quantize: Optional[int] = None, group_size: int = 64, lazy: bool = False,
    dtype: Optional[str] = None, accelerate: bool = True,
) -> LlavaModel:
    """Load a llava-style student from a local directory or hub id, ready to run.

    Args:
        quantize: quantize the language model to this many bits after loading (4 or 8), unless already quantized.
        lazy: leave weights unevaluated (they load on first use).
        dtype: cast the weights ("float32", "bfloat16", "float16") before quantizing; None keeps the checkpoint's
            (and on the CPU `accelerate` casts half precision to float32).
        accelerate: apply `cpu.accelerate()` (a no-op on a GPU); what it changed is in `model.acceleration`.
    """
    model_path = resolve(str(path_or_repo))
    raw = load_config(model_path)
    config = ModelConfig.from_dict(raw)
    model = LlavaModel(config)
    weights = model.sanitize(load_weights_dir(model_path))
    if config.quantization:  # a checkpoint saved quantized: rebuild the same quantized layers, then load
        q = config.quantization
        nn.quantize(
            model.language_model,
            group_size=q["group_size"],
            bits=q["bits"],
            class_predicate=lambda p, m: f"language_model.{p}.scales" in weights,
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise BonsaiError(f"weights in {model_path} do not match its config.json: {e}") from None
    if dtype is not None:
        model.set_dtype(DTYPES[dtype])
    if quantize and not config.quantization:
        quantize_language_model(model, bits=quantize, group_size=group_size)
    if accelerate:
        from .cpu import accelerate as cpu_accelerate

        model.acceleration = cpu_accelerate(model, upcast=dtype is None)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def save_weights(
    weights: Dict[str, mx.array], out_dir: Path, max_shard_bytes: int = 5 << 30, metadata: Optional[dict] = None
) -> None:
    """Write safetensors shards (+ index when more than one) in transformers' naming."""
    metadata = metadata or {"format": "mlx"}
    shards: List[Dict[str, mx.array]] = [{}]
    size = 0
    for k in sorted(weights):
        nbytes = weights[k].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = weights[k]
        size += nbytes
    if len(shards) == 1:
        mx.save_safetensors(str(out_dir / "model.safetensors"), shards[0], metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out_dir / name), shard, metadata=metadata)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_model_files(model: LlavaModel, out_dir: Path) -> None:
    """config.json + safetensors (published llava-hf layout) into an existing directory."""
    from mlx.utils import tree_flatten

    if any(k.endswith("packed_weight") for k, _ in tree_flatten(model.parameters())):
        raise BonsaiError("this model's 4-bit weights are packed for the CPU decode kernel (bonsai_mlx.load packs for "
                          "inference); load it with load(..., pack=False) to save or export it")
    mx.eval(model.parameters())
    save_weights(model.hf_weights(), out_dir)
    (out_dir / "config.json").write_text(json.dumps(config_to_dict(model.config), indent=2) + "\n")


_SIDE_FILES = (".json", ".jinja", ".txt", ".model")


def save_model(model: LlavaModel, out_dir: Union[str, Path], extra_files_from: Optional[Path] = None) -> Path:
    """Save the student as a llava directory, atomically (temp dir, then rename).

    `extra_files_from`: copy the tokenizer / processor files (json, jinja, txt) of this directory alongside.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if extra_files_from is not None:
            for f in Path(extra_files_from).iterdir():
                if f.is_file() and f.suffix in _SIDE_FILES and f.name not in ("config.json", "model.safetensors.index.json"):
                    shutil.copy2(f, tmp / f.name)
        write_model_files(model, tmp)
    return out_dir


def load(
    path_or_repo: Union[str, Path], quantize: Optional[int] = None, adapter: Optional[Union[str, Path]] = None,
    pack: bool = True,
):
    """Load a student and its processor for inference (`bonsai_mlx.load`). `adapter`: a training checkpoint directory
    (LoRA adapters + projector); a QLoRA checkpoint's base is quantized as it was in training unless `quantize` says.
    pack: let `cpu.accelerate` repack 4-bit weights for the CPU's decode kernel (after the adapter is applied: LoRA
    layers read the base's shapes). Pass False to read the weights back (export): packed layers no longer hold
    MLX's `weight` / `scales` / `biases`."""
    from .adapters import adapter_quantization, apply_adapter
    from .cpu import accelerate as cpu_accelerate
    from .processing import Processor

    path = resolve(str(path_or_repo))
    if adapter is not None and not quantize:
        quantize = adapter_quantization(adapter)
    model = load_model(path, quantize=quantize, accelerate=False)
    if adapter is not None:
        apply_adapter(model, adapter)
    model.acceleration = cpu_accelerate(model, pack=pack)
    mx.eval(model.parameters())
    return model, Processor.from_pretrained(path, model)
