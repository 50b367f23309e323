"""`bonsai-mlx init` (assemble a student) and `bonsai-mlx forward` (a one-pass smoke test)."""

from __future__ import annotations

import click

from ..errors import BonsaiError
from ..units import DTYPE_NAMES


@click.command()
@click.option("--vision", metavar="ID_OR_DIR", help="SigLIP checkpoint (hub id or directory), e.g. google/siglip-base-patch16-224.")
@click.option("--language", metavar="ID_OR_DIR", help="Qwen2 checkpoint (hub id or directory), e.g. Qwen/Qwen2.5-0.5B-Instruct.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the student to.")
@click.option("--vision-feature-layer", default=-1, show_default=True, type=int,
              help="Which vision hidden state feeds the projector (-1: last layer, before post-layernorm).")
@click.option("--projector-act", type=click.Choice(["gelu_pytorch_tanh", "gelu"]), default="gelu_pytorch_tanh",
              show_default=True, help="The projector's GELU: the tanh approximation runs identically in transformers, "
                                      "vLLM and llama.cpp (whose mlp projector has no exact-erf GELU); 'gelu' is "
                                      "llava-hf's exact erf.")
@click.option("--pico", is_flag=True, help="Build a tiny random student offline instead (no checkpoints needed).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the projector (and pico) initialisation.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help="Cast all weights to this dtype (default: keep each backbone's dtype).")
@click.option("--force", is_flag=True, help="Replace --out if it already exists and is not empty.")
def init(vision, language, out, vision_feature_layer, projector_act, pico, seed, dtype, force):
    """Assemble a new student: SigLIP vision tower + fresh projector + Qwen2 LM, saved as a llava-hf directory.

    The directory loads in transformers as LlavaForConditionalGeneration and in bonsai-mlx everywhere a --model is
    asked for. The tokenizer gets the <image> token and the chat template.
    """
    from pathlib import Path

    p = Path(out)
    if p.exists() and any(p.iterdir()) and not force:
        raise BonsaiError(f"--out {out} exists and is not empty; pass --force to replace it or choose another path")
    import time

    t0 = time.perf_counter()
    if pico:
        if vision or language:
            raise BonsaiError("--pico builds a random tiny student; do not also pass --vision/--language")
        from ..pico import build_pico

        build_pico(out, seed=seed)
    else:
        if not (vision and language):
            raise BonsaiError("pass both --vision and --language (or --pico for a tiny offline student)")
        from ..assemble import assemble

        assemble(vision, language, out, vision_feature_layer=vision_feature_layer, seed=seed, dtype=dtype,
                 projector_hidden_act=projector_act)
    click.echo(f"wrote student to {out} in {time.perf_counter() - t0:.1f}s")


@click.command()
@click.option("--model", required=True, metavar="ID_OR_DIR", help="Student directory or hub id (llava-style).")
@click.option("--image", metavar="FILE", default=None, help="Image file; default: a generated test picture.")
@click.option("--prompt", default="What is in the picture?", show_default=True, help="User prompt.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the language model first.")
def forward(model, image, prompt, quantize):
    """Run one forward pass on an image + prompt and print the most likely next tokens (a smoke test)."""
    import time

    import mlx.core as mx
    import numpy as np
    from transformers import AutoTokenizer

    from ..hub import resolve
    from ..io import load_model
    from ..processing import ImageProcessor
    from ..prompting import build_generation_prompt

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
