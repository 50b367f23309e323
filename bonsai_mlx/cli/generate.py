"""`bonsai-mlx generate`: the generation engine (`bonsai_mlx/generate.py`) on the command line."""

from __future__ import annotations

import click

from ..errors import BonsaiError


@click.command()
@click.option("--model", required=True, metavar="ID_OR_DIR", help="Student directory or hub id (llava-style).")
@click.option("--image", metavar="FILE|URL|DIR", default=None,
              help="Image file or http(s) URL; a directory answers the prompt for every image in it (JSON lines).")
@click.option("--prompt", required=True, help="User prompt.")
@click.option("--system", default=None, help="System prompt (default: the chat template's).")
@click.option("--max-tokens", default=256, show_default=True, type=int, help="Most new tokens to generate.")
@click.option("--temp", default=0.0, show_default=True, type=float, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling mass in (0, 1].")
@click.option("--top-k", default=0, show_default=True, type=int, help="Sample from the k most likely tokens; 0: off.")
@click.option("--seed", default=None, type=int, help="Random seed for sampling.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the language model on load. On a CPU with bonsai's kernel (`bonsai-mlx doctor`) 4 is the "
                   "fastest decode and a quarter of float32's memory; without it, 4-bit only saves memory.")
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
    import sys

    from ..generate import check_image_arg, check_sampling, generate_folder, stream_generate
    from ..generate import generate as run_generate
    from ..io import load

    if not prompt.strip():
        raise BonsaiError("--prompt is empty")
    check_sampling(max_tokens, temp, top_p, top_k)
    folder = check_image_arg(image)
    m, processor = load(model, quantize=int(quantize) if quantize else None, adapter=adapter)
    kw = dict(system=system, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, seed=seed)
    if folder is not None:
        failed = 0
        for line in generate_folder(m, processor, prompt, folder, **kw):
            failed += "error" in line
            click.echo(json.dumps(line, ensure_ascii=False))
        click.echo(f"{len(folder)} images, {failed} failed", err=True)
        return
    if as_json:
        r = run_generate(m, processor, prompt, image=image, **kw)
        click.echo(json.dumps({"image": image, **r.to_json()}, ensure_ascii=False))
        return
    result = None
    for segment, item in stream_generate(m, processor, prompt, image=image, **kw):
        if segment is None:
            result = item
        else:
            click.echo(segment, nl=False)
            sys.stdout.flush()
    click.echo()
    click.echo(result.stats_line(), err=True)
