"""`bonsai-mlx info`: what a student is made of and what it costs.

Memory figures are the bytes of the arrays MLX actually holds after loading (and quantizing) the model, read from the
arrays themselves (`nbytes` of the lazily loaded / quantized parameters: exact, and no weights are computed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .hub import resolve
from .io import load_model
from .model import quantize_language_model


def _file_dtypes(path) -> set:
    """Dtypes in a safetensors file, from its JSON header (no tensor is read)."""
    import json
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "I32": "int32"}
    return {names.get(v["dtype"], v["dtype"].lower()) for k, v in header.items() if k != "__metadata__"}


def _count(module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))


def _bytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def model_info(path_or_repo: str, adapter: Optional[str] = None) -> dict:
    path = resolve(path_or_repo)
    model = load_model(path, lazy=True)
    cfg = model.config
    params = {
        "vision": _count(model.vision_tower),
        "projector": _count(model.multi_modal_projector),
        "language": _count(model.language_model),
    }
    if adapter is not None:
        from .adapters import adapter_quantization, apply_adapter

        adapted = load_model(path, lazy=True, quantize=adapter_quantization(adapter))  # QLoRA: its quantized base
        apply_adapter(adapted, adapter)
        lora = sum(v.size for k, v in tree_flatten(adapted.language_model.parameters()) if k.endswith(("lora_a", "lora_b")))
        params["lora"] = lora
    params["total"] = sum(params.values())
    files = list(Path(path).glob("*.safetensors"))
    dtypes = sorted({dt for f in files for dt in _file_dtypes(f)})  # as stored (loading may upcast on the CPU)

    memory = {}
    if cfg.quantization is not None:  # a quantized checkpoint: report what it is
        memory[f"{cfg.quantization['bits']}-bit"] = _bytes(model)
    else:
        for name, dtype, bits in (("float32", mx.float32, None), ("bfloat16", mx.bfloat16, None),
                                  ("8-bit", mx.bfloat16, 8), ("4-bit", mx.bfloat16, 4)):
            m = load_model(path, lazy=True)
            m.set_dtype(dtype)  # for the quantized rows: scales/biases take the weights' dtype (bf16, as released)
            if bits:
                quantize_language_model(m, bits=bits)
            memory[name] = _bytes(m)
    return {
        "path": str(path),
        "parameters": params,
        "disk_bytes": sum(f.stat().st_size for f in files),
        "disk_dtype": ",".join(dtypes) + (f" ({cfg.quantization['bits']}-bit LM)" if cfg.quantization else ""),
        "memory_bytes": memory,
        "image_tokens": cfg.image_seq_length,
        "image_size": cfg.vision_config.image_size,
        "patch_size": cfg.vision_config.patch_size,
        "context_length": int(cfg.text_config.get("max_position_embeddings") or 0),
        "vocab_rows": int(cfg.text_config["vocab_size"]),
    }
