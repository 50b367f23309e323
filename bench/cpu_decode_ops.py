"""One decode step of the real-size 4-bit student on the CPU, with and without each of this session's decode-step
paths, alternating in one process (this shared VM's speed drifts):

    python bench/cpu_decode_ops.py [--bits 4] [--rounds 8] [--steps 10] [--context 250]

- "default": each transformer block's decode step as one op (csrc/decode_block.cpp, bonsai_mlx/cpu/block.py), its
  4-bit products on the int8-activation kernel (csrc/kernels.h);
- "float activations": the same with the exact float-activation kernel (BONSAI_QMM_ACTIVATIONS=float);
- "op per layer": no block op: mlx-lm's block with one op per RMSNorm / RoPE / attention / SwiGLU (csrc/fused.cpp,
  bonsai_mlx/cpu/fused.py) and per product;
- "MLX ops": no block op and MLX's own rms_norm / rope / attention / SwiGLU ops (only the products are bonsai's).

Each round times --steps decode steps per configuration (the LM at a --context-token KV cache, greedy argmax, one
eval per step as mlx-lm's loop does) and keeps their median; the table gives the median over rounds, and the
share of the 4-bit bandwidth ceiling (LM weight bytes per token / read bandwidth measured in the same run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import bonsai_mlx  # noqa: F401  (first: BLAS before mlx)

# isort: split
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import real_size_student  # noqa: E402

from bonsai_mlx.cpu import block, fused, qmm  # noqa: E402
from bonsai_mlx.cpu.decode import decoding  # noqa: E402
from bonsai_mlx.doctor import read_bandwidth  # noqa: E402

LM_PARAMS = 494_032_768


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--context", type=int, default=250)
    args = ap.parse_args()
    if not qmm.available():
        raise SystemExit(f"the extension is unavailable: {qmm.status()}")
    model, _ = real_size_student(mx.float32, quantize=args.bits)
    lm = model.language_model
    cache = make_prompt_cache(lm)
    mx.eval(lm(mx.array([[1] * args.context]), cache=cache))
    y = mx.array([[5]])
    bw = read_bandwidth()
    real_ext, real_block = fused._ext, block._fused_inputs

    def configure(name):  # the module-level switches these paths read, replaced for the comparison
        qmm.set_activations("float" if name.startswith("float") else "int8")
        fused._ext = (lambda *xs: None) if name == "MLX ops" else real_ext
        block._fused_inputs = real_block if name in ("default", "float activations") else (lambda *a: None)

    def step_ms():
        ts = []
        for i in range(args.steps + 2):
            for c in cache:
                c.offset = args.context  # the same cache length every step
            t = time.perf_counter()
            mx.eval(mx.argmax(lm(y, cache=cache)[:, -1, :], axis=-1))
            if i >= 2:  # two warm-up steps after each switch
                ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    names = ["default", "float activations", "op per layer", "MLX ops"]
    runs = {n: [] for n in names}
    with decoding():
        for _ in range(args.rounds):
            for n in names:
                configure(n)
                runs[n].append(step_ms())
    configure(names[0])
    per_token = LM_PARAMS * (args.bits + 1) / 8  # bits + a float32 scale and bias per group of 64
    ceiling_ms = per_token / (bw * 1e9) * 1e3
    print(f"{args.bits}-bit real-size student, {args.context}-token cache; read bandwidth {bw:.1f} GB/s: ceiling "
          f"{ceiling_ms:.1f} ms/token ({1e3 / ceiling_ms:.0f} tok/s); kernel: {qmm.status()}")
    print(f"{'':20}{'ms/step':>9}{'tok/s':>8}{'of ceiling':>12}   rounds")
    for n in names:
        ms = statistics.median(runs[n])
        print(f"{n:20}{ms:>9.1f}{1e3 / ms:>8.1f}{ceiling_ms / ms:>11.0%}   {' '.join(f'{v:.0f}' for v in runs[n])}")


if __name__ == "__main__":
    main()
