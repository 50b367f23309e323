"""One training step: the student made trainable, the loss (1-α)·CE + α·(L_text + λ_img·L_img), the compiled
value-and-grad step, the learning-rate schedule and the named optimizer groups."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from ..adapters import add_lora, lora_config
from ..io import load_model
from ..model import LlavaModel
from .config import TrainConfig
from .losses import masked_ce


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float):
    """Linear warmup from 0 to `peak` over warmup_ratio × total steps, then cosine decay to 0 (HF's
    get_cosine_schedule_with_warmup, as LLaVA trains)."""
    warmup = int(round(warmup_ratio * total_steps))
    decay = optim.cosine_decay(peak, max(total_steps - warmup, 1), end=0.0)
    if warmup == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, peak, warmup), decay], [warmup])


def prepare_student(cfg: TrainConfig) -> LlavaModel:
    """Load the student (cast to the run's dtype, the LM quantized for QLoRA), freeze it, add LoRA, make the
    projector trainable."""
    quant = None if str(cfg.quantize) == "none" else int(cfg.quantize)
    model = load_model(cfg.model, quantize=quant, dtype=cfg.dtype)
    if cfg.projector_from:
        load_projector(model, cfg.projector_from)
    return make_trainable(model, cfg)


def load_projector(model: LlavaModel, ref) -> None:
    """Set the projector from a checkpoint's `projector.safetensors` (`ref`: a run directory or its checkpoint/)."""
    from pathlib import Path

    from mlx.utils import tree_flatten

    from ..errors import BonsaiError

    d = Path(ref)
    f = d / "checkpoint" / "projector.safetensors" if (d / "checkpoint").is_dir() else d / "projector.safetensors"
    w = mx.load(str(f))
    own = dict(tree_flatten(model.parameters()))
    bad = sorted(k for k, v in w.items() if not k.startswith("multi_modal_projector.") or k not in own
                 or own[k].shape != v.shape)
    missing = sorted(k for k in own if k.startswith("multi_modal_projector.") and k not in w)
    if bad or missing:
        raise BonsaiError(f"--projector-from {ref}: {f} does not fit this student ({(bad or missing)[:2]}); was it "
                          "trained on another --model?")
    model.load_weights([(k, v.astype(own[k].dtype)) for k, v in w.items()], strict=False)


def make_trainable(model: LlavaModel, cfg: TrainConfig) -> LlavaModel:
    """Freeze the base, then unfreeze what `cfg` trains (LoRA or the whole LM, the vision tower, the projector)."""
    model.freeze()
    if cfg.phase == "pretrain":
        pass  # LLaVA's stage 1: the projector alone
    elif cfg.train_lm == "full":
        model.language_model.unfreeze()
    else:
        add_lora(model, lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_keys))
    if cfg.train_vision:
        model.vision_tower.unfreeze()
    model.multi_modal_projector.unfreeze()
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.language_model.layers[0])
    mx.eval(model.parameters())
    return model


def train_loss(model: LlavaModel, ids, mask, pixels, extra, norms, alpha: float = 0.0, image_weight: float = 0.0,
               text_pairs=(), image_pair=None, kd_weight: float = 0.0, kd_loss: str = "uld"):
    """One micro-batch's share of the step loss (1-α)·CE + α·(L_text + λ_img·L_img) + β·L_kd, each term a mean over
    the whole accumulated batch: `norms` = [supervised tokens, aligned pairs, image positions, KD positions] of that
    batch.

    SFT is the same function with no distillation terms, so `--alpha 0` reproduces SFT exactly (1·x + 0·y = x), and
    β = 0 leaves the HSD loss as it was (no KD targets are built).
    Returns (loss, (CE sum, L_text sum, L_img sum, L_kd sum, covered teacher mass sum)).
    """
    emb = model.get_input_embeddings(ids, pixels, validate=False)
    zero = mx.array(0.0)
    if extra is None:
        logits = model(ids, input_embeddings=emb)
        ce_sum = masked_ce(logits, ids, mask)[0]
        return (1.0 - alpha) * ce_sum / norms[0], (ce_sum, zero, zero, zero, zero)
    from .distill import distill_terms, kd_terms

    logits, hidden = model(ids, input_embeddings=emb, output_hidden_states=True)
    ce_sum = masked_ce(logits, ids, mask)[0]
    lt, li = distill_terms(model, hidden, extra, text_pairs, image_pair)
    distill = lt / mx.maximum(norms[1], 1.0) + image_weight * li / mx.maximum(norms[2], 1.0)
    loss = (1.0 - alpha) * ce_sum / norms[0] + alpha * distill
    lkd, cov = zero, zero
    if kd_weight > 0 and "kd_logp" in extra:
        lkd, cov = kd_terms(logits, extra, kd_loss)
        loss = loss + kd_weight * lkd / mx.maximum(norms[3], 1.0)
    return loss, (ce_sum, lt, li, lkd, cov)


def build_step(model: LlavaModel, compile: bool = True, **loss_kw):
    """step(ids, mask, pixels, extra, norms) → ((loss, aux), grads), compiled per input structure (with/without
    images, with/without distillation targets), with the model and the global RNG as state (as mlx-lm's trainer)."""
    from functools import partial

    value_and_grad = nn.value_and_grad(model, partial(train_loss, **loss_kw))
    state = [model.state, mx.random.state]
    variants = {}

    def step(ids, mask, pixels, extra, norms):
        key = (pixels is not None, None if extra is None else tuple(sorted(extra)))
        if key not in variants:
            has_px, has_extra = key[0], key[1] is not None

            def fn(ids, mask, pixels, extra, norms):
                return value_and_grad(model, ids, mask, pixels if has_px else None, extra if has_extra else None,
                                      norms)

            variants[key] = mx.compile(fn, inputs=state, outputs=state) if compile else fn
        dummy = mx.array(0.0)
        return variants[key](ids, mask, dummy if pixels is None else pixels, {} if extra is None else extra, norms)

    return step


# Optimizer groups, by parameter path; the LM (LoRA or full) takes what none of these claims. Each has its own peak
# learning rate and schedule; a checkpoint's optimizer state is keyed by these names' order (MultiOptimizer).
GROUPS = ("projector", "align", "vision", "lm")
_GROUP_PREFIX = {"projector": "multi_modal_projector.", "align": "align.", "vision": "vision_tower."}


def make_optimizer(cfg: TrainConfig, total_steps: int) -> "NamedOptimizer":
    """AdamW per group (projector, alignment projectors, vision tower, LM), each with warmup + cosine decay."""
    peaks = {"projector": cfg.projector_lr, "align": cfg.lr_align, "vision": cfg.lr_vision, "lm": cfg.lr}
    warm = {g: cfg.warmup for g in GROUPS}
    if cfg.warmup_vision is not None:
        warm["vision"] = cfg.warmup_vision
    opts = {g: optim.AdamW(lr_schedule(peaks[g], total_steps, warm[g]), weight_decay=cfg.weight_decay)
            for g in GROUPS}
    return NamedOptimizer(opts)


class NamedOptimizer(optim.MultiOptimizer):
    """mlx's MultiOptimizer with its groups addressed by name (`lr("lm")`), not position."""

    def __init__(self, optimizers: dict):
        self.names = list(optimizers)
        filters = [(lambda path, _g, p=_GROUP_PREFIX[n]: path.startswith(p)) for n in self.names[:-1]]
        super().__init__([optimizers[n] for n in self.names], filters)

    def lr(self, group: str) -> float:
        return float(self.optimizers[self.names.index(group)].learning_rate)
