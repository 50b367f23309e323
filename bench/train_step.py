"""Seconds per SFT training step and peak memory on the real-size student, 4-bit base vs float32 base.

    python bench/train_step.py [--steps 3] [--seq-len 512] [--quantize 4 none]

Real-size random-weight student (SigLIP-B/16-224 + Qwen2.5-0.5B shapes), batch 1 × --seq-len tokens (196 image
tokens + text, all answer tokens supervised), LoRA r16 on q,k,v,o,gate,up,down, AdamW, compiled step — the same
step `bonsai-mlx train` runs. One warm-up step (compilation) is excluded; the table is printed last.
"""

from __future__ import annotations

import bonsai_mlx  # noqa: F401  (first: on Linux it loads OpenBLAS before mlx.core is imported)

# isort: split
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from common import real_size_student  # noqa: E402

from bonsai_mlx.cpu import blas as _blas  # noqa: E402
from bonsai_mlx.train.config import TrainConfig
from bonsai_mlx.train.step import build_step, make_trainable  # noqa: E402


def measure(quantize: str, steps: int, seq_len: int):
    model, _ = real_size_student(mx.float32, quantize=None if quantize == "none" else int(quantize), pack=False)
    cfg = TrainConfig(quantize=quantize, dtype="float32")
    make_trainable(model, cfg)
    model.train()
    step = build_step(model, compile=True)
    opt = optim.AdamW(1e-4, weight_decay=0.0)
    rng = np.random.default_rng(0)
    img_id = model.config.image_token_index
    ids = np.concatenate([[1, 2], np.full(196, img_id), rng.integers(3, 390, seq_len - 198)])[None].astype(np.int32)
    mask = np.zeros_like(ids, dtype=bool)
    mask[:, 198:] = True
    ids, mask = mx.array(ids), mx.array(mask)
    pixels = mx.array(rng.standard_normal((1, 224, 224, 3)).astype(np.float32))
    times = []
    mx.reset_peak_memory()
    for i in range(steps + 1):
        t0 = time.perf_counter()
        norms = mx.array([float(mask[:, 1:].sum()), 0.0, 0.0, 0.0])  # answer tokens; no distillation terms
        (loss, (ce_sum, *_)), grads = step(ids, mask, pixels, None, norms)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        dt = time.perf_counter() - t0
        print(f"  quantize={quantize} step {i}: {dt:.2f}s loss/token {float(loss):.3f}", flush=True)
        if i:
            times.append(dt)
    return float(np.median(times)), mx.get_peak_memory() / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--quantize", nargs="+", default=["4", "none"], choices=["4", "8", "none"])
    args = ap.parse_args()
    print(f"device: {mx.default_device()}  BLAS: {_blas.status}  batch 1 x {args.seq_len} tokens", flush=True)
    rows = [(q, *measure(q, args.steps, args.seq_len)) for q in args.quantize]
    print()
    print(f"{'base LM':<12}{'s/step':>10}{'tokens/s':>10}{'peak GB':>10}")
    for q, s, mem in rows:
        name = "float32" if q == "none" else f"{q}-bit"
        print(f"{name:<12}{s:>10.2f}{args.seq_len / s:>10.1f}{mem:>10.2f}")


if __name__ == "__main__":
    main()
