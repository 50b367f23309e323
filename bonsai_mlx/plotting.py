"""`bonsai-mlx plot`: training curves from RUN_DIR/metrics.jsonl as a PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .errors import BonsaiError


def read_metrics(run_dir) -> list:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        raise BonsaiError(f"{run_dir}: no metrics.jsonl (is it a training run directory?)")
    out = []
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise BonsaiError(f"{f}: line {n} is not JSON") from None
    return out


def plot_metrics(run_dir, out: Optional[str] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("split", "train") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    if not train:
        raise BonsaiError(f"{run_dir}: metrics.jsonl has no training steps yet")
    loss_keys = [k for k in ("loss", "ce", "l_text", "l_img", "l_kd") if any(k in r for r in train)]
    has_cov = any("coverage" in r for r in train)
    fig, axes = plt.subplots(1, 4 if has_cov else 3, figsize=(20 if has_cov else 15, 4))
    for k in loss_keys:
        pts = [(r["step"], r[k]) for r in train if k in r]
        axes[0].plot(*zip(*pts, strict=True), label=f"train {k}", lw=1)
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[0].set_title("loss")
    axes[1].plot([r["step"] for r in train], [r.get("lr", 0) for r in train], label="lr (language model)")
    if any("lr_projector" in r for r in train):
        axes[1].plot([r["step"] for r in train], [r.get("lr_projector", 0) for r in train], label="lr (projector)")
    axes[1].set_xlabel("step")
    axes[1].legend()
    axes[1].set_title("learning rate")
    axes[2].plot([r["step"] for r in train], [r.get("tokens_per_s", 0) for r in train], lw=1)
    axes[2].set_xlabel("step")
    axes[2].set_title("supervised tokens / s")
    if has_cov:
        axes[3].plot([r["step"] for r in train], [r.get("coverage", 0) for r in train], lw=1, label="aligned pairs")
        if any("kd_covered" in r for r in train):  # --kd-loss mapped: the teacher mass on mapped tokens
            axes[3].plot([r["step"] for r in train if "kd_covered" in r],
                         [r["kd_covered"] for r in train if "kd_covered" in r], lw=1, label="mapped teacher mass")
            axes[3].legend()
        axes[3].set_xlabel("step")
        axes[3].set_ylim(0, 1.05)
        axes[3].set_title("alignment coverage (pairs / answer tokens)")
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
