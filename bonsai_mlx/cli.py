"""The `bonsai-mlx` command line.

Every subcommand turns a user mistake (missing file, bad checkpoint, offline hub) into one line on stderr and a
non-zero exit code; tracebacks are for bugs only.
"""

from __future__ import annotations

import sys
import time

import click

from .errors import BonsaiError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bonsai-mlx")
def cli():
    """Bonsai-LLaVA in MLX: a tiny SigLIP + Qwen2.5 vision-language model you can build, run, train and distill.

    \b
    Start offline with a tiny random student:
      bonsai-mlx init --pico --out pico
      bonsai-mlx forward --model pico --prompt "What colour is the square?"
    Build the real student (needs the two checkpoints, downloaded or cached):
      bonsai-mlx init --vision google/siglip-base-patch16-224 --language Qwen/Qwen2.5-0.5B-Instruct --out bonsai
    """


@cli.command()
@click.option("--vision", metavar="ID_OR_DIR", help="SigLIP checkpoint (hub id or directory), e.g. google/siglip-base-patch16-224.")
@click.option("--language", metavar="ID_OR_DIR", help="Qwen2 checkpoint (hub id or directory), e.g. Qwen/Qwen2.5-0.5B-Instruct.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the student to.")
@click.option("--vision-feature-layer", default=-1, show_default=True, type=int,
              help="Which vision hidden state feeds the projector (-1: last layer, before post-layernorm).")
@click.option("--pico", is_flag=True, help="Build a tiny random student offline instead (no checkpoints needed).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the projector (and pico) initialisation.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Cast all weights to this dtype (default: keep each backbone's dtype).")
@click.option("--force", is_flag=True, help="Replace --out if it already exists and is not empty.")
def init(vision, language, out, vision_feature_layer, pico, seed, dtype, force):
    """Assemble a new student: SigLIP vision tower + fresh projector + Qwen2 LM, saved as a llava-hf directory.

    The directory loads in transformers as LlavaForConditionalGeneration and in bonsai-mlx everywhere a --model is
    asked for. The tokenizer gets the <image> token and the chat template.
    """
    from pathlib import Path

    p = Path(out)
    if p.exists() and any(p.iterdir()) and not force:
        raise BonsaiError(f"--out {out} exists and is not empty; pass --force to replace it or choose another path")
    t0 = time.perf_counter()
    if pico:
        if vision or language:
            raise BonsaiError("--pico builds a random tiny student; do not also pass --vision/--language")
        from .pico import build_pico

        build_pico(out, seed=seed)
    else:
        if not (vision and language):
            raise BonsaiError("pass both --vision and --language (or --pico for a tiny offline student)")
        from .assemble import assemble

        assemble(vision, language, out, vision_feature_layer=vision_feature_layer, seed=seed, dtype=dtype)
    click.echo(f"wrote student to {out} in {time.perf_counter() - t0:.1f}s")


@cli.command()
@click.option("--model", required=True, metavar="ID_OR_DIR", help="Student directory or hub id (llava-style).")
@click.option("--image", metavar="FILE", default=None, help="Image file; default: a generated test picture.")
@click.option("--prompt", default="What is in the picture?", show_default=True, help="User prompt.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the language model first.")
def forward(model, image, prompt, quantize):
    """Run one forward pass on an image + prompt and print the most likely next tokens (a smoke test)."""
    import mlx.core as mx
    import numpy as np
    from transformers import AutoTokenizer

    from .hub import resolve
    from .io import load_model
    from .processing import ImageProcessor
    from .prompting import build_generation_prompt

    if not prompt.strip():
        raise BonsaiError("--prompt is empty")
    path = resolve(model)
    m = load_model(path, quantize=int(quantize) if quantize else None)
    tok = AutoTokenizer.from_pretrained(str(path))
    proc = ImageProcessor.from_pretrained(path, default_size=m.config.vision_config.image_size)
    if image is None:
        from PIL import Image, ImageDraw

        pic = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(pic).rectangle([24, 24, 72, 72], fill="red")
        image = pic
    pixels = mx.array(proc(image))
    ids = build_generation_prompt(tok, prompt, m.config.image_seq_length)
    t0 = time.perf_counter()
    logits = m(mx.array([ids]), pixels, last_only=True)
    mx.eval(logits)
    dt = time.perf_counter() - t0
    probs = np.array(mx.softmax(logits[0, -1].astype(mx.float32)))
    top = np.argsort(-probs)[:5]
    click.echo(f"prompt tokens: {len(ids)} ({m.config.image_seq_length} image tokens); forward {dt * 1000:.0f} ms")
    click.echo("next-token top-5: " + ", ".join(f"{tok.decode([int(i)])!r} {probs[i]:.3f}" for i in top))


