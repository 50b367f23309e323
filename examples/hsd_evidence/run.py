"""Does hidden-state distillation help? Teacher, cache, SFT vs HSD students, table, plot and doc — one command.

    python examples/hsd_evidence/run.py --out hsd-evidence --doc docs/hsd_evidence.md      # ≤ 2 h on 2 cores
    python examples/hsd_evidence/run.py --quick --out /tmp/hsd-quick                        # ≤ 10 min
    python examples/hsd_evidence/run.py --answers sentence --out kd-evidence --doc docs/kd_evidence.md

`--answers sentence`: the same experiment on answers that are short sentences (many answer tokens align), with
cross-tokenizer logit distillation (`--kd-loss uld|mapped`, a cache built with `--logits-topk`) beside HSD: SFT vs
HSD (text, text+image) vs KD (uld, mapped) vs HSD+KD.

Stages (each skipped when its output exists, so a stopped run resumes where it stopped):
1. shapes data (`bonsai_mlx.shapes`, as `bonsai-mlx demo`): multi-turn train records, single-question held-out set;
2. the teacher: `teacher.py` trains a LLaVA-1.5-style CLIP + Llama model in PyTorch, saved in the llava-hf layout,
   and scores it on the held-out set (the ceiling);
3. the pico students, one per seed: `bonsai-mlx demo`'s student with its vision-tower pretraining;
4. the teacher cache: `python -m teacher_cache build` (text states of two teacher layers, image states pooled to
   the student's grid), then `verify`;
5. the students: `bonsai-mlx train` (the demo's recipe: LM in full, vision tower at 1e-4) for SFT (α = 0) and HSD
   (α ∈ {0.1, 0.3, 0.5}, text-only and text+image), at equal steps, on 10 %, 30 % and 100 % of the training split
   (`--limit`), for each seed, plus the ablations (another layer pair, no standardization); each student is scored
   with `bonsai-mlx eval --task vqa`;
6. the report: mean ± 95 % CI over seeds per cell and per question type, HSD − SFT paired by seed, a PNG plot,
   and the verdict computed from those numbers — written to `--doc`.

Runs go `--jobs` at a time (default 2: one per core, one BLAS thread each).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass
class Variant:
    name: str
    alpha: float = 0.0  # 0: SFT
    image: bool = False  # text+image (L_img on) or text-only
    text_layers: Optional[str] = None  # student:teacher; None: the trainer's default (last : deepest)
    standardize: bool = True
    ablation: bool = False  # run at the smallest fraction only
    kd_weight: float = 0.0  # β of the logit-distillation term (0: none)
    kd_loss: str = "uld"

    @property
    def distilled(self) -> bool:
        return self.alpha > 0 or self.kd_weight > 0

    @property
    def label(self) -> str:
        if not self.distilled:
            return "SFT"
        parts = []
        if self.alpha > 0:
            s = f"HSD α={self.alpha:g} " + ("text+image" if self.image else "text")
            if self.text_layers:
                s += f", layers {self.text_layers}"
            if not self.standardize:
                s += ", raw targets"
            parts.append(s)
        if self.kd_weight > 0:
            parts.append(f"KD {self.kd_loss} β={self.kd_weight:g}")
        return " + ".join(parts)


def main_variants(alphas) -> List[Variant]:
    out = [Variant("sft")]
    for image in (False, True):
        out += [Variant(f"hsd-{'img' if image else 'txt'}-a{a:g}", a, image) for a in alphas]
    return out


@dataclass
class Plan:
    out: Path
    n_train: int = 10000
    n_eval: int = 500
    fractions: Tuple[float, ...] = (0.1, 0.3, 1.0)
    seeds: Tuple[int, ...] = (0, 1, 2)
    alphas: Tuple[float, ...] = (0.1, 0.3, 0.5)
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    lr_vision: float = 1e-4
    vision_pretrain_steps: int = 300
    teacher_steps: int = 1500
    teacher_vision_steps: int = 300
    teacher_layers: str = "2 4"  # hidden-state indices of the 4-layer teacher stored for text
    image_layer: str = "2"  # teacher layer whose image-token states are stored
    ablation_alpha: float = 0.3
    ablations: bool = True
    jobs: int = 2
    quick: bool = False
    answers: str = "word"  # or "sentence"
    logits_topk: int = 0  # > 0: the cache also holds the teacher's top-k log-probs (KD variants)
    max_answer_tokens: int = 8
    variants: List[Variant] = field(default_factory=list)

    def __post_init__(self):
        if not self.variants:
            self.variants = main_variants(self.alphas)
            if self.ablations:
                a = self.ablation_alpha
                self.variants += [Variant(f"hsd-img-a{a:g}-mid", a, True, text_layers="2:2", ablation=True),
                                  Variant(f"hsd-img-a{a:g}-raw", a, True, standardize=False, ablation=True)]


def kd_variants(alpha: float = 0.3, beta: float = 0.5) -> List[Variant]:
    return [Variant("sft"), Variant(f"hsd-txt-a{alpha:g}", alpha, False), Variant(f"hsd-img-a{alpha:g}", alpha, True),
            Variant(f"kd-uld-b{beta:g}", kd_weight=beta, kd_loss="uld"),
            Variant(f"kd-mapped-b{beta:g}", kd_weight=beta, kd_loss="mapped"),
            Variant(f"hsd-img-a{alpha:g}-kd-uld-b{beta:g}", alpha, True, kd_weight=beta, kd_loss="uld")]


def sentence_plan(out: Path, quick: bool) -> Plan:
    """Short-sentence answers; SFT vs HSD (text, text+image) vs KD (uld, mapped) vs HSD+KD."""
    common = dict(answers="sentence", logits_topk=32, max_answer_tokens=24, ablations=False, variants=kd_variants())
    if quick:
        return Plan(out=out, n_train=600, n_eval=60, fractions=(1.0,), seeds=(0, 1), steps=30, vision_pretrain_steps=60,
                    teacher_steps=150, teacher_vision_steps=60, quick=True, **common)
    return Plan(out=out, n_train=10000, n_eval=500, fractions=(0.3,), seeds=(0, 1, 2), steps=400, **common)


def quick_plan(out: Path) -> Plan:
    return Plan(out=out, n_train=1000, n_eval=100, fractions=(0.3, 1.0), seeds=(0, 1), alphas=(0.3,), steps=40,
                vision_pretrain_steps=100, teacher_steps=200, teacher_vision_steps=100, ablations=False, quick=True)


# --- stages ----------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: List[str], logfile: Path, env: Optional[dict] = None) -> None:
    """Run one command, its output to `logfile`; a failure stops the experiment naming the log."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    with open(logfile, "w") as f:
        f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=e)
    if r.returncode != 0:
        tail = logfile.read_text().strip().splitlines()[-1:] or [""]
        raise SystemExit(f"error: {cmd[0]} {cmd[1] if len(cmd) > 1 else ''} failed (see {logfile}): {tail[0]}")


