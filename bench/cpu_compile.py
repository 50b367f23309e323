"""Where `mx.compile` helps on the CPU: the vision tower, the training step, the decode step.

    python bench/cpu_compile.py [--rounds 5]

- vision tower: `get_image_features` of the real-size SigLIP-B/16-224 (+ projector), float32, one image: eager vs
  `mx.compile`d (fixed shapes), alternating in one process;
- training step: the demo's pico student, batch 16 × 160 (bench/pico_train_step.py's setup), `build_step` compiled
  vs not, alternating;
- decode step: compiling it needs a cache that lives inside the compiled graph (mlx-lm's KVCache writes into its
  buffers in Python); what it could save at most is the graph-building time of a step, so this times building one
  decode step's graph (Python, no evaluation) against evaluating it, on the real-size Qwen2.5-0.5B shapes. mlx-lm's
  `generate_step` already builds step n+1's graph while step n evaluates (`mx.async_eval`), which hides it.
Medians over --rounds; ratios last.
"""

from __future__ import annotations

import bonsai_mlx  # noqa: F401  (first: on Linux it loads OpenBLAS before mlx.core is imported)

# isort: split
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import real_size_student  # noqa: E402


def timed(f) -> float:
    t = time.perf_counter()
    mx.eval(f())
    return time.perf_counter() - t


def vision(rounds: int) -> tuple:
    model, _ = real_size_student(mx.float32)
    pixels = mx.random.normal((1, 224, 224, 3))
    eager = model.get_image_features
    compiled = mx.compile(model.get_image_features)
    assert float(mx.abs(eager(pixels) - compiled(pixels)).max()) < 1e-3
    for f in (eager, compiled):
        timed(lambda f=f: f(pixels))  # warm-up (and the compile)
    e, c = [], []
    for _ in range(rounds):
        e.append(timed(lambda: eager(pixels)))
        c.append(timed(lambda: compiled(pixels)))
    return statistics.median(e), statistics.median(c), model


def decode_graph(model, rounds: int) -> tuple:
    from mlx_lm.models.cache import make_prompt_cache

    lm = model.language_model
    cache = make_prompt_cache(lm)
    mx.eval(lm(mx.zeros((1, 64), mx.int32), cache=cache), [c.state for c in cache])  # a 64-token context
    build, run = [], []
    y = mx.array([[1]])
    for _ in range(rounds):
        t = time.perf_counter()
        logits = lm(y, cache=cache)[:, -1]
        build.append(time.perf_counter() - t)
        t = time.perf_counter()
        mx.eval(logits)
        run.append(time.perf_counter() - t)
        for c in cache:
            c.trim(1)  # stay at the same context length
    return statistics.median(build), statistics.median(run)


def train_step(rounds: int) -> tuple:
    from bonsai_mlx.demo import DEMO_TEXT, DEMO_VISION
    from bonsai_mlx.io import load_model
    from bonsai_mlx.pico import build_pico
    from bonsai_mlx.train.config import TrainConfig
    from bonsai_mlx.train.step import build_step, make_trainable

    d = tempfile.mkdtemp(prefix="bonsai-compile-bench-")
    build_pico(f"{d}/pico", image_size=48, patch_size=16, vision=DEMO_VISION, text=DEMO_TEXT)
    model = load_model(f"{d}/pico")
    make_trainable(model, TrainConfig(model="x", data="x", out="x", quantize="none", train_lm="full",
                                      train_vision=True, lora_dropout=0.0))
    B, T = 16, 160
    ids = np.random.default_rng(0).integers(0, model.config.image_token_index, (B, T)).astype(np.int32)
    ids[:, 12:21] = model.config.image_token_index
    size = model.config.vision_config.image_size
    args = (mx.array(ids), mx.array(np.ones((B, T), bool)), mx.random.normal((B, size, size, 3)), None,
            mx.array([float(B * T), 0.0, 0.0]))
    steps = {"eager": build_step(model, False), "compiled": build_step(model, True)}
    for s in steps.values():
        for _ in range(2):
            timed(lambda s=s: s(*args))
    res = {k: [] for k in steps}
    for _ in range(rounds):
        for k, s in steps.items():
            res[k].append(timed(lambda s=s: s(*args)))
    return statistics.median(res["eager"]), statistics.median(res["compiled"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    ve, vc, model = vision(a.rounds)
    print(f"vision tower + projector, 1 image:   eager {ve * 1e3:7.1f} ms   compiled {vc * 1e3:7.1f} ms", flush=True)
    b, r = decode_graph(model, a.rounds * 4)
    print(f"decode step (64-token context):      graph building {b * 1e3:5.2f} ms   evaluation {r * 1e3:7.1f} ms",
          flush=True)
    del model
    te, tc = train_step(a.rounds)
    print(f"pico training step, 16 x 160 tokens: eager {te * 1e3:7.1f} ms   compiled {tc * 1e3:7.1f} ms", flush=True)
    print()
    print(f"vision tower eager / compiled: {ve / vc:.2f}")
    print(f"training step eager / compiled: {te / tc:.2f}")
    print(f"decode: graph building is {b / (b + r):.1%} of a step (the most compiling it could save; mlx-lm's "
          "async_eval already overlaps it with the previous step)")


if __name__ == "__main__":
    main()