def _validate_sampling(max_tokens, temp, top_p, top_k):
    from .generate import _check_sampling

    _check_sampling(max_tokens, temp, top_p, top_k)


@cli.command()
@click.option("--model", required=True, metavar="ID_OR_DIR", help="Student directory or hub id (llava-style).")
@click.option("--image", metavar="FILE|URL|DIR", default=None,
              help="Image file or http(s) URL; a directory answers the prompt for every image in it (JSON lines).")
@click.option("--prompt", required=True, help="The question or instruction.")
@click.option("--system", default=None, help="System prompt (default: the chat template's).")
@click.option("--max-tokens", default=256, show_default=True, type=int, help="Most new tokens to generate.")
@click.option("--temp", default=0.0, show_default=True, type=float, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling mass in (0, 1].")
@click.option("--top-k", default=0, show_default=True, type=int, help="Sample from the k most likely tokens; 0: off.")
@click.option("--seed", default=None, type=int, help="Random seed for sampling.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the language model on load.")
@click.option("--adapter", default=None, type=click.Path(), metavar="DIR",
              help="Training checkpoint to apply (LoRA adapters + projector).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (ids, text, stats) instead of streaming.")
def generate(model, image, prompt, system, max_tokens, temp, top_p, top_k, seed, quantize, adapter, as_json):
    """Answer a prompt about an image, streaming tokens to stdout (stats go to stderr).

    \b
    Examples:
      bonsai-mlx generate --model bonsai --image cat.jpg --prompt "What is the cat doing?"
      bonsai-mlx generate --model bonsai --image photos/ --prompt "Describe the picture." > answers.jsonl
    """
    import json
    from pathlib import Path

    from .generate import generate as run_generate
    from .generate import list_images, stream_generate
    from .io import load

    if not prompt.strip():
        raise BonsaiError("--prompt is empty")
    _validate_sampling(max_tokens, temp, top_p, top_k)
    folder = None
    if image is not None and not image.startswith(("http://", "https://")):
        p = Path(image)
        if p.is_dir():
            folder = list_images(p)
            if not folder:
                raise BonsaiError(f"--image {image}: the directory holds no images ({', '.join(sorted(_exts()))})")
        elif not p.exists():
            raise BonsaiError(f"--image {image}: no such file")
    m, processor = load(model, quantize=int(quantize) if quantize else None, adapter=adapter)
    kw = dict(system=system, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, seed=seed)

    if folder is not None:
        failed = 0
        for img in folder:
            try:
                r = run_generate(m, processor, prompt, image=str(img), **kw)
                line = {"image": str(img), **_result_json(r)}
            except BonsaiError as e:
                failed += 1
                line = {"image": str(img), "error": str(e)}
            click.echo(json.dumps(line, ensure_ascii=False))
        click.echo(f"{len(folder)} images, {failed} failed", err=True)
        return

    if as_json:
        r = run_generate(m, processor, prompt, image=image, **kw)
        click.echo(json.dumps({"image": image, **_result_json(r)}, ensure_ascii=False))
        return
    result = None
    for segment, item in stream_generate(m, processor, prompt, image=image, **kw):
        if segment is None:
            result = item
        else:
            click.echo(segment, nl=False)
            sys.stdout.flush()
    click.echo()
    click.echo(
        f"ttft {result.ttft_s:.3f}s | vision {result.vision_s:.3f}s | prefill {result.prefill_tps:.1f} tok/s "
        f"({result.prompt_tokens} tokens) | decode {result.decode_tps:.1f} tok/s ({len(result.token_ids)} tokens) | "
        f"peak memory {result.peak_memory_gb:.2f} GB",
        err=True,
    )


def _exts():
    from .generate import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def _result_json(r) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "token_ids": r.token_ids,
        "text": r.text,
        "ttft_s": round(r.ttft_s, 4),
        "vision_s": round(r.vision_s, 4),
        "prefill_tps": round(r.prefill_tps, 2),
        "decode_tps": round(r.decode_tps, 2),
        "peak_memory_gb": round(r.peak_memory_gb, 4),
        "finish_reason": r.finish_reason,
    }


