"""The training loop (phases `sft` and `hsd`): `Trainer(cfg).train()`.

What trains (step.py): the projector (its own learning rate) and mlx-lm LoRA adapters on q,k,v,o,gate,up,down of
every LM block; the vision tower and the (by default 4-bit) base LM are frozen unless --train-vision / --train-lm
full. AdamW with linear warmup then cosine decay per named group, gradient accumulation (each loss term a mean over
the whole accumulated batch), an `mx.compile`d micro-step, optional gradient checkpointing (mlx-lm's), data parallel
under `mlx.launch`. Checkpoints (checkpoint.py) resume exactly. `metrics.jsonl` gets one JSON object per optimizer
step (and eval records with "split": "eval").
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_map

from ..errors import BonsaiError
from ..hub import resolve
from ..io import load_config
from ..model import LlavaModel, ModelConfig
from ..processing import ImageProcessor
from .checkpoint import read_checkpoint, read_state, write_checkpoint
from .config import TrainConfig
from .data import BatchIterator, SFTDataset, file_sha256
from .step import build_step, make_optimizer, prepare_student, step_seed


class Background:
    """`fn()` on a daemon thread; `result()` waits and returns its value or raises its error (a daemon, so an error
    in the caller exits without waiting for it)."""

    def __init__(self, fn: Callable):
        self._out: list = []
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable) -> None:
        try:
            self._out.append((True, fn()))
        except BaseException as e:  # handed to the caller of result()
            self._out.append((False, e))

    def result(self):
        self._thread.join()
        ok, value = self._out[0]
        if not ok:
            raise value
        return value


class Trainer:
    """A training run from a `TrainConfig`: `Trainer(cfg).train()`.

    `on_step`: callables `f(trainer, record)` run on every rank after each optimizer step (its metrics written),
    for callers that watch or stop a run."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print, on_step: Sequence[Callable] = ()):
        cfg.validate()
        self.on_step = list(on_step)
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
        saved = read_state(self.ckpt_dir, cfg.batch_size) if resume else None
        global_batch = saved["global_batch"] if saved else cfg.batch_size * self.world
        if global_batch % self.world:
            raise BonsaiError(f"the checkpoint's global batch {global_batch} does not split over {self.world} ranks")
        cfg.batch_size = global_batch // self.world
        model_path = resolve(cfg.model)
        for f in ("config.json", "tokenizer.json"):
            if not (model_path / f).exists():
                raise BonsaiError(f"--model {cfg.model}: no {f} there (pass a student directory made by "
                                  "`bonsai-mlx init`, or a hub id)")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        # The training data are prepared on a thread while the model loads: preparing is the Rust tokenizer (which
        # releases the GIL), loading is reading and quantizing weights in MLX — on a cold 150k-record file the two
        # overlap instead of adding up.
        n_image = ModelConfig.from_dict(load_config(model_path)).image_seq_length
        data = Background(lambda: self._load_train_set(cfg, n_image, log))
        mx.random.seed(cfg.seed)  # LoRA A init
        self.model = prepare_student(cfg)
        mcfg = self.model.config
        self.image_processor = ImageProcessor.from_pretrained(model_path, default_size=mcfg.vision_config.image_size)
        self.data_sha, self.train_set = data.result()
        self.text_pairs, self.image_pair, extras = [], None, None
        if cfg.phase == "hsd":
            extras = self._setup_hsd(model_path)
        log(self.train_set.report())
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batches = BatchIterator(self.train_set, global_batch, cfg.seed, self.image_processor, pad,
                                     rank=self.rank, world=self.world, extras=extras)
        self.eval_set = None
        if cfg.eval_data:
            self.eval_set = SFTDataset.from_file(cfg.eval_data, self.tokenizer, cfg.image_root,
                                                 mcfg.image_seq_length, cfg.max_seq_len, cfg.system, cfg.strict,
                                                 cache_dir=cfg.data_cache, log=log)
            log(self.eval_set.report())

        steps_per_epoch = max(self.batches.batches_per_epoch // cfg.grad_accum, 1)
        if cfg.max_steps is not None:
            self.total_steps = int(cfg.max_steps)
        else:
            self.total_steps = max(int(math.ceil((cfg.epochs or 1.0) * steps_per_epoch)), 1)
        # named groups (step.GROUPS), each with its own schedule: projector, alignment projectors (HSD; empty in
        # SFT), vision tower (--train-vision; empty otherwise), LM (LoRA or full)
        self.optimizer = make_optimizer(cfg, self.total_steps)
        self.optimizer.init(self.model.trainable_parameters())
        self.step = 0
        if resume and (self.ckpt_dir / "trainer_state.json").exists():
            self.load_checkpoint()
        elif resume:
            log(f"--resume: no checkpoint in {self.ckpt_dir}; starting from step 0")
        self._build_step()

    def _load_train_set(self, cfg: TrainConfig, image_seq_length: int, log):
        if not Path(cfg.data).is_file():
            raise BonsaiError(f"--data {cfg.data}: no such file (a LLaVA-Instruct-format JSON list of records)")
        sha = file_sha256(cfg.data)
        return sha, SFTDataset.from_file(cfg.data, self.tokenizer, cfg.image_root, image_seq_length, cfg.max_seq_len,
                                         cfg.system, cfg.strict, cfg.limit, sha, cache_dir=cfg.data_cache, log=log)

    def _setup_hsd(self, model_path: Path):
        """Open and check the teacher cache, pick the layer pairs, add the alignment projectors, drop records the
        cache lacks; returns the loader's target builder."""
        from ..prompting import PROMPT_TEMPLATE_VERSION
        from .distill import AlignProjectors, TargetBuilder, TeacherCache, resolve_pairs

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
        self.train_set.keep_only(lambda index: index in cache, "not_in_teacher_cache",
                                 "record is not in the teacher cache")
        self.cache = cache
        if cfg.kd_weight > 0 and not cache.manifest.get("logits_topk"):
            raise BonsaiError(f"--kd-weight {cfg.kd_weight}: the teacher cache {cfg.teacher_cache} holds no teacher "
                              "logits; rebuild it with `python -m teacher_cache build ... --logits-topk 32`")
        if cfg.kd_weight > 0:
            self.log(f"logit distillation: {cfg.kd_loss}, weight {cfg.kd_weight}, teacher top-"
                     f"{cache.manifest['logits_topk']}" + (f", {cache.manifest['vocab_map']['mapped_tokens']} teacher "
                                                            "tokens mapped" if cfg.kd_loss == "mapped" else ""))
        return TargetBuilder(cache, self.text_pairs, self.image_pair, mcfg.image_token_index,
                             standardize=cfg.standardize, kd_loss=cfg.kd_loss if cfg.kd_weight > 0 else None)

    def _build_step(self):
        cfg = self.cfg
        hsd = cfg.phase == "hsd"
        self._step = build_step(self.model, cfg.compile, alpha=cfg.alpha if hsd else 0.0,
                                image_weight=cfg.image_weight if hsd else 0.0, text_pairs=tuple(self.text_pairs),
                                image_pair=self.image_pair, kd_weight=cfg.kd_weight if hsd else 0.0,
                                kd_loss=cfg.kd_loss)

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
                for f in self.on_step:
                    f(self, rec)
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
            for f in self.on_step:
                f(self, rec)
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
        if cfg.phase == "pretrain":
            self.log(f"next: bonsai-mlx train --phase sft --projector-from {self.out} --model {cfg.model} …")
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
        local = [float(sum(b.num_targets for b in micro))] + \
            [float(sum(counts(b.extra)[j] for b in micro)) for j in range(3)]
        norms = self._all_sum(mx.array(local, dtype=mx.float32))
        ntok, n_text, n_img, n_kd = (float(x) for x in norms.tolist())
        if ntok == 0:
            return None
        grads, sums = None, [0.0] * 6
        for batch in micro:
            (lv, aux), g = self.micro_step(batch, norms)
            grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
            sums = [a + b for a, b in zip(sums, (lv, *aux), strict=True)]
        if self.world > 1:
            if grads is None:  # this rank's share was empty: it still takes part in the sums
                grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
            grads = tree_map(self._all_sum, grads)
            sums = list(self._all_sum(mx.stack([mx.array(x, dtype=mx.float32) for x in sums])))
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state, *sums)
        self.step += 1
        dt = time.perf_counter() - t0
        loss, ce_sum, lt_sum, li_sum, kd_sum, cov_sum = (float(x) for x in sums)
        lr = self.optimizer.lr
        rec = {"step": self.step, "loss": loss, "ce": ce_sum / ntok, "lr": lr("lm"), "lr_projector": lr("projector"),
               "tokens": int(ntok), "sequences": sum(b.input_ids.shape[0] for b in micro) * self.world,
               "tokens_per_s": ntok / dt, "step_time_s": dt, "epoch": self.batches.epoch,
               "peak_memory_gb": mx.get_peak_memory() / 1e9}
        if self.cfg.phase == "hsd":
            rec.update({"l_text": lt_sum / max(n_text, 1.0), "l_img": li_sum / max(n_img, 1.0), "lr_align": lr("align"),
                        "coverage": n_text / ntok, "aligned_pairs": int(n_text)})
            if self.cfg.kd_weight > 0:
                rec["l_kd"] = kd_sum / max(n_kd, 1.0)
                if self.cfg.kd_loss == "mapped":  # the teacher's probability mass on tokens the student has too
                    rec["kd_covered"] = cov_sum / max(n_kd, 1.0)
        return rec

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
        state = {"step": self.step, "total_steps": self.total_steps, "data": self.batches.state(),
                 "global_batch": self.batches.batch_size, "world_size_at_save": self.world,
                 "data_sha256": self.data_sha, "phase": self.cfg.phase, "model": self.cfg.model,
                 "skipped": dict(self.train_set.skipped)}
        return write_checkpoint(self.ckpt_dir, self.model, self.optimizer, self.cfg, state)

    def load_checkpoint(self) -> None:
        st = read_checkpoint(self.ckpt_dir, self.model, self.optimizer, self.data_sha, str(self.cfg.data))
        self.batches.load_state(st["data"])
        self.step = int(st["step"])
        self.log(f"resumed from {self.ckpt_dir} at step {self.step}")


def evaluate_loss(model: LlavaModel, dataset: SFTDataset, image_processor, pad_id: int, batch_size: int = 4) -> dict:
    """Mean CE and perplexity over the supervised (assistant) tokens of a whole data set."""
    from ..evaluate.loss import per_sample_ce

    sums, counts = per_sample_ce(model, dataset, image_processor, pad_id, batch_size)
    total, count = float(sums.sum()), float(counts.sum())
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count), "samples": len(dataset)}
