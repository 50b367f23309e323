"""CPU inference, all in one run: bonsai-mlx (default policy), bonsai-mlx with BONSAI_BLAS=none, bonsai-mlx 4-bit and
8-bit, and transformers on the `convert/to_hf.py` export of the same weights.

    python bench/cpu_inference.py [--tokens 64] [--rounds 3] [--skip-noblas]

Real-size random-weight student (SigLIP-B/16-224 + Qwen2.5-0.5B shapes, float32), one 224×224 image + a 32-token
prompt, greedy, exactly --tokens new tokens (EOS off). Each configuration runs in its own process (clean peak
memory; the BLAS choice is per process), --rounds times, the configurations alternating (this shared VM's speed
drifts): median TTFT, median decode tok/s, largest peak memory, and decode as a share of the bandwidth ceiling
(weight bytes read per token / measured read bandwidth). The ratios last, from the medians and per round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LM_PARAMS = 494_032_768
PROMPT = ("Look at the picture carefully and describe every object you can see, its colour, its shape and where it "
          "is in the image.")


def worker_bonsai(model_dir: str, tokens: int, quantize: int) -> dict:
    import bonsai_mlx  # noqa: F401  (first: BLAS before mlx)

    # isort: split
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from bonsai_mlx.cpu import blas as _blas
    from bonsai_mlx.generate import generate
    from bonsai_mlx.io import load

    model, proc = load(model_dir, quantize=quantize or None)
    proc.tokenizer.eos_token_ids = set()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    generate(model, proc, PROMPT, image=img, max_tokens=2)  # warm-up
    mx.reset_peak_memory()
    r = generate(model, proc, PROMPT, image=img, max_tokens=tokens)
    return {"ttft_s": r.ttft_s, "decode_tps": r.decode_tps, "peak_gb": mx.get_peak_memory() / 1e9,
            "prompt_tokens": r.prompt_tokens, "new_tokens": len(r.token_ids), "blas": _blas.status}


def worker_transformers(export_dir: str, tokens: int) -> dict:
    sys.path.insert(0, str(HERE))
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from worker import peak_rss_gb

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(export_dir, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(export_dir)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    inputs = proc(images=img, text=proc.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        t = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        total = time.perf_counter() - t
    n = out.shape[1] - inputs["input_ids"].shape[1]
    return {"ttft_s": ttft, "decode_tps": (n - 1) / max(total - ttft, 1e-9),
            "peak_gb": peak_rss_gb(),
            "prompt_tokens": int(inputs["input_ids"].shape[1]), "new_tokens": int(n), "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of every configuration (default 3)")
    ap.add_argument("--skip-noblas", action="store_true", help="skip the slow reference-BLAS run")
    ap.add_argument("--worker", nargs="*")
    args = ap.parse_args()
    if args.worker is not None:
        kind, path, tokens = args.worker[0], args.worker[1], int(args.worker[2])
        res = worker_transformers(path, tokens) if kind == "hf" else worker_bonsai(path, tokens, int(kind[1:] or 0))
        print(json.dumps(res))
        return

    import bonsai_mlx  # noqa: F401  (first: BLAS before mlx)

    # isort: split
    import mlx.core as mx

    sys.path.insert(0, str(HERE))
    from common import real_size_student
    from worker import run_worker

    from bonsai_mlx.doctor import read_bandwidth
    from bonsai_mlx.export.hf import export
    from bonsai_mlx.io import save_model

    tmp = Path(tempfile.mkdtemp(prefix="bonsai-cpu-bench-"))
    model, side = real_size_student(mx.float32)
    save_model(model, tmp / "student", extra_files_from=side)
    del model
    export(str(tmp / "student"), tmp / "hf", dtype="float32")
    bw = read_bandwidth()
    print(f"real-size random student in {tmp}; read bandwidth {bw:.1f} GB/s; {args.tokens} new tokens", flush=True)

    configs = {"bonsai-mlx (default policy)": (["b0", str(tmp / "student")], None),
               "bonsai-mlx --quantize 4": (["b4", str(tmp / "student")], None),
               "bonsai-mlx --quantize 8": (["b8", str(tmp / "student")], None)}
    if not args.skip_noblas:
        configs["bonsai-mlx BONSAI_BLAS=none"] = (["b0", str(tmp / "student")], {"BONSAI_BLAS": "none"})
    configs["transformers fp32 (export)"] = (["hf", str(tmp / "hf")], None)
    runs = {name: [] for name in configs}
    for i in range(args.rounds):
        for name, (worker, env) in configs.items():
            if env is not None and i > 0:
                continue  # the reference-BLAS run takes minutes: once
            runs[name].append(run_worker(__file__, [*worker, str(args.tokens)], env=env))
            r = runs[name][-1]
            print(f"  round {i + 1} {name}: TTFT {r['ttft_s']:.3f} s, {r['decode_tps']:.2f} tok/s, "
                  f"peak {r['peak_gb']:.3f} GB", flush=True)
    rows = {name: {"ttft_s": statistics.median(r["ttft_s"] for r in rs),
                   "decode_tps": statistics.median(r["decode_tps"] for r in rs),
                   "peak_gb": max(r["peak_gb"] for r in rs)} for name, rs in runs.items()}
    # bytes of LM weights read per token: 4 (8) bits + a float32 scale and bias per group of 64
    bytes_per_token = {"bonsai-mlx --quantize 4": LM_PARAMS * 5 / 8, "bonsai-mlx --quantize 8": LM_PARAMS * 9 / 8}
    print()
    print(f"{args.rounds} rounds; medians of TTFT and decode, largest peak")
    print(f"{'':30}{'TTFT s':>9}{'decode tok/s':>14}{'peak GB':>9}{'of ceiling':>12}")
    for name, r in rows.items():
        share = r["decode_tps"] * bytes_per_token.get(name, LM_PARAMS * 4) / (bw * 1e9)
        print(f"{name:30}{r['ttft_s']:>9.2f}{r['decode_tps']:>14.2f}{r['peak_gb']:>9.3f}{share:>11.0%}")
    hf_name, ours_name = "transformers fp32 (export)", "bonsai-mlx (default policy)"
    hf, ours = rows[hf_name], rows[ours_name]

    def per_round(key):
        return ", ".join(f"{a[key] / b[key]:.2f}" for a, b in zip(runs[ours_name], runs[hf_name], strict=True))

    print()
    print(f"TTFT bonsai / transformers: {ours['ttft_s'] / hf['ttft_s']:.2f} (target <= 1.0; per round "
          f"{per_round('ttft_s')})")
    print(f"decode bonsai / transformers: {ours['decode_tps'] / hf['decode_tps']:.2f} (target >= 1.0; per round "
          f"{per_round('decode_tps')})")
    q4, q8 = rows["bonsai-mlx --quantize 4"], rows["bonsai-mlx --quantize 8"]
    for bits, r in ((4, q4), (8, q8)):
        ceiling = bw * 1e9 / bytes_per_token[f"bonsai-mlx --quantize {bits}"]
        print(f"{bits}-bit decode {r['decode_tps']:.2f} tok/s = {r['decode_tps'] / ceiling:.0%} of its bandwidth "
              f"ceiling ({ceiling:.1f} tok/s at {bw:.1f} GB/s; goal >= 50%, moonshot >= 70%)")
    print(f"4-bit TTFT / float32 TTFT: {q4['ttft_s'] / ours['ttft_s']:.2f} (target <= 1.0)")
    print(f"4-bit peak memory incl. vision: {q4['peak_gb']:.3f} GB (target <= 0.8)")
    from bonsai_mlx.cpu import blas, qmm

    print(f"BLAS: {blas.status}; quantized kernel: {qmm.status()}")
    shutil.rmtree(tmp, ignore_errors=True)  # the student and its export (~4.4 GB)

if __name__ == "__main__":
    main()