@cli.command()
@click.option("--model", required=True, metavar="ID_OR_DIR", help="Student directory or hub id (llava-style).")
@click.option("--adapter", default=None, type=click.Path(), metavar="DIR", help="Also count a checkpoint's LoRA.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object.")
def info(model, adapter, as_json):
    """Parameters per component, bytes on disk and in memory at each precision, image tokens, context length."""
    import json

    from .info import model_info

    d = model_info(model, adapter=adapter)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"model: {d['path']}")
    click.echo(f"image tokens per image: {d['image_tokens']} ({d['image_size']}px, patch {d['patch_size']}); "
               f"context length: {d['context_length']}; vocab rows: {d['vocab_rows']}")
    click.echo("parameters:")
    for k, v in d["parameters"].items():
        click.echo(f"  {k:<10} {v:>14,d}  ({v / 1e6:.1f} M)")
    click.echo(f"on disk: {d['disk_bytes'] / 1e9:.3f} GB ({d['disk_dtype']})")
    click.echo("in memory (language model at the precision, vision tower + projector in bfloat16 when quantized):")
    for k, v in d["memory_bytes"].items():
        click.echo(f"  {k:<9} {v / 1e9:.3f} GB")


@cli.command()
@click.option("--phase", type=click.Choice(["sft", "hsd"]), default=None,
              help="sft: cross-entropy on answers; hsd: plus hidden-state distillation from a teacher cache.")
@click.option("--model", metavar="DIR_OR_ID", default=None, help="Student to train (from `bonsai-mlx init`).")
@click.option("--data", metavar="JSON", default=None, help="LLaVA-Instruct JSON (list of records) or JSONL.")
@click.option("--image-root", metavar="DIR", default=None, help="Folder the records' `image` paths are relative to.")
@click.option("--out", metavar="RUN_DIR", default=None, help="Run directory: checkpoint/, metrics.jsonl, config.json.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML file with any of these options (keys like batch_size or batch-size); flags override it.")
@click.option("--limit", type=int, default=None, help="Train on the first N records of --data only [all].")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps to train (default: one epoch).")
@click.option("--epochs", type=float, default=None, help="Epochs to train instead of --max-steps.")
@click.option("--batch-size", type=int, default=None, help="Sequences per micro-batch [4].")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step [1].")
@click.option("--lr", type=float, default=None, help="Peak learning rate of the LoRA adapters [2e-4].")
@click.option("--lr-projector", type=float, default=None, help="Peak learning rate of the projector [2e-5].")
@click.option("--warmup", type=float, default=None, help="Warmup as a ratio of the total steps [0.03].")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay [0].")
@click.option("--lora-rank", type=int, default=None, help="LoRA rank r [16].")
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha/r [32].")
@click.option("--lora-dropout", type=float, default=None, help="LoRA dropout [0.05].")
@click.option("--train-lm", type=click.Choice(["lora", "full"]), default=None,
              help="lora: adapters on the frozen base [default]; full: train every LM weight (needs --quantize none).")
