"""Decode speed of `bonsai_mlx.generate` against mlx-lm's raw LM decode on the same weights, in one run.

    python bench/generate_overhead.py [--tokens 64] [--runs 3] [--dtype float32|bfloat16] [--quantize 4]

Real-size random-weight student (SigLIP-B/16-224 + Qwen2.5-0.5B shapes). The baseline is `mlx_lm.stream_generate` on
the student's language model with a text prompt of the same length as the multimodal one; ours is
`bonsai_mlx.generate` with a 224×224 image. EOS is disabled on both sides so each run decodes exactly --tokens tokens.
Runs alternate (ours, baseline, ours, …) after one warm-up each; medians are reported, the ratio last.
"""

from __future__ import annotations

import bonsai_mlx  # noqa: F401  (first: on Linux it loads OpenBLAS before mlx.core is imported)

# isort: split
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from common import median, real_size_student  # noqa: E402
from mlx_lm.generate import stream_generate as lm_stream_generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402
from PIL import Image  # noqa: E402

from bonsai_mlx.generate import generate  # noqa: E402
from bonsai_mlx.processing import Processor  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--quantize", type=int, choices=[4, 8], default=None)
    args = ap.parse_args()

    model, d = real_size_student(getattr(mx, args.dtype), args.quantize)
    processor = Processor.from_pretrained(d, model)
    processor.tokenizer.eos_token_ids = set()  # decode exactly --tokens on both sides
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    prompt = "Describe the picture in detail."
    n_prompt = len(processor.prompt_ids(prompt, with_image=True))
    text_ids = mx.array(np.random.default_rng(1).integers(3, 390, n_prompt))

    def ours():
        r = generate(model, processor, prompt, image=image, max_tokens=args.tokens)
        assert len(r.token_ids) == args.tokens, len(r.token_ids)
        return r.decode_tps, r.ttft_s, r.peak_memory_gb

    def baseline():
        mx.reset_peak_memory()
        last = None
        for resp in lm_stream_generate(model.language_model, processor.tokenizer, text_ids, max_tokens=args.tokens,
                                       sampler=make_sampler(0.0)):
            last = resp
        assert last.generation_tokens == args.tokens
        return last.generation_tps, None, mx.get_peak_memory() / 1e9

    print(f"device: {mx.default_device()}  dtype: {args.dtype}  quantize: {args.quantize}  prompt tokens: {n_prompt} "
          f"(196 image)  new tokens: {args.tokens}", flush=True)
    ours(), baseline()  # warm-up
    a, b = [], []
    for i in range(args.runs):
        a.append(ours())
        b.append(baseline())
        print(f"run {i + 1}: bonsai generate {a[-1][0]:.2f} tok/s   mlx-lm raw LM {b[-1][0]:.2f} tok/s", flush=True)
    da, db = median([x[0] for x in a]), median([x[0] for x in b])
    print()
    print(f"{'':24}{'decode tok/s':>14}{'TTFT s':>10}{'peak GB':>10}")
    print(f"{'bonsai generate (image)':24}{da:>14.2f}{median([x[1] for x in a]):>10.2f}{max(x[2] for x in a):>10.2f}")
    print(f"{'mlx-lm raw LM (text)':24}{db:>14.2f}{'-':>10}{max(x[2] for x in b):>10.2f}")
    print(f"ratio decode bonsai / mlx-lm: {da / db:.3f}")


if __name__ == "__main__":
    main()