def make_data(p: Plan) -> Path:
    from bonsai_mlx.shapes import build_shapes

    data = p.out / "data"
    if not (data / "eval.json").exists():
        log(f"shapes data: {p.n_train} train images, {p.n_eval} held-out questions → {data}")
        tmp = p.out / "data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_shapes(tmp, n_train=p.n_train, n_eval=p.n_eval, seed=0, answers=p.answers)
        os.replace(tmp, data)
    return data


def make_teacher(p: Plan, data: Path) -> Path:
    teacher = p.out / "teacher"
    if not (teacher / "teacher_eval.json").exists():
        log(f"teacher: {p.teacher_steps} steps in PyTorch → {teacher} (log {p.out / 'logs/teacher.log'})")
        sh([sys.executable, str(HERE / "teacher.py"), "--data", str(data), "--out", str(teacher), "--steps",
            str(p.teacher_steps), "--vision-steps", str(p.teacher_vision_steps), "--threads", str(p.jobs),
            "--max-new-tokens", str(p.max_answer_tokens)] + (["--word-pieces"] if p.answers == "sentence" else []),
           p.out / "logs/teacher.log")
    return teacher


def make_students(p: Plan, data: Path) -> Dict[int, Path]:
    import json as _json

    from bonsai_mlx.cpu import blas as _blas
    from bonsai_mlx.demo import DEMO_TEXT, DEMO_VISION, pretrain_vision
    from bonsai_mlx.pico import build_pico

    _blas.set_threads(1)
    corpus = [t["value"].replace("<image>\n", "") for r in _json.loads((data / "train.json").read_text())
              for t in r["conversations"]]
    out = {}
    for s in p.seeds:
        d = p.out / "students" / f"seed{s}"
        if not (d / "config.json").exists():
            log(f"student seed {s}: pico (SigLIP 48px/16px + 3-layer Qwen2) + {p.vision_pretrain_steps} steps of "
                f"vision pretraining → {d}")
            raw = p.out / "students" / f"raw{s}"
            shutil.rmtree(raw, ignore_errors=True)
            build_pico(raw, seed=s, corpus=corpus, image_size=48, patch_size=16, vision=DEMO_VISION, text=DEMO_TEXT)
            pretrain_vision(raw, d, data, data / "instances_train.json", p.vision_pretrain_steps, seed=s,
                            echo=lambda m: None)
            shutil.rmtree(raw)
        out[s] = d
    tokenizers = {(d / "tokenizer.json").read_bytes() for d in out.values()}
    if len(tokenizers) != 1:
        raise SystemExit("error: the seeds' students got different tokenizers; one teacher cache cannot serve them")
    return out