@click.option("--train-vision/--no-train-vision", default=None,
              help="Also train the vision tower (at --lr-vision); for tasks the frozen tower cannot see [off].")
@click.option("--lr-vision", type=float, default=None, help="Peak learning rate of the vision tower [1e-4].")
@click.option("--warmup-vision", type=float, default=None,
              help="Warmup ratio of the vision tower's learning rate [--warmup]; a later start keeps a random tower "
                   "from collapsing while the LM learns to look.")
@click.option("--quantize", type=click.Choice(["4", "8", "none"]), default=None,
              help="Precision of the frozen base LM [4] (QLoRA); none keeps it in --dtype.")
@click.option("--max-seq-len", type=int, default=None, help="Truncate sequences to this many tokens [2048].")
@click.option("--eval-data", metavar="JSON", default=None, help="Held-out JSON for the eval loss.")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N steps (and at the end).")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps (always at the end).")
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR/checkpoint (exactly: same losses as unbroken).")
@click.option("--seed", type=int, default=None, help="Seed for data order, LoRA init and dropout [0].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Compute dtype of the non-quantized weights [float32; bfloat16 suits Apple GPUs].")
@click.option("--strict/--no-strict", default=None, help="Stop at the first bad record instead of skipping it.")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help="Recompute LM blocks in backward.")
@click.option("--compile/--no-compile", "compile_", default=None, help="mx.compile the training step [on].")
@click.option("--teacher-cache", metavar="CACHE_DIR", default=None,
              help="hsd: teacher hidden states from `python -m teacher_cache build`.")
@click.option("--alpha", type=float, default=None, help="hsd: loss = (1-alpha)·CE + alpha·distillation [0.5].")
@click.option("--image-weight", type=float, default=None, help="hsd: weight of L_img inside the distillation [1].")
@click.option("--text-layers", metavar="S:T,…", default=None,
              help="hsd: student:teacher hidden-state pairs for L_text [student last : cache's deepest].")
@click.option("--image-layer", metavar="S:T", default=None,
              help="hsd: student:teacher pair for L_img [cache's image layer at the same relative depth].")
@click.option("--lr-align", type=float, default=None, help="hsd: learning rate of the alignment projectors [1e-3].")
@click.option("--standardize/--no-standardize", default=None,
              help="hsd: standardize teacher states per channel with the cache's mean/std [on]; off: raw states.")
def train(config_file, resume, compile_, **opts):
    """Train the student: QLoRA SFT on LLaVA-Instruct-format data, or HSD with a teacher cache.

    \b
    Example:
      bonsai-mlx train --phase sft --model bonsai --data llava_instruct_150k.json \\
          --image-root coco/train2017 --out runs/sft --max-steps 2000 --batch-size 4 --grad-accum 4
      bonsai-mlx train --phase hsd --teacher-cache cache/ --alpha 0.5 --model bonsai --data … --out runs/hsd

    Bad records are skipped and counted (reported at the start and the end); progress shows loss, supervised
    tokens/s, learning rate and ETA; RUN_DIR/metrics.jsonl logs every step (`bonsai-mlx plot RUN_DIR` draws it).
    """
    from pathlib import Path

    import yaml

    from .trainer import TrainConfig, Trainer

    merged = {}
    if resume and opts.get("out") and (Path(opts["out"]) / "checkpoint" / "config.json").exists():
        import json

        merged.update(json.loads((Path(opts["out"]) / "checkpoint" / "config.json").read_text()))
    if config_file:
        try:
            y = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise BonsaiError(f"--config {config_file}: {str(e).splitlines()[0]}") from None
        if not isinstance(y, dict):
            raise BonsaiError(f"--config {config_file}: expected a mapping of option: value")
        merged.update({k.replace("-", "_"): v for k, v in y.items()})
    if compile_ is not None:
        opts["compile"] = compile_
    merged.update({k: v for k, v in opts.items() if v is not None})
    cfg = TrainConfig.from_dict(merged)
    Trainer(cfg, resume=resume, log=lambda m: click.echo(m, err=True)).train()


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="PNG path [RUN_DIR/curves.png].")
def plot(run_dir, out):
    """Draw a run's metrics.jsonl (train and eval loss, learning rate, tokens/s) as a PNG."""
    from .plotting import plot_metrics

    path = plot_metrics(run_dir, out)
    click.echo(f"wrote {path}")


