"""A run's checkpoint (`RUN_DIR/checkpoint`, replaced atomically): everything needed to continue exactly.

- `adapters.safetensors` + `adapter_config.json` (mlx-lm's adapter format), `projector.safetensors`,
  `weights.safetensors` (with --train-vision / --train-lm full), `align.safetensors` (HSD);
- `optimizer.safetensors`: the named groups' AdamW moments and steps;
- `trainer_state.json`: step, data order position, global batch, data sha256, skip counts;
- `config.json`: the resolved TrainConfig.
The RNG is reseeded from (seed, step) at every step, so it needs no saved state.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..adapters import lora_config, save_adapter
from ..atomic import atomic_dir
from ..errors import BonsaiError
from .config import TrainConfig


def write_checkpoint(ckpt_dir: Path, model, optimizer, cfg: TrainConfig, state: dict) -> Path:
    with atomic_dir(ckpt_dir) as tmp:
        save_adapter(model, tmp, lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_keys))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        if "align" in model:
            mx.save_safetensors(str(tmp / "align.safetensors"), dict(tree_flatten(model.align.parameters())))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return ckpt_dir


def read_state(ckpt_dir: Path, batch_size: int) -> Optional[dict]:
    """trainer_state.json (with `global_batch` filled in for checkpoints that predate it), or None."""
    f = ckpt_dir / "trainer_state.json"
    if not f.exists():
        return None
    st = json.loads(f.read_text())
    st.setdefault("global_batch", st.get("batch_size", batch_size))
    return st


def read_checkpoint(ckpt_dir: Path, model, optimizer, data_sha: str, data_name: str) -> dict:
    """Load the trained weights and optimizer state into `model` / `optimizer`; returns the trainer state."""
    d = ckpt_dir
    st = json.loads((d / "trainer_state.json").read_text())
    if st["data_sha256"] != data_sha:
        raise BonsaiError(f"{d} was trained on other data (sha256 differs from {data_name}); "
                          "resume with the same --data or start a new --out")
    if (d / "adapters.safetensors").exists():
        w = dict(mx.load(str(d / "adapters.safetensors")))
        model.language_model.load_weights(list(w.items()), strict=False)
    model.load_weights(list(mx.load(str(d / "projector.safetensors")).items()), strict=False)
    if (d / "weights.safetensors").exists():
        from ..adapters import load_full_weights

        load_full_weights(model, d / "weights.safetensors")
    if "align" in model:
        model.align.load_weights(list(mx.load(str(d / "align.safetensors")).items()))
    optimizer.state = tree_unflatten(list(mx.load(str(d / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return st