def make_cache(p: Plan, teacher: Path, student: Path, data: Path) -> Path:
    cache = p.out / "cache"
    if not (cache / "index.json").exists():
        log(f"teacher cache: layers {p.teacher_layers}, image states of layer {p.image_layer} → {cache}")
        sh([sys.executable, "-m", "teacher_cache", "build", "--teacher", str(teacher), "--student-tokenizer",
            str(student), "--data", str(data / "train.json"), "--image-root", str(data), "--out", str(cache),
            "--layers", p.teacher_layers, "--image-states", "--image-layers", p.image_layer, "--device", "cpu",
            "--batch-size", "32", "--dtype", "float16"] + (["--logits-topk", str(p.logits_topk)] if p.logits_topk else []),
           p.out / "logs/cache_build.log", env={"OPENBLAS_NUM_THREADS": "2"})
        sh([sys.executable, "-m", "teacher_cache", "verify", str(cache)], p.out / "logs/cache_verify.log")
    return cache


@dataclass
class Run:
    variant: Variant
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant.name}_f{int(round(self.fraction * 100)):03d}_s{self.seed}"


def runs_of(p: Plan) -> List[Run]:
    out = []
    for f in p.fractions:
        for s in p.seeds:
            for v in p.variants:
                if v.ablation and f != min(p.fractions):
                    continue
                out.append(Run(v, f, s))
    return out


def train_cmd(p: Plan, r: Run, student: Path, data: Path, cache: Path, run_dir: Path) -> List[str]:
    v = r.variant
    cmd = ["bonsai-mlx", "train", "--phase", "hsd" if v.distilled else "sft", "--model", str(student),
           "--data", str(data / "train.json"), "--image-root", str(data), "--out", str(run_dir),
           "--limit", str(max(int(round(p.n_train * r.fraction)), 1)), "--max-steps", str(p.steps),
           "--batch-size", str(p.batch_size), "--lr", str(p.lr), "--lr-projector", str(p.lr), "--warmup", "0.05",
           "--quantize", "none", "--train-lm", "full", "--train-vision", "--lr-vision", str(p.lr_vision),
           "--lora-dropout", "0", "--max-seq-len", "512", "--seed", str(r.seed)]
    if v.distilled:
        cmd += ["--teacher-cache", str(cache), "--alpha", str(v.alpha), "--image-weight", "1" if v.image else "0"]
        if v.text_layers:
            cmd += ["--text-layers", v.text_layers]
        if not v.standardize:
            cmd += ["--no-standardize"]
        if v.kd_weight > 0:
            cmd += ["--kd-weight", str(v.kd_weight), "--kd-loss", v.kd_loss]
    return cmd


