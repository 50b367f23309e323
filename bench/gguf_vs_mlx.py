"""llama.cpp (our GGUF export: Q4_0, Q8_0, F16) against bonsai-mlx (`--quantize 4` and float32) on this CPU, in one
run: TTFT (image + prompt), decode tok/s, peak RSS, each also as a ratio to llama.cpp Q4_0 — the peer the CPU path
is measured against.

    python bench/gguf_vs_mlx.py [--tokens 64] [--rounds 3] [--threads N]

Real-size random-weight student (SigLIP-B/16-224 + Qwen2.5-0.5B shapes; bonsai-mlx 4-bit loads it saved 4-bit, as
`bonsai-mlx fuse` writes it, so that its peak is not the float checkpoint's), one 224×224 image + a ~30-token prompt,
greedy, exactly --tokens new tokens (EOS off). Each configuration runs in its own process (clean peak RSS),
--rounds times, alternating (this VM's speed drifts): medians of TTFT and decode, the largest peak RSS. llama.cpp
runs through llama-cpp-python (built from its sdist, `pip install -e '.[llama]'`) with the image handed over as our
processor's 224×224 RGB (`export/llama_runner.py`), on as many threads as bonsai-mlx's kernels use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from worker import peak_rss_gb, run_worker  # noqa: E402

PROMPT = ("Look at the picture carefully and describe every object you can see, its colour, its shape and where it "
          "is in the image.")


def worker_llama(gguf_dir: str, type_: str, tokens: int, threads: int) -> dict:
    import numpy as np
    from PIL import Image

    from bonsai_mlx.export.llama_runner import LlamaCppRunner
    from bonsai_mlx.io import load_config

    d = Path(gguf_dir)
    student = d.parent / "student"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(student))
    cfg = load_config(student)
    from bonsai_mlx.prompting import build_generation_prompt

    ids = build_generation_prompt(tok, PROMPT, cfg["image_seq_length"], with_image=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    run = LlamaCppRunner(d / f"student-{type_.upper()}.gguf", d / "mmproj-student-F16.gguf", n_ctx=1024,
                         n_threads=threads)
    run.greedy(ids, 2, image=img, image_token_id=cfg["image_token_index"])  # warm-up
    t0 = time.perf_counter()
    run.prefill(ids, image=img, image_token_id=cfg["image_token_index"])
    first = int(np.argmax(run.last_logits()))
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    tok_id = first
    for _ in range(tokens - 1):
        run.llm.eval([tok_id])
        tok_id = int(np.argmax(run.last_logits()))
    dt = time.perf_counter() - t1
    return {"ttft_s": ttft, "decode_tps": (tokens - 1) / dt, "peak_rss_gb": peak_rss_gb(), "prompt_tokens": len(ids)}


def worker_bonsai(student: str, quantize: int, tokens: int) -> dict:
    import bonsai_mlx  # noqa: F401  (first: BLAS before mlx)

    # isort: split
    import numpy as np
    from PIL import Image

    from bonsai_mlx.generate import generate
    from bonsai_mlx.io import load

    model, proc = load(student, quantize=quantize or None)
    proc.tokenizer.eos_token_ids = set()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    generate(model, proc, PROMPT, image=img, max_tokens=2)  # warm-up
    r = generate(model, proc, PROMPT, image=img, max_tokens=tokens)
    return {"ttft_s": r.ttft_s, "decode_tps": r.decode_tps, "peak_rss_gb": peak_rss_gb(),
            "prompt_tokens": r.prompt_tokens}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: bonsai-mlx's kernel's)")
    ap.add_argument("--worker", nargs="*")
    args = ap.parse_args()
    if args.worker is not None:
        kind, path, tokens, threads = args.worker[0], args.worker[1], int(args.worker[2]), int(args.worker[3])
        res = worker_llama(path, kind[1:], tokens, threads) if kind.startswith("L") else \
            worker_bonsai(path, int(kind[1:] or 0), tokens)
        print(json.dumps(res))
        return

    import bonsai_mlx  # noqa: F401

    # isort: split
    import mlx.core as mx

    sys.path.insert(0, str(HERE))
    from common import real_size_student

    from bonsai_mlx.cpu import qmm
    from bonsai_mlx.export.gguf import export_gguf
    from bonsai_mlx.io import save_model

    ext = qmm.extension()
    threads = args.threads or (ext.num_threads() if ext is not None else os.cpu_count())
    tmp = Path(tempfile.mkdtemp(prefix="bonsai-gguf-bench-"))
    model, side = real_size_student(mx.float32)
    save_model(model, tmp / "student", extra_files_from=side)
    del model
    from bonsai_mlx.io import load_model

    q4 = load_model(tmp / "student", quantize=4)  # the 4-bit student as saved on disk (loads without the floats)
    save_model(q4, tmp / "student_q4", extra_files_from=tmp / "student")
    del q4
    for t in ("q4_0", "q8_0", "f16"):
        export_gguf(str(tmp / "student"), tmp / "gguf" if t == "q4_0" else tmp / f"gguf_{t}", type_=t, log=print)
    for t in ("q8_0", "f16"):  # one folder, one mmproj
        src = tmp / f"gguf_{t}" / f"student-{t.upper()}.gguf"
        src.rename(tmp / "gguf" / src.name)
    print(f"real-size random student and its GGUFs in {tmp}; {args.tokens} new tokens; llama.cpp on {threads} "
          "threads", flush=True)
    g = str(tmp / "gguf")
    configs = {"llama.cpp Q4_0": ["LQ4_0", g], "llama.cpp Q8_0": ["LQ8_0", g], "llama.cpp F16": ["LF16", g],
               "bonsai-mlx 4-bit": ["b0", str(tmp / "student_q4")],
               "bonsai-mlx float32": ["b0", str(tmp / "student")]}
    runs = {name: [] for name in configs}
    for i in range(args.rounds):
        for name, w in configs.items():
            kind = w[0] if not w[0].startswith("L") else "L" + w[0][1:].lower()
            r = run_worker(__file__, [kind, w[1], str(args.tokens), str(threads)])
            runs[name].append(r)
            print(f"  round {i + 1} {name}: TTFT {r['ttft_s']:.3f} s, {r['decode_tps']:.2f} tok/s, "
                  f"peak RSS {r['peak_rss_gb']:.3f} GB", flush=True)
    rows = {n: {"ttft_s": statistics.median(r["ttft_s"] for r in rs),
                "decode_tps": statistics.median(r["decode_tps"] for r in rs),
                "peak_rss_gb": max(r["peak_rss_gb"] for r in rs)} for n, rs in runs.items()}
    base = rows["llama.cpp Q4_0"]
    print()
    print(f"{args.rounds} rounds; medians of TTFT and decode, largest peak RSS; ratios to llama.cpp Q4_0")
    print(f"{'':26}{'TTFT s':>8}{'÷Q4_0':>7}{'decode tok/s':>14}{'÷Q4_0':>7}{'peak RSS GB':>13}{'÷Q4_0':>7}")
    for n, r in rows.items():
        print(f"{n:26}{r['ttft_s']:>8.2f}{r['ttft_s'] / base['ttft_s']:>7.2f}{r['decode_tps']:>14.2f}"
              f"{r['decode_tps'] / base['decode_tps']:>7.2f}{r['peak_rss_gb']:>13.3f}"
              f"{r['peak_rss_gb'] / base['peak_rss_gb']:>7.2f}")
    print(f"bonsai-mlx quantized kernel: {qmm.status()}")
    shutil.rmtree(tmp, ignore_errors=True)  # ~5 GB of models and GGUFs


if __name__ == "__main__":
    main()
