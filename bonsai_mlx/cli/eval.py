"""`bonsai-mlx eval` (loss, vqa, pope; the work is `bonsai_mlx/evaluate/run.py`) and `bonsai-mlx pope-build`."""

from __future__ import annotations

import click

from ..errors import BonsaiError


@click.command(name="eval")
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
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the language model on load. On a CPU with bonsai's kernel (`bonsai-mlx doctor`) 4 is the "
                   "fastest decode and a quarter of float32's memory; without it, 4-bit only saves memory.")
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
    from ..evaluate.run import result_lines, run_eval

    res = run_eval(model, task, data, adapter=adapter, image_root=image_root, limit=limit, max_tokens=max_tokens,
                   batch_size=batch_size, quantize=int(quantize) if quantize else None, system=system, out=out)
    for line in result_lines(res):
        click.echo(line)
    if out:
        click.echo(f"wrote {out}")


@click.command(name="pope-build")
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
    from ..evaluate.pope import build_pope

    if num_images < 1 or per_image < 1:
        raise BonsaiError("--num-images and --per-image must be at least 1")
    paths = build_pope(annotations, out, images, num_images, per_image, seed, splits or ("random", "popular",
                                                                                          "adversarial"))
    for split, p in paths.items():
        n = sum(1 for _ in open(p))
        click.echo(f"{split}: {n} questions → {p}")
