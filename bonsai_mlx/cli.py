"""The `bonsai-mlx` command line.

Every subcommand turns a user mistake (missing file, bad checkpoint, offline hub) into one line on stderr and a
non-zero exit code; tracebacks are for bugs only.
"""

from __future__ import annotations

import sys
import time

import click

from .hub import BonsaiError


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
    from .model import load_model
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
    from .generate import list_images, load, stream_generate

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


def main():
    try:
        cli(standalone_mode=False)
    except BonsaiError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
