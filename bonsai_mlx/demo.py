"""`bonsai-mlx demo`: the whole pipeline offline in a few minutes — data, a pico student, SFT, evaluation, a plot and
one answer.

1. `shapes.build_shapes`: the synthetic visual-QA set (train: multi-turn records, every question type per image;
   held-out: one question per record, equal shares per type, disjoint images);
2. `pico.build_pico`: a tiny random SigLIP + Qwen2 student with a tokenizer trained on the train text;
3. the untrained student answers the held-out questions (`evaluate.vqa.eval_vqa`, as `bonsai-mlx eval --task vqa`);
4. SFT with the ordinary trainer (`bonsai-mlx train`): the LM trained in full and the vision tower unfrozen, since
   both start random;
5. the trained student answers the same questions; a before/after table with chance levels and 95% intervals;
6. `plot` draws the training curve, `generate` answers one held-out image.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

from .atomic import write_json
from .errors import BonsaiError

# The demo student: SigLIP and Qwen2 configs scaled down (see pico.py), 32×32 images in 8×8 patches (16 image tokens).
DEMO_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
DEMO_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 2}


@dataclass
class DemoConfig:
    """Defaults = the measured ≤ 5-minute recipe (see README "Offline demo")."""

    out: str = "bonsai-demo"
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    lr_vision: float = 1e-4
    n_train: int = 10000
    n_eval: int = 250
    image_size: int = 48
    patch_size: int = 16
    train_vision: bool = True
    vision_pretrain_steps: int = 300
    seed: int = 0
    force: bool = False


def patch_targets(coco: dict, image_size: int, patch_size: int) -> dict:
    """Per image, the category held by each patch of the tower's grid: `[g*g]` ints, 0 = background, k+1 = the k-th
    category of `coco["categories"]`, set at the patch holding the centre of each annotated box (boxes scaled from the
    image's own size to the grid)."""
    import numpy as np

    g = image_size // patch_size
    cats = {c["id"]: k + 1 for k, c in enumerate(coco["categories"])}
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    target = {i: np.zeros(g * g, np.int32) for i in sizes}
    for a in coco["annotations"]:
        w, h = sizes[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        col = min(g - 1, int((x + bw / 2) / w * g))
        row = min(g - 1, int((y + bh / 2) / h * g))
        target[a["image_id"]][row * g + col] = cats[a["category_id"]]
    return target


def pretrain_vision(model_dir: Path, out_dir: Path, data_root: Path, instances: Path, steps: int, seed: int = 0,
                    batch: int = 32, lr: float = 1e-3, echo=print) -> dict:
    """Stage 0: pretrain the pico's random vision tower to name, per patch, the colour+shape category in it (or none),
    from the training split's COCO annotations (a linear head on each patch's feature; softmax cross-entropy), then
    save the student with that tower to `out_dir`.

    The real student starts from SigLIP, a pretrained tower whose patch features say what is where; a random tower is
    what held the demo back: in joint SFT a vision lr above 1e-4 hurt every question type, while at 1e-4 shapes stayed
    near chance (see README). Seconds of dense supervised pretraining (no held-out image is used) stand in for
    SigLIP's pretraining. (An image-level multi-label target — which categories are anywhere in the image — left the
    demo at 0.61-0.75 overall across seeds, existence and left/right at chance: the patches did not say which object
    sat where.)"""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    from .io import load_model, save_model
    from .processing import ImageProcessor

    coco = json.loads(Path(instances).read_text())
    model = load_model(model_dir)
    vc = model.config.vision_config
    target = patch_targets(coco, int(vc.image_size), int(vc.patch_size))
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    ids = sorted(files)
    proc = ImageProcessor.from_pretrained(model_dir, default_size=vc.image_size)
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)
    head = nn.Linear(int(vc.hidden_size), len(coco["categories"]) + 1)

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower, self.head = model.vision_tower, head

        def __call__(self, px):
            _, hs = self.tower(px, output_hidden_states=True)
            return self.head(hs[-1])  # [N, P, C+1]: which category is in each patch

    probe = Probe()
    opt = optim.Adam(lr)
    loss_grad = nn.value_and_grad(probe, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
    cache: Dict[int, np.ndarray] = {}
    losses = []
    for _ in range(steps):
        pick = rng.choice(len(ids), size=min(batch, len(ids)), replace=False)
        for i in pick:
            if ids[i] not in cache:
                cache[ids[i]] = proc.preprocess_one(data_root / files[ids[i]])
        x = mx.array(np.stack([cache[ids[i]] for i in pick]))
        y = mx.array(np.stack([target[ids[i]] for i in pick]))
        loss, grads = loss_grad(probe, x, y)
        opt.update(probe, grads)
        mx.eval(probe.parameters(), opt.state, loss)
        losses.append(float(loss))
    save_model(model, out_dir, extra_files_from=model_dir)
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    echo(f"      {steps} steps: per-patch category loss {first:.3f} → {last:.3f}")
    return {"steps": steps, "loss_first": first, "loss_last": last}


def _table(before: dict, after: dict, chance: dict) -> str:
    def cell(m):
        lo, hi = m["ci95"]
        return f"{m['value']:.2f} [{lo:.2f}, {hi:.2f}]"

    rows = [("type", "n", "chance", "untrained (95% CI)", "trained (95% CI)")]
    for t in after["per_type"]:
        rows.append((t, str(after["per_type"][t]["n"]), f"{chance.get(t, float('nan')):.2f}",
                     cell(before["per_type"][t]), cell(after["per_type"][t])))
    overall_chance = sum(chance[t] * after["per_type"][t]["n"] for t in after["per_type"]) / after["accuracy"]["n"]
    rows.append(("overall", str(after["accuracy"]["n"]), f"{overall_chance:.2f}", cell(before["accuracy"]),
                 cell(after["accuracy"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _save_eval(res: dict, path: Path) -> None:
    write_json(path, res)


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> dict:
    from . import load
    from .evaluate.vqa import Evaluator, eval_vqa
    from .pico import build_pico
    from .plotting import plot_metrics
    from .shapes import CHANCE, build_shapes
    from .train.config import TrainConfig
    from .train.data import read_records
    from .train.trainer import Trainer

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.force:
            raise BonsaiError(f"--out {out} exists and is not empty; pass --force to replace it or choose another path")
        shutil.rmtree(out)
    if cfg.steps < 1:
        raise BonsaiError(f"--steps must be at least 1, got {cfg.steps}")
    t_start = time.perf_counter()
    from .cpu import blas as _blas

    _blas.set_threads(1)  # the pico's small products run faster on one BLAS thread (see _blas.set_threads)
    data = out / "data"
    echo(f"[1/7] shapes data: {cfg.n_train} train images (multi-turn), {cfg.n_eval} held-out questions → {data}")
    paths = build_shapes(data, n_train=cfg.n_train, n_eval=cfg.n_eval, seed=cfg.seed)
    records = read_records(paths["train"])
    held_out = read_records(paths["eval"])
    corpus = [t["value"].replace("<image>\n", "") for r in records for t in r["conversations"]]

    model_dir = out / "pico"
    echo(f"[2/7] pico student (SigLIP {cfg.image_size}px/{cfg.patch_size}px patches + 3-layer Qwen2, tokenizer "
         f"trained on the data) → {model_dir}")
    build_pico(model_dir, seed=cfg.seed, corpus=corpus, image_size=cfg.image_size, patch_size=cfg.patch_size,
               vision=DEMO_VISION, text=DEMO_TEXT)

    echo("[3/7] the untrained student answers the held-out questions")
    model, processor = load(model_dir)
    before = eval_vqa(Evaluator(model, processor, data), held_out, source=str(paths["eval"]))
    _save_eval(before, out / "eval_before.json")
    del model

    vision_info = None
    if cfg.vision_pretrain_steps > 0:
        echo(f"[4/7] vision tower pretraining: which colour+shape category sits in each patch of the train images "
             f"(instances_train.json) → {out / 'pico-vision'}")
        vision_info = pretrain_vision(model_dir, out / "pico-vision", data, paths["instances_train"],
                                      cfg.vision_pretrain_steps, seed=cfg.seed, echo=echo)
        model_dir = out / "pico-vision"
    else:
        echo("[4/7] vision tower pretraining skipped (--vision-pretrain-steps 0)")

    run = out / "run"
    echo(f"[5/7] SFT for {cfg.steps} steps (batch {cfg.batch_size}, lr {cfg.lr}; LM trained in full"
         f"{', vision tower unfrozen' if cfg.train_vision else ', vision tower frozen'}) → {run}")
    tcfg = TrainConfig(phase="sft", model=str(model_dir), data=str(paths["train"]), image_root=str(data), out=str(run),
                       max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, lr_projector=cfg.lr, warmup=0.05,
                       quantize="none", train_lm="full", train_vision=cfg.train_vision, lr_vision=cfg.lr_vision,
                       lora_dropout=0.0, max_seq_len=512, seed=cfg.seed)
    Trainer(tcfg, log=echo).train()

    echo("[6/7] the trained student answers the same questions")
    model, processor = load(model_dir, adapter=run / "checkpoint")
    ev = Evaluator(model, processor, data)
    after = eval_vqa(ev, held_out, source=str(paths["eval"]))
    _save_eval(after, out / "eval_after.json")
    chance = {t: CHANCE[t] for t in after["per_type"]}
    table = _table(before, after, chance)
    echo("\nheld-out accuracy (normalized exact match; 95% Wilson intervals):\n" + table + "\n")

    png = plot_metrics(run, str(out / "curves.png"))
    echo(f"[7/7] training curve → {png}")
    item = held_out[0]
    question = item["conversations"][0]["value"].replace("<image>\n", "")
    answer = ev.answer([("user", "<image>\n" + question)], item["image"])
    echo(f"generate: {data / item['image']}\n  Q: {question}\n  A: {answer}   (truth: {item['conversations'][1]['value']})")
    elapsed = time.perf_counter() - t_start
    summary = {"elapsed_s": elapsed, "steps": cfg.steps, "config": cfg.__dict__, "chance": chance,
               "vision_pretrain": vision_info, "student": str(model_dir),
               "before": {"accuracy": before["accuracy"], "per_type": before["per_type"]},
               "after": {"accuracy": after["accuracy"], "per_type": after["per_type"]},
               "example": {"image": item["image"], "question": question, "answer": answer,
                           "truth": item["conversations"][1]["value"]}}
    _save_eval(summary, out / "demo.json")
    echo(f"done in {elapsed / 60:.1f} min; results in {out / 'demo.json'} (eval_before.json / eval_after.json hold "
         f"every prediction). Try: bonsai-mlx generate --model {model_dir} --adapter {run / 'checkpoint'} "
         f"--image {data / item['image']} --prompt \"{question}\"")
    return summary
