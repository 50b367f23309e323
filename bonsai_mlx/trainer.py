"""QLoRA training of the student in MLX (phase `sft`).

What trains: the projector (its own learning rate) and mlx-lm LoRA adapters on q,k,v,o,gate,up,down of every LM
block; the vision tower and the (by default 4-bit) base LM are frozen. AdamW with linear warmup then cosine decay,
gradient accumulation (loss = mean CE over the supervised tokens of the whole accumulated batch), an `mx.compile`d
micro-step, optional gradient checkpointing (mlx-lm's).

Defaults follow LLaVA-1.5's LoRA recipe (lr 2e-4, projector lr 2e-5, warmup ratio 0.03, no weight decay, r 16,
alpha 32, dropout 0.05).

A checkpoint (`RUN_DIR/checkpoint`, replaced atomically) holds everything needed to continue exactly: adapters and
projector, optimizer state (moments, step, schedule), data order position, resolved config; the RNG is
reseeded from (seed, step) at every step, so it needs no saved state.
`metrics.jsonl` gets one JSON object per optimizer step (and eval records with "split": "eval").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .adapters import DEFAULT_LORA_KEYS, add_lora, lora_config, save_adapter
from .atomic import atomic_dir
from .data import BatchIterator, SFTDataset, file_sha256, read_records
from .errors import BonsaiError
from .hub import resolve
from .io import DTYPES, load_model
from .losses import masked_ce
from .model import LlavaModel
from .processing import ImageProcessor


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
    lr_projector: float = 2e-5
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
    # phase hsd
    teacher_cache: Optional[str] = None
    alpha: float = 0.5
    image_weight: float = 1.0
    text_layers: Optional[str] = None
    image_layer: Optional[str] = None
    lr_align: float = 1e-3
    standardize: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise BonsaiError(f"unknown training config keys {unknown}; known: {sorted(names)}")
        return cls(**clean)

    def validate(self) -> None:
        if self.phase not in ("sft", "hsd"):
            raise BonsaiError(f"--phase must be sft or hsd, got {self.phase!r}")
        if self.phase == "hsd" and not self.teacher_cache:
            raise BonsaiError("--phase hsd needs --teacher-cache (build one with `python -m teacher_cache build`)")
        if not 0 <= self.alpha <= 1:
            raise BonsaiError(f"--alpha must be in [0, 1], got {self.alpha}")
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise BonsaiError(f"--{name} is required")
        if self.max_steps is not None and self.epochs is not None:
            raise BonsaiError("pass either --max-steps or --epochs, not both")
        if str(self.quantize) not in ("4", "8", "none"):
            raise BonsaiError(f"--quantize must be 4, 8 or none, got {self.quantize!r}")
        if self.dtype not in DTYPES:
            raise BonsaiError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
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
    return make_trainable(load_model(cfg.model, quantize=quant, dtype=cfg.dtype), cfg)


def make_trainable(model: LlavaModel, cfg: TrainConfig) -> LlavaModel:
    """Freeze the base, then unfreeze what `cfg` trains (LoRA or the whole LM, the vision tower, the projector)."""
    model.freeze()
    if cfg.train_lm == "full":
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
               text_pairs=(), image_pair=None):
    """One micro-batch's share of the step loss (1-α)·CE + α·(L_text + λ_img·L_img), each term a mean over the
    whole accumulated batch: `norms` = [supervised tokens, aligned pairs, image positions] of that batch.

    SFT is the same function with no distillation terms, so `--alpha 0` reproduces SFT exactly (1·x + 0·y = x).
    Returns (loss, (CE sum, L_text sum, L_img sum)).
    """
    emb = model.get_input_embeddings(ids, pixels, validate=False)
    if extra is None:
        logits = model(ids, input_embeddings=emb)
        ce_sum = masked_ce(logits, ids, mask)[0]
        zero = mx.array(0.0)
        return (1.0 - alpha) * ce_sum / norms[0], (ce_sum, zero, zero)
    from .distill import distill_terms

    logits, hidden = model(ids, input_embeddings=emb, output_hidden_states=True)
    ce_sum = masked_ce(logits, ids, mask)[0]
    lt, li = distill_terms(model, hidden, extra, text_pairs, image_pair)
    distill = lt / mx.maximum(norms[1], 1.0) + image_weight * li / mx.maximum(norms[2], 1.0)
    return (1.0 - alpha) * ce_sum / norms[0] + alpha * distill, (ce_sum, lt, li)


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


def _is_projector(path: str, _grad) -> bool:
    return path.startswith("multi_modal_projector.")


def _is_align(path: str, _grad) -> bool:
    return path.startswith("align.")


def _is_vision(path: str, _grad) -> bool:
    return path.startswith("vision_tower.")


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print):
        cfg.validate()
        # Data parallel under `mlx.launch` (one process: a group of size 1). Only rank 0 logs and writes.
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        if self.rank != 0:
            log = lambda m: None  # noqa: E731
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoint"
        # --batch-size is per rank; the global batch and the data order are what a checkpoint keeps, so a run can
        # resume on another number of ranks.
        if not resume and (self.ckpt_dir / "trainer_state.json").exists():
            raise BonsaiError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        saved = self._read_state() if resume else None
        global_batch = saved["global_batch"] if saved else cfg.batch_size * self.world
        if global_batch % self.world:
            raise BonsaiError(f"the checkpoint's global batch {global_batch} does not split over {self.world} ranks")
        cfg.batch_size = global_batch // self.world
        model_path = resolve(cfg.model)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        mx.random.seed(cfg.seed)  # LoRA A init
        self.model = prepare_student(cfg)
        mcfg = self.model.config
        self.image_processor = ImageProcessor.from_pretrained(model_path, default_size=mcfg.vision_config.image_size)

        self.data_sha = file_sha256(cfg.data)
        records = read_records(cfg.data)
        records = records[: cfg.limit] if cfg.limit else records  # indices stay the file's (the teacher cache's)
        self.train_set = SFTDataset(records, self.tokenizer, cfg.image_root, mcfg.image_seq_length,
                                    cfg.max_seq_len, cfg.system, cfg.strict, source=str(cfg.data))
        self.text_pairs, self.image_pair, extras = [], None, None
        if cfg.phase == "hsd":
            extras = self._setup_hsd(model_path)
        log(self.train_set.report())
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batches = BatchIterator(self.train_set, global_batch, cfg.seed, self.image_processor, pad,
                                     rank=self.rank, world=self.world, extras=extras)
        self.eval_set = None
        if cfg.eval_data:
            self.eval_set = SFTDataset(read_records(cfg.eval_data), self.tokenizer, cfg.image_root,
                                       mcfg.image_seq_length, cfg.max_seq_len, cfg.system, cfg.strict,
                                       source=str(cfg.eval_data))
            log(self.eval_set.report())

        steps_per_epoch = max(self.batches.batches_per_epoch // cfg.grad_accum, 1)
        if cfg.max_steps is not None:
            self.total_steps = int(cfg.max_steps)
        else:
            self.total_steps = max(int(math.ceil((cfg.epochs or 1.0) * steps_per_epoch)), 1)
        # groups, each with its own schedule: projector, alignment projectors (HSD; empty in SFT), vision tower
        # (--train-vision; empty otherwise), LM (LoRA or full)
        self.optimizer = optim.MultiOptimizer(
            [
                optim.AdamW(lr_schedule(cfg.lr_projector, self.total_steps, cfg.warmup), weight_decay=cfg.weight_decay),
                optim.AdamW(lr_schedule(cfg.lr_align, self.total_steps, cfg.warmup), weight_decay=cfg.weight_decay),
                optim.AdamW(lr_schedule(cfg.lr_vision, self.total_steps,
                                        cfg.warmup if cfg.warmup_vision is None else cfg.warmup_vision),
                            weight_decay=cfg.weight_decay),
                optim.AdamW(lr_schedule(cfg.lr, self.total_steps, cfg.warmup), weight_decay=cfg.weight_decay),
            ],
            [_is_projector, _is_align, _is_vision],
        )
        self.optimizer.init(self.model.trainable_parameters())
        self.step = 0
        if resume and (self.ckpt_dir / "trainer_state.json").exists():
            self.load_checkpoint()
        elif resume:
            log(f"--resume: no checkpoint in {self.ckpt_dir}; starting from step 0")
        self._build_step()

    def _setup_hsd(self, model_path: Path):
        """Open and check the teacher cache, pick the layer pairs, add the alignment projectors, drop records the
        cache lacks; returns the loader's target builder."""
        from .distill import AlignProjectors, TargetBuilder, TeacherCache, resolve_pairs
        from .prompting import PROMPT_TEMPLATE_VERSION

        cfg, mcfg = self.cfg, self.model.config
        cache = TeacherCache(cfg.teacher_cache)
        tj = model_path / "tokenizer.json"
        cache.check(**{"student_tokenizer.sha256": file_sha256(tj) if tj.exists() else None,
                       "dataset_sha256": self.data_sha, "prompt_template_version": PROMPT_TEMPLATE_VERSION,
                       "student_image_tokens": mcfg.image_seq_length})
        n_layers = int(mcfg.text_config["num_hidden_layers"])
        self.text_pairs, self.image_pair = resolve_pairs(cache, n_layers, cfg.text_layers, cfg.image_layer,
                                                         cfg.image_weight, self.log)
        self.log(f"distilling text pairs {self.text_pairs} (student:teacher), image pair {self.image_pair}; "
                 f"cache coverage {cache.manifest.get('coverage', float('nan')):.3f}")
        self.model.align = AlignProjectors(int(mcfg.text_config["hidden_size"]), cache.hidden_size, self.text_pairs,
                                           self.image_pair)
        mx.eval(self.model.align.parameters())
        kept = []
        for smp in self.train_set.samples:
            if smp.index in cache.index:
                kept.append(smp)
            else:
                self.train_set._skip("not_in_teacher_cache", smp.record_id, "record is not in the teacher cache")
        self.train_set.samples = kept
        self.cache = cache
        return TargetBuilder(cache, self.text_pairs, self.image_pair, mcfg.image_token_index,
                             standardize=cfg.standardize)

    def _build_step(self):
        cfg = self.cfg
        hsd = cfg.phase == "hsd"
        self._step = build_step(self.model, cfg.compile, alpha=cfg.alpha if hsd else 0.0,
                                image_weight=cfg.image_weight if hsd else 0.0, text_pairs=tuple(self.text_pairs),
                                image_pair=self.image_pair)

    def micro_step(self, batch, norms):
        from .distill import to_mx

        ids, mask = mx.array(batch.input_ids), mx.array(batch.labels_mask)
        px = mx.array(batch.pixel_values) if batch.pixel_values is not None else None
        return self._step(ids, mask, px, to_mx(batch.extra), norms)

    # --- loop -------------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        metrics_path = self.out / "metrics.jsonl"
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
            self._truncate_metrics(metrics_path)
        kill_after = int(os.environ.get("BONSAI_KILL_AFTER_STEP", "0"))  # test hook: SIGKILL after this step
        self.model.train()
        it = iter(self.batches)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {cfg.phase}", unit="step",
                   dynamic_ncols=True, disable=None if self.rank == 0 else True)
        t_start = time.perf_counter()
        last = {}
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            # The RNG (LoRA dropout) is reseeded from (seed, step) every step, so a resumed run draws the same
            # masks as an unbroken one without saving generator state.
            mx.random.seed(step_seed(cfg.seed, self.step))
            rec = self._optimizer_step([next(it) for _ in range(cfg.grad_accum)], t0)
            if rec is None:
                continue
            last = rec
            if self.rank != 0:
                if kill_after and self.step == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                continue
            loss, ntok, dt = rec["loss"], rec["tokens"], rec["step_time_s"]
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{ntok / dt:.0f}", lr=f"{rec['lr']:.2e}")
            bar.update(1)
            if cfg.eval_every and self.eval_set is not None and self.step % cfg.eval_every == 0:
                self._log_eval(metrics_path)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            if kill_after and self.step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        if self.rank != 0:
            return last
        if self.eval_set is not None:
            self._log_eval(metrics_path)
        self.save_checkpoint()
        elapsed = time.perf_counter() - t_start
        skipped = dict(self.train_set.skipped)
        self.log(f"done: {self.step} steps in {elapsed:.1f}s; final loss {last.get('loss', float('nan')):.4f}; "
                 f"checkpoint {self.ckpt_dir}" + (f"; skipped {skipped}" if skipped else ""))
        return last

    def _all_sum(self, x):
        return mx.distributed.all_sum(x, group=self.group) if self.world > 1 else x

    def _optimizer_step(self, batches, t0: float) -> Optional[dict]:
        """Accumulate the micro-batches' gradients (sums across ranks), update, and return the step's metrics.

        Each term is a mean over the whole accumulated global batch: the supervised-token, aligned-pair and
        image-position counts are summed first (over micro-batches and ranks) and every micro-batch's loss is
        divided by them, so the gradients simply add up.
        """
        from .distill import counts

        micro = [b for b in batches if b.input_ids.shape[0] > 0 and b.num_targets > 0]
        local = [float(sum(b.num_targets for b in micro)), float(sum(counts(b.extra)[0] for b in micro)),
                 float(sum(counts(b.extra)[1] for b in micro))]
        norms = self._all_sum(mx.array(local, dtype=mx.float32))
        ntok, n_text, n_img = (float(x) for x in norms.tolist())
        if ntok == 0:
            return None
        grads, sums = None, [0.0, 0.0, 0.0, 0.0]
        for batch in micro:
            (lv, (ce, lt, li)), g = self.micro_step(batch, norms)
            grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
            sums = [sums[0] + lv, sums[1] + ce, sums[2] + lt, sums[3] + li]
        if self.world > 1:
            if grads is None:  # this rank's share was empty: it still takes part in the sums
                grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
            grads = tree_map(self._all_sum, grads)
            sums = list(self._all_sum(mx.stack([mx.array(x, dtype=mx.float32) for x in sums])))
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state, *sums)
        self.step += 1
        dt = time.perf_counter() - t0
        loss, ce_sum, lt_sum, li_sum = (float(x) for x in sums)
        lrs = [float(o.learning_rate) for o in self.optimizer.optimizers]
        rec = {"step": self.step, "loss": loss, "ce": ce_sum / ntok, "lr": lrs[3], "lr_projector": lrs[0],
               "tokens": int(ntok), "sequences": sum(b.input_ids.shape[0] for b in micro) * self.world,
               "tokens_per_s": ntok / dt, "step_time_s": dt, "epoch": self.batches.epoch,
               "peak_memory_gb": mx.get_peak_memory() / 1e9}
        if self.cfg.phase == "hsd":
            rec.update({"l_text": lt_sum / max(n_text, 1.0), "l_img": li_sum / max(n_img, 1.0), "lr_align": lrs[1],
                        "coverage": n_text / ntok, "aligned_pairs": int(n_text)})
        return rec

    def _read_state(self) -> Optional[dict]:
        f = self.ckpt_dir / "trainer_state.json"
        if not f.exists():
            return None
        st = json.loads(f.read_text())
        st.setdefault("global_batch", st.get("batch_size", self.cfg.batch_size))
        return st

    def _log_eval(self, metrics_path: Path) -> None:
        res = evaluate_loss(self.model, self.eval_set, self.image_processor, self.batches.pad_id, self.cfg.batch_size)
        rec = {"step": self.step, "split": "eval", **res}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.log(f"eval @ {self.step}: loss {res['loss']:.4f} ppl {res['perplexity']:.2f}")
        self.model.train()

    def _truncate_metrics(self, path: Path) -> None:
        """Drop metrics a killed run logged after its last checkpoint, so a resumed log has each step once."""
        if not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
        path.write_text("".join(ln + "\n" for ln in keep))

    # --- checkpoints ------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        cfg = self.cfg
        with atomic_dir(self.ckpt_dir) as tmp:
            save_adapter(self.model, tmp, lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_keys))
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
            if "align" in self.model:
                mx.save_safetensors(str(tmp / "align.safetensors"), dict(tree_flatten(self.model.align.parameters())))
            state = {"step": self.step, "total_steps": self.total_steps, "data": self.batches.state(),
                     "global_batch": self.batches.batch_size, "world_size_at_save": self.world,
                     "data_sha256": self.data_sha, "phase": cfg.phase, "model": cfg.model,
                     "skipped": dict(self.train_set.skipped)}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        return self.ckpt_dir

    def load_checkpoint(self) -> None:
        d = self.ckpt_dir
        st = json.loads((d / "trainer_state.json").read_text())
        if st["data_sha256"] != self.data_sha:
            raise BonsaiError(f"{d} was trained on other data (sha256 differs from {self.cfg.data}); "
                              "resume with the same --data or start a new --out")
        if (d / "adapters.safetensors").exists():
            w = dict(mx.load(str(d / "adapters.safetensors")))
            self.model.language_model.load_weights(list(w.items()), strict=False)
        self.model.load_weights(list(mx.load(str(d / "projector.safetensors")).items()), strict=False)
        if (d / "weights.safetensors").exists():
            from .adapters import load_full_weights

            load_full_weights(self.model, d / "weights.safetensors")
        if "align" in self.model:
            self.model.align.load_weights(list(mx.load(str(d / "align.safetensors")).items()))
        self.optimizer.state = tree_unflatten(list(mx.load(str(d / "optimizer.safetensors")).items()))
        self.batches.load_state(st["data"])
        self.step = int(st["step"])
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.log(f"resumed from {d} at step {self.step}")


def evaluate_loss(model: LlavaModel, dataset: SFTDataset, image_processor, pad_id: int, batch_size: int = 4) -> dict:
    """Mean CE and perplexity over the supervised (assistant) tokens of a whole data set."""
    from .evaluate import per_sample_ce

    sums, counts = per_sample_ce(model, dataset, image_processor, pad_id, batch_size)
    total, count = float(sums.sum()), float(counts.sum())
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count), "samples": len(dataset)}
