"""Seconds per training step of the demo's pico student, with the CPU fast paths on and off and 1 or 2 BLAS threads.

    python bench/pico_train_step.py [--steps 10]

Builds the demo's student (bonsai_mlx.demo's configs, random weights) and times the compiled SFT step (LM in full,
vision tower trained) on a batch of 16 × 160 tokens with 9 image tokens each — the demo's batch shape. The fast
paths are switched off the way `BONSAI_CPU_POLICY=off` does it, in a child process each. Ratios last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def worker(model_dir: str, steps: int, threads: int) -> dict:
    import bonsai_mlx  # noqa: F401  (first: BLAS before mlx)

    # isort: split
    import time

    import mlx.core as mx
    import numpy as np

    from bonsai_mlx.cpu import blas as _blas
    from bonsai_mlx.io import load_model
    from bonsai_mlx.train.config import TrainConfig
    from bonsai_mlx.train.step import build_step, make_trainable

    _blas.set_threads(threads)
    model = load_model(model_dir)
    make_trainable(model, TrainConfig(model="x", data="x", out="x", quantize="none", train_lm="full",
                                      train_vision=True, lora_dropout=0.0))
    B, T = 16, 160
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.image_token_index, (B, T)).astype(np.int32)
    ids[:, 12:21] = model.config.image_token_index
    size = model.config.vision_config.image_size
    args = (mx.array(ids), mx.array(np.ones((B, T), bool)), mx.random.normal((B, size, size, 3)), None,
            mx.array([float(B * T), 0.0, 0.0]))
    step = build_step(model, True)
    for _ in range(3):
        mx.eval(step(*args))
    t = time.perf_counter()
    for _ in range(steps):
        mx.eval(step(*args))
    return {"step_s": (time.perf_counter() - t) / steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "THREADS"))
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.steps, int(a.worker[1]))))
        return
    from bonsai_mlx.demo import DEMO_TEXT, DEMO_VISION
    from bonsai_mlx.pico import build_pico

    d = tempfile.mkdtemp(prefix="bonsai-pico-bench-")
    build_pico(f"{d}/pico", image_size=48, patch_size=16, vision=DEMO_VISION, text=DEMO_TEXT)
    rows = {}
    for policy in ("on", "off"):
        for threads in (1, 2):
            env = dict(os.environ, BONSAI_CPU_POLICY="on" if policy == "on" else "off")
            r = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--worker", f"{d}/pico",
                                str(threads)], capture_output=True, text=True, env=env)
            if r.returncode:
                raise SystemExit(r.stderr[-2000:])
            rows[(policy, threads)] = json.loads(r.stdout.strip().splitlines()[-1])["step_s"]
            print(f"fast CPU paths {policy:3}  BLAS threads {threads}: {rows[(policy, threads)]:.3f} s/step", flush=True)
    print(f"fast paths on/off (1 thread): {rows[('on', 1)] / rows[('off', 1)]:.2f}; "
          f"1 vs 2 BLAS threads (paths on): {rows[('on', 1)] / rows[('on', 2)]:.2f}")


if __name__ == "__main__":
    main()