@cli.command()
@click.option("--model", required=True, metavar="DIR_OR_ID", help="Base student the adapter was trained on.")
@click.option("--adapter", required=True, type=click.Path(), metavar="DIR", help="Training checkpoint directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New student directory.")
@click.option("--dequantize", is_flag=True, help="Write a quantized base LM back in full precision.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def fuse(model, adapter, out, dequantize, force):
    """Merge a checkpoint's LoRA adapters and projector into a new student directory."""
    from pathlib import Path

    from .adapters import fuse_lora
    from .hub import resolve
    from .io import load, save_model

    p = Path(out)
    if p.exists() and any(p.iterdir()) and not force:
        raise BonsaiError(f"--out {out} exists and is not empty; pass --force to replace it")
    m, _ = load(model, adapter=adapter)
    fuse_lora(m, dequantize=dequantize)
    save_model(m, out, extra_files_from=resolve(model))
    click.echo(f"wrote fused student to {out}")


@cli.command()
@click.option("--model", required=True, metavar="DIR_OR_ID", help="Student directory or hub id.")
@click.option("--adapter", default=None, type=click.Path(), metavar="DIR",
              help="Training checkpoint whose LoRA adapters and projector are fused in.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Weight dtype of the export.")
@click.option("--shard-size", default="2GB", show_default=True, help="Largest safetensors shard, e.g. 2GB, 500MB.")
@click.option("--peft", is_flag=True, help="Also write the adapters as a PEFT LoRA adapter in OUT/peft.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
def export(model, adapter, out, dtype, shard_size, peft, force):
    """Export to a transformers LlavaForConditionalGeneration directory (fusing an adapter if given).

    Same as `python convert/to_hf.py`. Loads with LlavaForConditionalGeneration.from_pretrained(OUT) and
    AutoProcessor.from_pretrained(OUT); no custom code.
    """
    from .export import export as run_export

    run_export(model, out, adapter=adapter, dtype=dtype, shard_size=shard_size, peft=peft, force=force)
    click.echo(f"exported to {out}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as one JSON object.")
def doctor(as_json):
    """MLX version and device, the BLAS in use, measured GEMM / 4-bit GFLOP/s and memory bandwidth, and what they
    mean for speed (decode ceilings, prefill estimate for the 0.5 B language model)."""
    import json

    from .doctor import advice, report

    r = report()
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"MLX {r['mlx']} on {r['device']} ({r['platform']})")
    click.echo(f"BLAS: {r['blas']}")
    click.echo(f"f32 GEMM {r['gemm_f32_gflops']:.1f} GFLOP/s | 4-bit matmul {r['q4_matmul_gflops']:.1f} GFLOP/s | "
               f"memory read {r['read_bandwidth_gbs']:.1f} GB/s")
    click.echo(f"Qwen2.5-0.5B decode ceiling: {r['decode_ceiling_f32_tok_s']:.1f} tok/s at float32, "
               f"{r['decode_ceiling_4bit_tok_s']:.1f} tok/s at 4 bits; prefill ~{r['prefill_estimate_f32_tok_s']:.0f} "
               "tok/s at float32 (GEMM-bound)")
    for line in advice(r):
        click.echo(f"advice: {line}")


@cli.command(name="eval")
@click.option("--model", required=True, metavar="DIR_OR_ID", help="Student directory or hub id.")
@click.option("--adapter", default=None, type=click.Path(), metavar="DIR", help="Training checkpoint to apply.")
@click.option("--task", required=True, type=click.Choice(["loss", "vqa", "pope"]),
              help="loss: CE/perplexity on assistant tokens; vqa: exact-match accuracy per question type; pope: "
                   "yes/no object probe.")
@click.option("--data", required=True, metavar="FILE",
              help="loss/vqa: LLaVA-Instruct JSON or JSONL; pope: POPE JSON lines (from `bonsai-mlx pope-build`).")
@click.option("--image-root", metavar="DIR", default=None, help="Folder the records' image paths are relative to.")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N records/questions.")
@click.option("--max-tokens", default=8, show_default=True, type=int, help="vqa: longest generated answer.")
@click.option("--batch-size", default=4, show_default=True, type=int, help="loss: sequences per forward pass.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the language model on load.")
@click.option("--system", default=None, help="System prompt (default: the chat template's).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), metavar="FILE.json",
              help="Write the full results (metrics, CIs, every prediction) as JSON.")
def eval_cmd(model, adapter, task, data, image_root, limit, max_tokens, batch_size, quantize, system, out):
    """Evaluate a student: held-out loss, short-answer VQA accuracy, or POPE.

    Every metric is printed with its sample count and a 95% confidence interval (Wilson for proportions, bootstrap
    for the loss and F1).

    \b
    Examples:
      bonsai-mlx eval --model pico --adapter runs/sft/checkpoint --task vqa --data shapes/eval.json --image-root shapes
      bonsai-mlx eval --model bonsai --task loss --data heldout.json --image-root coco/train2017
      bonsai-mlx pope-build --annotations instances_val2017.json --images val2017 --out pope/coco.jsonl
      bonsai-mlx eval --model bonsai --task pope --data pope/coco_adversarial.jsonl --image-root val2017
    """
    import json
    from pathlib import Path

    from . import load
    from .evaluate import Evaluator, eval_loss, eval_pope, eval_vqa, read_pope

    if limit is not None and limit < 1:
        raise BonsaiError(f"--limit must be at least 1, got {limit}")
    if task in ("loss", "vqa"):
        from .data import read_records

        records = read_records(data)
    else:
        questions = read_pope(data)
    m, processor = load(model, quantize=int(quantize) if quantize else None, adapter=adapter)
    ev = Evaluator(m, processor, image_root, system)
    if task == "loss":
        res = eval_loss(m, processor, records, image_root, limit=limit, batch_size=batch_size, source=str(data))
        lo, hi = res["loss"]["ci95"]
        click.echo(f"loss {res['loss']['value']:.4f} [{lo:.4f}, {hi:.4f}]  perplexity "
                   f"{res['perplexity']['value']:.3f}  ({res['loss']['n']} samples, {res['tokens']} tokens)")
    elif task == "vqa":
        res = eval_vqa(ev, records, limit=limit, max_tokens=max_tokens, source=str(data))
        click.echo(f"{'type':<12} {'n':>5}  accuracy [95% CI]")
        for t, v in list(res["per_type"].items()) + [("overall", res["accuracy"])]:
            click.echo(f"{t:<12} {v['n']:>5}  {v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]")
    else:
        res = eval_pope(ev, questions, limit=limit)
        for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            v = res[k]
            click.echo(f"{k:<10} {v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]  (n={v['n']})")
    if out:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        res = {"model": str(model), "adapter": adapter, "data": str(data), **res}
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        tmp.replace(p)
        click.echo(f"wrote {p}")


@cli.command(name="pope-build")
@click.option("--annotations", required=True, type=click.Path(dir_okay=False), metavar="instances.json",
              help="COCO-format annotation file (e.g. COCO's instances_val2017.json).")
@click.option("--images", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="Image folder; when given, every chosen image must exist there.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FILE.jsonl",
              help="Output name; writes FILE_random.jsonl, FILE_popular.jsonl, FILE_adversarial.jsonl.")
@click.option("--num-images", default=500, show_default=True, type=int, help="Images to sample (POPE uses 500).")
@click.option("--per-image", default=3, show_default=True, type=int, help="Yes questions per image (as many no).")
@click.option("--split", "splits", multiple=True, type=click.Choice(["random", "popular", "adversarial"]),
              help="Which splits to write [all three].")
@click.option("--seed", default=0, show_default=True, type=int)
def pope_build(annotations, images, out, num_images, per_image, splits, seed):
    """Build POPE question files (random / popular / adversarial negatives) from COCO-format annotations.

    Each chosen image gets up to --per-image "yes" questions about objects it contains and as many "no" questions
    about objects it does not: random ones, the data set's most frequent ones, or the ones that co-occur most with
    what is present. Evaluate with `bonsai-mlx eval --task pope`.
    """
    from .evaluate import build_pope

    if num_images < 1 or per_image < 1:
        raise BonsaiError("--num-images and --per-image must be at least 1")
    paths = build_pope(annotations, out, images, num_images, per_image, seed, splits or ("random", "popular",
                                                                                          "adversarial"))
    for split, p in paths.items():
        n = sum(1 for _ in open(p))
        click.echo(f"{split}: {n} questions → {p}")


@cli.command()
@click.option("--out", default="bonsai-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the data, the student, the run, the plot and the results.")
@click.option("--steps", default=None, type=int, help="Training steps [900].")
@click.option("--train-vision/--no-train-vision", default=True, show_default=True,
              help="Also train the (pretrained) vision tower during SFT, at a tenth of the lr.")
@click.option("--vision-pretrain-steps", default=None, type=int,
              help="Steps of vision-tower pretraining on the train annotations before SFT; 0 skips it [300].")
@click.option("--train-images", default=None, type=int, help="Training images (one multi-turn record each) [10000].")
@click.option("--eval-questions", default=None, type=int, help="Held-out questions, equal shares per type [250].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for data, weights and data order.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
def demo(out, steps, train_vision, vision_pretrain_steps, train_images, eval_questions, seed, force):
    """Offline demo: teach a tiny random student to answer questions about coloured shapes (~4 min on 2 cores).

    Builds a synthetic visual-QA set and a pico student, scores the untrained student on held-out questions,
    pretrains its vision tower for a few seconds on the training images' annotations, trains it (SFT: LM in full,
    vision tower at a low lr), scores it again, prints a before/after table per question type with chance levels and
    95% intervals, writes the training curve (OUT/curves.png) and the results (OUT/demo.json), and answers one
    held-out image.
    """
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(out=out, train_vision=train_vision, seed=seed, force=force)
    if vision_pretrain_steps is not None:
        if vision_pretrain_steps < 0:
            raise BonsaiError(f"--vision-pretrain-steps must be >= 0, got {vision_pretrain_steps}")
        cfg.vision_pretrain_steps = vision_pretrain_steps
    for name, v in (("steps", steps), ("n_train", train_images), ("n_eval", eval_questions)):
        if v is not None:
            if v < 1:
                raise BonsaiError(f"--{name.replace('n_train', 'train-images').replace('n_eval', 'eval-questions')} "
                                  f"must be at least 1, got {v}")
            setattr(cfg, name, v)
    run_demo(cfg, echo=lambda m: click.echo(m, err=False))


def run_click(group) -> None:
    """Run a click group; a BonsaiError (a user mistake) becomes one line on stderr and exit code 1."""
    try:
        group(standalone_mode=False)
    except BonsaiError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


def main():
    run_click(cli)


if __name__ == "__main__":
    main()
