"""Teacher-cache build throughput on a GPU: real-size random-weight LLaVA-1.5-7B in bf16.

    python bench/teacher_gpu.py [--batch-sizes 1 8 16] [--batches 4] [--device cuda]

Runs `teacher_cache.build` (the same code path as `python -m teacher_cache build`, with the model built in memory
instead of loaded: random weights, llava-1.5-7b-hf's shapes — CLIP-L/14-336, Llama-7B, 576 image tokens) on
synthetic LLaVA-Instruct-like records (640×480 images, ~200-word answers, two turns), distilling text layer 32 and
pooled image states of layer 8. For each batch size: samples/s after one warm-up batch, and peak GPU memory.
Needs torch + transformers only (no mlx). Tokenizers are tiny trained ones, so token counts are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("BONSAI_BLAS", "none")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from bonsai_mlx.pico import train_tokenizer  # noqa: E402
from teacher_cache.build import BuildConfig, build  # noqa: E402
from teacher_cache.testing import train_llama_tokenizer  # noqa: E402

WORDS = ("the a red blue green large small shape picture left right above below man woman dog cat table street "
         "car tree sky window building person standing sitting holding looking near behind front of on in with and "
         "is are there this that image shows appears several two three colourful bright dark").split()


def make_data(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        ans = lambda k: " ".join(rng.choice(WORDS, k)).capitalize() + "."  # noqa: E731
        recs.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture in detail."},
            {"from": "gpt", "value": ans(150)},
            {"from": "human", "value": "What else can you see?"},
            {"from": "gpt", "value": ans(50)}]})
    (root / "data.json").write_text(json.dumps(recs))
    return root / "data.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--batches", type=int, default=4, help="timed batches per batch size (after one warm-up)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a scaled-down teacher, to check the script on a CPU")
    args = ap.parse_args()
    dev = torch.device(args.device)
    root = Path(tempfile.mkdtemp(prefix="teacher-bench-"))
    t0 = time.perf_counter()

    ltok = train_llama_tokenizer(extra_corpus=[" ".join(WORDS)] * 4)
    stok = train_tokenizer(corpus=[" ".join(WORDS)] * 4)
    student = root / "student"
    stok.save_pretrained(str(student))
    (student / "config.json").write_text(json.dumps({"model_type": "llava", "image_seq_length": 196}))

    v = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    t = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32)
    if args.tiny:
        v = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=9, num_attention_heads=2)
        t = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=2,
                 num_key_value_heads=2)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**v, image_size=336, patch_size=14, projection_dim=768,
                                       hidden_act="quick_gelu"),
        text_config=LlamaConfig(**t, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                pad_token_id=ltok.pad_token_id),
        image_token_index=ltok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=576, projector_hidden_act="gelu")
    teacher = root / "teacher"
    cfg.save_pretrained(str(teacher))
    ltok.save_pretrained(str(teacher))
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(str(teacher))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = LlavaForConditionalGeneration(cfg).eval()
    torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    from teacher_cache.records import prepare, student_side

    rec = json.loads(make_data(root / "probe", 1).read_text())[0]
    p = prepare(0, rec, student_side(str(student)), ltok, 576, cfg.image_token_id)
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else dev}; teacher {n_params / 1e9:.2f} B "
          f"params bf16; {len(p.teacher_ids)} teacher tokens per sample (576 image), {len(p.student_positions)} "
          f"aligned; setup {time.perf_counter() - t0:.1f}s", flush=True)

    max_bs = max(args.batch_sizes)
    data = make_data(root / "data", max_bs * (args.batches + 1))
    rows = []
    for bs in args.batch_sizes:
        n = bs * (args.batches + 1)
        out = root / f"cache-bs{bs}"
        bcfg = BuildConfig(teacher=str(teacher), student_tokenizer=str(student), data=str(data), out=str(out),
                           layers=[32], image_root=str(data.parent / "images"), image_states=True, image_layers=[8],
                           limit=n, batch_size=bs, device=args.device, torch_dtype="bfloat16")
        # warm-up batch (kernels, allocator) in its own cache dir, then the timed build
        warm = BuildConfig(**{**bcfg.__dict__, "out": str(root / f"warm-bs{bs}"), "limit": bs})
        build(warm, log=lambda m: None, model=model)
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t = time.perf_counter()
        build(BuildConfig(**{**bcfg.__dict__, "limit": n - bs}), log=lambda m: None, model=model)
        if cuda:
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t
        man = json.loads((out / "manifest.json").read_text())
        written = sum((out / s["file"]).stat().st_size for s in man["shards"])
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan")
        rows.append((bs, (n - bs) / dt, peak, written / (n - bs)))
        print(f"batch {bs}: {n - bs} samples in {dt:.1f}s → {(n - bs) / dt:.2f} samples/s, peak {peak:.1f} GiB, "
              f"coverage {man['coverage']:.2f}", flush=True)
    print()
    print(f"{'batch':>6}{'samples/s':>12}{'peak GiB':>10}{'MB/sample':>11}")
    for bs, sps, peak, per in rows:
        print(f"{bs:>6}{sps:>12.2f}{peak:>10.1f}{per / 1e6:>11.2f}")
    print(f"total wall {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