def do_run(p: Plan, r: Run, students: Dict[int, Path], data: Path, cache: Path) -> dict:
    run_dir = p.out / "runs" / r.name
    result = run_dir / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    logs = p.out / "logs"
    t0 = time.perf_counter()
    sh(train_cmd(p, r, students[r.seed], data, cache, run_dir), logs / f"{r.name}.train.log")
    t1 = time.perf_counter()
    ev = run_dir / "eval.json"
    sh(["bonsai-mlx", "eval", "--task", "vqa", "--model", str(students[r.seed]), "--adapter",
        str(run_dir / "checkpoint"), "--data", str(data / "eval.json"), "--image-root", str(data), "--out", str(ev),
        "--max-tokens", str(p.max_answer_tokens)],
       logs / f"{r.name}.eval.log")
    e = json.loads(ev.read_text())
    eval_ce = None
    if p.answers == "sentence":  # the held-out answers' cross-entropy: finer than exact match on sentences
        lo = run_dir / "eval_loss.json"
        sh(["bonsai-mlx", "eval", "--task", "loss", "--model", str(students[r.seed]), "--adapter",
            str(run_dir / "checkpoint"), "--data", str(data / "eval.json"), "--image-root", str(data), "--out",
            str(lo), "--batch-size", "16"], logs / f"{r.name}.eval_loss.log")
        eval_ce = json.loads(lo.read_text())["loss"]["value"]
    m = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tail = m[-min(20, len(m)):]
    mean = lambda k: sum(x.get(k, 0.0) for x in tail) / len(tail)  # noqa: E731
    out = {"name": r.name, "variant": r.variant.name, "fraction": r.fraction, "seed": r.seed,
           "accuracy": e["accuracy"]["value"], "per_type": {t: v["value"] for t, v in e["per_type"].items()},
           "n": e["accuracy"]["n"], "final_ce": mean("ce"), "train_s": t1 - t0, "eval_s": time.perf_counter() - t1}
    if eval_ce is not None:
        out["eval_ce"] = eval_ce
    if r.variant.distilled:
        out.update(l_text=mean("l_text"), l_img=mean("l_img"), coverage=mean("coverage"),
                   aligned_pairs=mean("aligned_pairs"))
    if r.variant.kd_weight > 0:
        out.update(l_kd=mean("l_kd"), **({"kd_covered": mean("kd_covered")} if r.variant.kd_loss == "mapped" else {}))
    tmp = result.with_name("result.json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, result)
    # keep the record, drop the weights: 60+ full checkpoints of the pico would be ~1 GB
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    return out


# --- statistics and report -------------------------------------------------------------------------------------------
def mean_ci(xs: List[float]) -> Tuple[float, float]:
    """Mean and the half-width of its 95% t interval over seeds (nan with one value)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def fmt(m: float, h: float, signed: bool = False) -> str:
    s = f"{m:+.3f}" if signed else f"{m:.3f}"
    return s if math.isnan(h) else f"{s} ± {h:.3f}"


def summarize(p: Plan, results: List[dict]) -> dict:
    by = {(x["variant"], x["fraction"], x["seed"]): x for x in results}
    cells = {}
    for v in p.variants:
        for f in p.fractions:
            rows = [by[(v.name, f, s)] for s in p.seeds if (v.name, f, s) in by]
            if not rows:
                continue
            sft = [by.get(("sft", f, x["seed"])) for x in rows]
            types = sorted(rows[0]["per_type"])
            cells[(v.name, f)] = {
                "acc": mean_ci([x["accuracy"] for x in rows]),
                "types": {t: mean_ci([x["per_type"][t] for x in rows]) for t in types},
                "delta": mean_ci([x["accuracy"] - s["accuracy"] for x, s in zip(rows, sft, strict=True)])
                if v.distilled and all(sft) else None,
                "delta_types": {t: mean_ci([x["per_type"][t] - s["per_type"][t] for x, s in zip(rows, sft, strict=True)])
                                for t in types} if v.distilled and all(sft) else None,
                "coverage": mean_ci([x["coverage"] for x in rows]) if v.distilled else None,
                "eval_ce": mean_ci([x["eval_ce"] for x in rows]) if "eval_ce" in rows[0] else None,
                "delta_ce": mean_ci([x["eval_ce"] - s["eval_ce"] for x, s in zip(rows, sft, strict=True)])
                if "eval_ce" in rows[0] and v.distilled and all(sft) else None,
                "n_seeds": len(rows)}
    return cells


def verdict(p: Plan, cells: dict) -> Tuple[List[str], List[str]]:
    """(cells where HSD beat SFT: paired Δ's 95% CI above 0, cells where it lost: CI below 0)."""
    won, lost = [], []
    for (name, f), c in cells.items():
        if c["delta"] is None:
            continue
        m, h = c["delta"]
        label = f"{next(v.label for v in p.variants if v.name == name)} at {f:.0%}"
        if not math.isnan(h) and m - h > 0:
            won.append(f"{label} (Δ {fmt(m, h, True)})")
        elif not math.isnan(h) and m + h < 0:
            lost.append(f"{label} (Δ {fmt(m, h, True)})")
    return won, lost


def plot(p: Plan, cells: dict, teacher_acc: float, chance: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [f * 100 for f in p.fractions]
    main = [v for v in p.variants if not v.ablation]
    colours = {a: f"C{k}" for k, a in enumerate(sorted({v.alpha for v in main if v.alpha > 0}))}
    for k, v in enumerate(main):
        # one colour per α (per variant with KD); solid: text+image, dashed: text only; SFT thick black
        colour = f"C{k}" if v.kd_weight > 0 or p.answers == "sentence" else colours.get(v.alpha, "black")
        style = dict(marker="o" if v.image or not v.distilled else "s", capsize=3, lw=2.2 if not v.distilled else 1.3,
                     ls="-" if (not v.distilled or v.image or v.kd_weight > 0) else "--",
                     color="black" if not v.distilled else colour)
        pts = [(x, cells[(v.name, f)]) for x, f in zip(xs, p.fractions, strict=True) if (v.name, f) in cells]
        if not pts:
            continue
        off = 1 + 0.012 * (k - len(main) / 2)  # spread the error bars apart on the log axis
        axes[0].errorbar([x * off for x, _ in pts], [c["acc"][0] for _, c in pts],
                         yerr=[0 if math.isnan(c["acc"][1]) else c["acc"][1] for _, c in pts], label=v.label, **style)
        if v.distilled:
            axes[1].errorbar([x * off for x, _ in pts], [c["delta"][0] for _, c in pts],
                             yerr=[0 if math.isnan(c["delta"][1]) else c["delta"][1] for _, c in pts], label=v.label,
                             **style)
    axes[0].axhline(teacher_acc, color="tab:red", ls=":", label=f"teacher {teacher_acc:.3f}")
    axes[0].axhline(chance, color="grey", ls=":", label=f"chance {chance:.2f}")
    axes[0].set_ylim(0, 1.02)
    axes[1].axhline(0, color="black", lw=1)
    for ax, title in zip(axes, ("held-out accuracy (mean ± 95% CI over seeds)", "distilled − SFT, paired by seed"),
                         strict=True):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(xs, [f"{x:g}%" for x in xs])
        ax.set_xlabel(f"share of the {p.n_train} training images ({p.steps} steps each)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    plt.close(fig)


def report(p: Plan, results: List[dict], teacher_eval: dict, cache_manifest: dict, doc: Path, png: Path,
           wall_s: float, argv: List[str], stage_s: Dict[str, float], example_cmds: Dict[str, str],
           n_answers: int) -> str:
    from bonsai_mlx.shapes import CHANCE

    cells = summarize(p, results)
    types = sorted(teacher_eval["per_type"])
    n_per = {t: teacher_eval["per_type"][t]["n"] for t in types}
    chance = sum(CHANCE[t] * n_per[t] for t in types) / sum(n_per.values())
    t_acc = teacher_eval["accuracy"]
    plot(p, cells, t_acc["value"], chance, png)
    won, lost = verdict(p, cells)
    L = []
    what = "HSD" if p.answers == "word" else "distillation"
    if p.answers == "word":
        L.append("# Does hidden-state distillation help? (shapes, pico student, tiny LLaVA-1.5-style teacher)\n")
    else:
        L.append("# Does distillation help on sentence answers? Hidden states and cross-tokenizer logits (shapes, pico "
                 "student, tiny LLaVA-1.5-style teacher)\n")
    L.append(f"Generated by `{' '.join(['python', 'examples/hsd_evidence/run.py', *argv])}` — every number below "
             f"comes from that run ({'the `--quick` variant, ' if p.quick else ''}wall time **{wall_s / 60:.1f} min** "
             f"on {os.cpu_count()} CPU cores, the sum of the stages below). Nothing here is edited by hand.\n")
    L.append("## Verdict\n")
    if won:
        L.append(f"{what} beat SFT — the paired distilled − SFT difference's 95% CI (over {len(p.seeds)} seeds) lies above 0 — "
                 f"in {len(won)} of {sum(1 for c in cells.values() if c['delta'] is not None)} cells: "
                 + "; ".join(won) + ".")
    else:
        L.append(f"**{what} did not beat SFT anywhere**: in no cell does the paired distilled − SFT difference's 95% CI "
                 f"(over {len(p.seeds)} seeds) lie above 0.")
    if lost:
        L.append(f" {what} was worse than SFT (CI below 0) in: " + "; ".join(lost) + ".")
    L.append(" Every other cell is a tie within the seeds' spread.")
    fam = {}
    for (name, _), c in cells.items():
        v = next(x for x in p.variants if x.name == name)
        if c["delta"] is not None and not v.ablation:
            fam.setdefault(v.label if p.answers == "sentence" else "text+image" if v.image else "text only",
                           []).append(c["delta"][0])
    n_cells = sum(1 for c in cells.values() if c["delta"] is not None)
    L.append(" Sign of the mean Δ per family (α × fraction cells): " + "; ".join(
        f"{k}: {sum(d > 0 for d in ds)} of {len(ds)} above 0, mean {sum(ds) / len(ds):+.3f}" for k, ds in fam.items())
        + f". (The {n_cells} cells are uncorrected tests at 95%: about {0.025 * n_cells:.1f} cells would land above 0 by "
        f"chance if {what} did nothing, so read the families, not single cells.)\n")
    tried = sorted({v.label for v in p.variants if v.distilled})
    L.append(f"Variants tried: {'; '.join(tried)}. Text layer pairs (student:teacher hidden-state index): the "
             f"trainer's default 3:4 (last:last) unless named; image term: student layer 2 ↔ teacher layer "
             f"{p.image_layer}'s image-token states (the 3×3 grids coincide, so pooling is the identity); targets "
             f"standardized per channel with the cache's statistics unless \"raw targets\".")
    cov = [c["coverage"][0] for c in cells.values() if c["coverage"]]
    L.append(f" Alignment coverage: the cache paired **{cache_manifest['coverage']:.3f}** of the student's answer "
             f"tokens with a teacher token ending at the same character (manifest `coverage`); per supervised token "
             f"in training — which also counts the student's end-of-turn tokens, which have no text counterpart — "
             f"{sum(cov) / max(len(cov), 1):.3f}. " + (
                 f"The answers are single words ({cache_manifest['aligned_pairs'] / max(n_answers, 1):.2f} aligned "
                 f"pairs per answer over the {n_answers} training answers), so the distilled text states are those at "
                 "the answer tokens: read *after* the answer, predicting the end of the turn — not the state that "
                 "chose the answer.\n" if p.answers == "word" else
                 f"The answers are short sentences ({cache_manifest['aligned_pairs'] / max(n_answers, 1):.2f} aligned "
                 f"pairs per answer over the {n_answers} training answers): most pairs sit inside the answer, where "
                 "the teacher's state and next-token distribution bear on the words still to come. KD uses the "
                 f"teacher's top-{cache_manifest.get('logits_topk')} log-probs at every pair; the vocabulary map "
                 f"pairs {cache_manifest.get('vocab_map', {}).get('mapped_tokens', 0)} of the teacher's "
                 f"{cache_manifest.get('vocab_map', {}).get('teacher_vocab_size', 0)} tokens with a student token of "
                 "the same string.\n"))
    L.append("## Setup\n")
    L.append("| | teacher | student |\n|---|---|---|")
    tc = teacher_eval["config"]
    L.append(f"| vision | CLIP, 48 px / 16 px patches (3×3), 3 layers, width {tc['width']}, feature layer -2, CLS "
             "dropped | SigLIP, 48 px / 16 px (3×3), 2 layers, width 64 |")
    L.append(f"| language | Llama, {tc['layers']} layers, width {tc['width']} | Qwen2, 3 layers, width 64 |")
    L.append("| tokenizer | SentencePiece-style BPE (Llama-2 format, `<image>`, `<pad>`) | Qwen-style byte-level BPE |")
    L.append("| prompt | Vicuna-v1 (`USER: … ASSISTANT: …</s>`) | ChatML (the Qwen2.5 template) |")
    L.append(f"| training | {tc['steps']} steps, batch {tc['batch_size']}, lr {tc['lr']} after {tc['vision_steps']} "
             f"steps of vision pretraining, all {p.n_train} images | {p.steps} steps, batch {p.batch_size}, lr {p.lr} "
             f"(LM in full), vision lr {p.lr_vision}, after {p.vision_pretrain_steps} steps of vision pretraining |")
    L.append(f"\nData: `bonsai_mlx.shapes` (seed 0), {p.n_train} multi-turn training images, {p.n_eval} held-out "
             f"questions on disjoint images ({', '.join(f'{t} {n_per[t]}' for t in types)}). Seeds: {list(p.seeds)} "
             "(each seed: its own student initialisation, vision pretraining, data order). Fractions: the first "
             f"{', '.join(f'{f:.0%}' for f in p.fractions)} of the training records (`--limit`), at equal steps. "
             f"Teacher cache: text states of teacher layers {p.teacher_layers}, image states of layer {p.image_layer}, "
             f"float16.\n")
    L.append("Stage wall times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stage_s.items()) + ".\n")
    L.append("## Results: held-out accuracy\n")
    L.append(f"Teacher (ceiling): **{t_acc['value']:.3f}** [{t_acc['ci95'][0]:.3f}, {t_acc['ci95'][1]:.3f}] (95% "
             f"Wilson, {t_acc['n']} questions). Chance: {chance:.3f}. Cells: mean ± 95% t-interval over seeds; Δ = "
             f"{what} − SFT paired by seed (same student initialisation and data order)."
             + (" An answer counts when the whole sentence matches (normalized as for one word)." if p.answers ==
                "sentence" else "") + "\n")
    head = "| variant | " + " | ".join(f"{f:.0%} acc | {f:.0%} Δ" for f in p.fractions) + " |"
    L.append(head)
    L.append("|---" * (1 + 2 * len(p.fractions)) + "|")
    for v in p.variants:
        row = [v.label]
        for f in p.fractions:
            c = cells.get((v.name, f))
            row += ["" if c is None else fmt(*c["acc"]),
                    "" if c is None or c["delta"] is None else fmt(*c["delta"], signed=True)]
        L.append("| " + " | ".join(row) + " |")
    if any(c.get("eval_ce") for c in cells.values()):
        L.append("\nHeld-out answer cross-entropy (`bonsai-mlx eval --task loss` on the held-out questions; lower is "
                 "better), and its distilled − SFT difference paired by seed (below 0: distillation helped):\n")
        L.append("| variant | " + " | ".join(f"{f:.0%} CE | {f:.0%} Δ CE" for f in p.fractions) + " |")
        L.append("|---" * (1 + 2 * len(p.fractions)) + "|")
        for v in p.variants:
            row = [v.label]
            for f in p.fractions:
                c = cells.get((v.name, f))
                row += ["" if c is None or c["eval_ce"] is None else fmt(*c["eval_ce"]),
                        "" if c is None or c["delta_ce"] is None else fmt(*c["delta_ce"], signed=True)]
            L.append("| " + " | ".join(row) + " |")
        won_ce = [f"{next(v.label for v in p.variants if v.name == n)} at {f:.0%}" for (n, f), c in cells.items()
                  if c.get("delta_ce") and not math.isnan(c["delta_ce"][1]) and c["delta_ce"][0] + c["delta_ce"][1] < 0]
        lost_ce = [f"{next(v.label for v in p.variants if v.name == n)} at {f:.0%}" for (n, f), c in cells.items()
                   if c.get("delta_ce") and not math.isnan(c["delta_ce"][1]) and c["delta_ce"][0] - c["delta_ce"][1] > 0]
        L.append("\nBy held-out CE, distillation " + (f"helped (Δ's 95% CI below 0) in: {'; '.join(won_ce)}" if won_ce
                 else "helped nowhere (no Δ's 95% CI lies below 0)") + (f"; it hurt (CI above 0) in: {'; '.join(lost_ce)}"
                 if lost_ce else "") + ".\n")
    L.append(f"\n![accuracy and distilled − SFT]({png.name})\n")
    L.append(f"Every run's numbers (accuracy overall and per type, final CE and distillation terms, coverage, times): "
             f"[`{doc.with_suffix('.json').name}`]({doc.with_suffix('.json').name}).\n")
    L.append("## Per question type\n")
    L.append("Accuracy per type (mean ± 95% CI over seeds), teacher first.\n")
    for f in p.fractions:
        L.append(f"**{f:.0%} of the data**\n")
        L.append("| variant | " + " | ".join(types) + " |")
        L.append("|---" * (1 + len(types)) + "|")
        L.append("| teacher (all data) | " + " | ".join(f"{teacher_eval['per_type'][t]['value']:.3f}" for t in types)
                 + " |")
        for v in p.variants:
            c = cells.get((v.name, f))
            if c is None:
                continue
            row = [fmt(*c["types"][t]) + ("" if c["delta_types"] is None else f" (Δ {c['delta_types'][t][0]:+.3f})")
                   for t in types]
            L.append(f"| {v.label} | " + " | ".join(row) + " |")
        L.append("")
    L.append("## Distillation terms at the end of training\n")
    L.append("Mean over the last 20 steps and the seeds (L_text / L_img are per-dimension MSEs against the "
             "standardized targets — raw targets for the \"raw\" ablation; CE is the answer cross-entropy).\n")
    kd = any(v.kd_weight > 0 for v in p.variants)
    L.append("| variant | fraction | CE | L_text | L_img |" + (" L_kd |" if kd else "") + "\n|---|---|---|---|---|"
             + ("---|" if kd else ""))
    for v in p.variants:
        for f in p.fractions:
            rows = [x for x in results if x["variant"] == v.name and x["fraction"] == f]
            if rows:
                def avg(k, rows=rows):
                    return sum(x.get(k, float("nan")) for x in rows) / len(rows)

                L.append(f"| {v.label} | {f:.0%} | {avg('final_ce'):.4f} | "
                         + (f"{avg('l_text'):.4f} | {avg('l_img'):.4f} |" if v.alpha > 0 else "– | – |")
                         + ((f" {avg('l_kd'):.4f} |" if v.kd_weight > 0 else " – |") if kd else ""))
    L.append("\n## Exact commands\n")
    L.append("One command ran everything: `" + " ".join(["python", "examples/hsd_evidence/run.py", *argv]) + "`. "
             "What it ran, for one seed and fraction (the others differ in `--seed`, `--limit` and the paths; every "
             "command is also the first line of its log under `logs/` in the output folder):\n")
    L.append("```")
    L.extend(example_cmds.values())
    L.append("```\n")
    text = "\n".join(L) + "\n"
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)
    return text


# --- main ------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("hsd-evidence"), help="working folder (resumes) [hsd-evidence]")
    ap.add_argument("--doc", type=Path, default=None, help="markdown report to write [OUT/hsd_evidence.md]; the PNG "
                    "goes beside it")
    ap.add_argument("--quick", action="store_true", help="a ≤ 10-minute version: 1000 images, 2 fractions, 2 seeds, "
                    "SFT vs HSD α=0.3 text / text+image, 40 steps")
    ap.add_argument("--jobs", type=int, default=2, help="student runs at once (one per core) [2]")
    ap.add_argument("--answers", choices=["word", "sentence"], default="word",
                    help="word: the hidden-state experiment; sentence: short-sentence answers, HSD and KD [word]")
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error("--jobs must be at least 1")
    if a.answers == "sentence":
        p = sentence_plan(a.out, a.quick)
    else:
        p = quick_plan(a.out) if a.quick else Plan(out=a.out)
    p.jobs = a.jobs
    doc = a.doc or (a.out / "hsd_evidence.md")
    doc.parent.mkdir(parents=True, exist_ok=True)
    (p.out / "logs").mkdir(parents=True, exist_ok=True)
    plan_file = p.out / "plan.json"
    plan_json = json.dumps({k: v for k, v in asdict(p).items() if k != "jobs"}, default=str, indent=1)
    if plan_file.exists() and json.loads(plan_file.read_text()) != json.loads(plan_json):
        ap.error(f"--out {p.out} holds a run with another plan ({plan_file}); choose another --out or delete it")
    plan_file.write_text(plan_json + "\n")
    t0 = time.perf_counter()
    times_file = p.out / "stage_times.json"  # kept across invocations: a resumed run reports every stage's time
    stage_s: Dict[str, float] = json.loads(times_file.read_text()) if times_file.exists() else {}

    def stage(name, fn, *args):
        t = time.perf_counter()
        r = fn(*args)
        if name not in stage_s or time.perf_counter() - t > 1.0:  # a skipped stage keeps its first time
            stage_s[name] = stage_s.get(name, 0.0) * (name == "student runs") + time.perf_counter() - t
        times_file.write_text(json.dumps(stage_s, indent=1) + "\n")
        return r

    data = stage("data", make_data, p)
    teacher = stage("teacher", make_teacher, p, data)
    students = stage("students", make_students, p, data)
    cache = stage("cache", make_cache, p, teacher, students[p.seeds[0]], data)
    runs = runs_of(p)
    log(f"{len(runs)} student runs ({len(p.variants)} variants × fractions × {len(p.seeds)} seeds), {p.jobs} at a "
        f"time; logs in {p.out / 'logs'}")
    def all_runs():
        t_runs = time.perf_counter()
        results = []
        with ThreadPoolExecutor(p.jobs) as pool:
            futures = [pool.submit(do_run, p, r, students, data, cache) for r in runs]
            for k, fut in enumerate(futures, 1):
                res = fut.result()
                results.append(res)
                el = time.perf_counter() - t_runs
                log(f"{k}/{len(runs)} {res['name']}: accuracy {res['accuracy']:.3f}  "
                    f"(ETA {el / k * (len(runs) - k) / 60:.0f} min)")
        return results

    results = stage("student runs", all_runs)
    teacher_eval = json.loads((teacher / "teacher_eval.json").read_text())
    manifest = json.loads((cache / "manifest.json").read_text())
    first = runs_of(p)
    examples = {}
    for r in first:
        key = ("kd" if r.variant.kd_weight > 0 else "hsd") if r.variant.distilled else "sft"
        if key not in examples and r.seed == p.seeds[0] and r.fraction == max(p.fractions) and (
                key != "hsd" or r.variant.image):
            examples[key] = " ".join(shlex.quote(c) for c in train_cmd(p, r, students[r.seed], data, cache,
                                                                       p.out / "runs" / r.name))
    for f in ("cache_build.log", "teacher.log"):
        lg = p.out / "logs" / f
        if lg.exists():
            examples = {f: lg.read_text().splitlines()[0].lstrip("$ "), **examples}
    examples["eval"] = (f"bonsai-mlx eval --task vqa --model {students[p.seeds[0]]} --adapter RUN/checkpoint "
                        f"--data {data / 'eval.json'} --image-root {data} --out RUN/eval.json")
    (p.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    # beside the doc too: the per-run numbers behind every cell (small; the doc links it)
    doc.with_suffix(".json").write_text(json.dumps({"teacher": {k: v for k, v in teacher_eval.items()
                                                                if k != "predictions"},
                                                    "runs": results}, indent=1) + "\n")
    report(p, results, teacher_eval, manifest, doc, doc.with_suffix(".png"), sum(stage_s.values()), argv,
           stage_s, examples, sum(len(r["conversations"]) // 2 for r in json.loads((data / "train.json").read_text())))
    log(f"report → {doc} (plot {doc.with_suffix('.png')}); results → {p.out / 'results.json'}; "
        f"{(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
