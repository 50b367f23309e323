"""The training configuration: `TrainConfig` (every option of `bonsai-mlx train`, with its default) and where a run's
options come from (`resolve_config`: the resumed checkpoint's, then a YAML file, then flags). Framework-free.

Defaults follow LLaVA-1.5's LoRA recipe (lr 2e-4, projector lr 2e-5, warmup ratio 0.03, no weight decay, r 16,
alpha 32, dropout 0.05); `--phase pretrain` is LLaVA-1.5's stage 1 (the projector alone, lr 1e-3, warmup 0.03,
cosine).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..errors import BonsaiError
from ..units import DTYPE_NAMES

# mlx-lm LoRA keys (module paths inside each LM block)
DEFAULT_LORA_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


PHASES = ("pretrain", "sft", "hsd")
# the projector's peak lr per phase: LLaVA-1.5 pretrains it alone at 1e-3 and instruction-tunes it at 2e-5
PROJECTOR_LR = {"pretrain": 1e-3, "sft": 2e-5, "hsd": 2e-5}


@dataclass
class TrainConfig:
    phase: str = "sft"
    model: Optional[str] = None
    data: Optional[str] = None
    image_root: Optional[str] = None
    out: Optional[str] = None
    eval_data: Optional[str] = None
    limit: Optional[int] = None  # train on the first N records only (the dataset hash stays the file's)
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    lr_projector: Optional[float] = None  # default per phase: PROJECTOR_LR
    warmup: float = 0.03
    weight_decay: float = 0.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_keys: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_KEYS))
    train_lm: str = "lora"  # lora: adapters on a frozen base; full: every LM weight (needs quantize none)
    train_vision: bool = False  # also train the vision tower (at --lr-vision)
    lr_vision: float = 1e-4
    warmup_vision: Optional[float] = None  # warmup ratio of the vision tower's lr (default: --warmup)
    quantize: str = "4"
    max_seq_len: int = 2048
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    seed: int = 0
    dtype: str = "float32"
    strict: bool = False
    grad_checkpoint: bool = False
    compile: bool = True
    system: Optional[str] = None
    projector_from: Optional[str] = None  # start from this checkpoint's projector (a pretrain run's)
    data_cache: Optional[str] = None  # the prepared-data cache's folder (default $BONSAI_MLX_CACHE/prepared)
    # phase hsd
    teacher_cache: Optional[str] = None
    alpha: float = 0.5
    image_weight: float = 1.0
    text_layers: Optional[str] = None
    image_layer: Optional[str] = None
    lr_align: float = 1e-3
    standardize: bool = True
    kd_weight: float = 0.0  # β: + β·L_kd, logit distillation across tokenizers (train/kd.py); 0: none
    kd_loss: str = "uld"    # uld | mapped

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise BonsaiError(f"unknown training config keys {unknown}; known: {sorted(names)}")
        return cls(**clean)

    @property
    def projector_lr(self) -> float:
        return float(self.lr_projector) if self.lr_projector is not None else PROJECTOR_LR.get(self.phase, 2e-5)

    def validate(self) -> None:
        if self.phase not in PHASES:
            raise BonsaiError(f"--phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        if self.phase == "pretrain" and (self.train_lm == "full" or self.train_vision):
            raise BonsaiError("--phase pretrain trains the projector alone (LLaVA's stage 1); drop --train-lm full "
                              "and --train-vision, or use --phase sft")
        if self.projector_from is not None:
            f = Path(self.projector_from)
            if (f / "checkpoint" / "projector.safetensors").exists():
                f = f / "checkpoint"
            if not (f / "projector.safetensors").exists():
                raise BonsaiError(f"--projector-from {self.projector_from}: no projector.safetensors there (pass a "
                                  "run directory or its checkpoint/, e.g. runs/pretrain/checkpoint)")
        if self.phase == "hsd" and not self.teacher_cache:
            raise BonsaiError("--phase hsd needs --teacher-cache (build one with `python -m teacher_cache build`)")
        if not 0 <= self.alpha <= 1:
            raise BonsaiError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not self.kd_weight >= 0:
            raise BonsaiError(f"--kd-weight must be >= 0, got {self.kd_weight}")
        if self.kd_loss not in ("uld", "mapped"):
            raise BonsaiError(f"--kd-loss must be uld or mapped, got {self.kd_loss!r}")
        if self.kd_weight > 0 and self.phase != "hsd":
            raise BonsaiError("--kd-weight needs --phase hsd and a --teacher-cache built with --logits-topk")
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise BonsaiError(f"--{name} is required")
        if self.max_steps is not None and self.epochs is not None:
            raise BonsaiError("pass either --max-steps or --epochs, not both")
        if str(self.quantize) not in ("4", "8", "none"):
            raise BonsaiError(f"--quantize must be 4, 8 or none, got {self.quantize!r}")
        if self.dtype not in DTYPE_NAMES:
            raise BonsaiError(f"--dtype must be one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.limit is not None and int(self.limit) < 1:
            raise BonsaiError("--limit must be at least 1")
        for name in ("batch_size", "grad_accum", "lora_rank", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise BonsaiError(f"--{name.replace('_', '-')} must be at least 1")
        if self.grad_checkpoint and self.lora_dropout > 0:
            # mx.checkpoint recomputes each block in the backward pass, drawing new dropout masks there: the
            # gradients would belong to another forward than the loss. (mlx-lm's grad_checkpoint has the same trait.)
            raise BonsaiError("--grad-checkpoint needs --lora-dropout 0 (the recomputed blocks would draw new "
                              "dropout masks, so gradients would not match the loss)")
        if self.train_lm not in ("lora", "full"):
            raise BonsaiError(f"--train-lm must be lora or full, got {self.train_lm!r}")
        if self.train_lm == "full" and str(self.quantize) != "none":
            raise BonsaiError("--train-lm full trains every LM weight and needs --quantize none "
                              "(quantized weights cannot be trained)")
        if not 0 <= self.warmup < 1:
            raise BonsaiError(f"--warmup is a ratio of the total steps in [0, 1), got {self.warmup}")
        if self.warmup_vision is not None and not 0 <= self.warmup_vision < 1:
            raise BonsaiError(f"--warmup-vision is a ratio of the total steps in [0, 1), got {self.warmup_vision}")


def resolve_config(flags: dict, config_file: Optional[str] = None, resume: bool = False) -> TrainConfig:
    """A run's configuration, later sources overriding earlier ones: the checkpoint's own config (with `resume`, from
    `flags["out"]`), then the YAML `config_file` (keys like batch_size or batch-size), then the flags that were given
    (None = not given)."""
    merged = {}
    out = flags.get("out")
    if resume and out and (Path(out) / "checkpoint" / "config.json").exists():
        merged.update(json.loads((Path(out) / "checkpoint" / "config.json").read_text()))
    if config_file:
        import yaml

        try:
            y = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise BonsaiError(f"--config {config_file}: {str(e).splitlines()[0]}") from None
        if not isinstance(y, dict):
            raise BonsaiError(f"--config {config_file}: expected a mapping of option: value")
        merged.update({k.replace("-", "_"): v for k, v in y.items()})
    merged.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig.from_dict(merged)


def default(name: str):
    """The default of a TrainConfig field (for help texts, so they never repeat a number)."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
