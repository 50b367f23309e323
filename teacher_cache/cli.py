"""`python -m teacher_cache plan|build|verify` (PyTorch side; never imports mlx)."""

from __future__ import annotations

import click

from bonsai_mlx.errors import BonsaiError


def _layers(ctx, param, value):
    if value is None:
        return None
    try:
        out = [int(x) for x in value.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"expected layer numbers like '16 24 32', got {value!r}") from None
    if not out:
        raise click.BadParameter("give at least one layer")
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Precompute a LLaVA-1.5 teacher's hidden states, aligned to the bonsai student's tokens, for `train --phase hsd`.

    \b
    1. plan:   how many bytes a build writes (nothing heavy is loaded)
    2. build:  run the teacher, align, shard to CACHE_DIR (resumable; torchrun for several GPUs)
    3. verify: checksums, shapes, dtypes and index against the manifest
    """


@cli.command()
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="LLaVA-Instruct JSON.")
@click.option("--layers", required=True, callback=_layers, help="Teacher hidden-state indices, e.g. '16 32'.")
@click.option("--limit", type=int, default=None, help="Only the first N records.")
@click.option("--image-states", is_flag=True, help="Also store pooled image-token states.")
@click.option("--image-layers", callback=_layers, default=None, help="Layers for image states [--layers].")
@click.option("--dtype", type=click.Choice(["float16", "int8"]), default="float16", show_default=True)
@click.option("--student-tokenizer", default=None, help="Student dir/id: exact token counts (tokenizer only).")
@click.option("--teacher", default=None, help="Teacher dir/id: its tokenizer and config only (no weights).")
@click.option("--hidden-size", type=int, default=4096, show_default=True, help="Used when --teacher is not given.")
@click.option("--image-grid", type=int, default=14, show_default=True, help="Student grid side for image states.")
@click.option("--shard-size", default="1.9GB", show_default=True, help="As for build (shard headers count too).")
@click.option("--logits-topk", type=click.IntRange(min=0), default=0, show_default=True,
              help="As for build: the teacher's top-k log-probs and ids per aligned token (6 bytes each).")
def plan(data, layers, limit, image_states, image_layers, dtype, student_tokenizer, teacher, hidden_size, image_grid,
         shard_size, logits_topk):
    """Print records, expected tokens, bytes per sample and total bytes of a build, before anything is built."""
    from bonsai_mlx.units import parse_size

    from .planning import estimate

    r = estimate(data, layers, limit, image_states, image_layers, dtype, student_tokenizer, teacher, hidden_size,
                 image_grid, parse_size(shard_size), logits_topk=logits_topk)
    click.echo(_fmt(r))


def _size(n):
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt(r):
    gb = r["total_bytes"] / 1e9
    return (f"records: {r['records']} (usable {r['usable']}, skipped {r['skipped']})\n"
            f"aligned text tokens: {r['tokens']} ({r['tokens_method']}), {r['tokens'] / max(r['usable'], 1):.0f} per sample\n"
            f"layers: text {r['layers']}, image {r['image_layers']}; hidden size {r['hidden_size']}; {r['dtype']}\n"
            + (f"teacher logits: top {r['logits_topk']} per aligned token (float16 + int32)\n" if r["logits_topk"] else "")
            + f"bytes per sample: {_size(r['bytes_per_sample'])}\n"
            f"total: {r['total_bytes']:,d} bytes ({gb:.2f} GB) in ~{r['shards']} shard(s)")


@cli.command()
@click.option("--teacher", required=True, help="llava-hf teacher (llava-hf/llava-1.5-7b-hf or a directory).")
@click.option("--student-tokenizer", required=True, help="Student directory/id (tokenizer + config.json).")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="LLaVA-Instruct JSON.")
@click.option("--image-root", default=None, type=click.Path(file_okay=False), help="Folder of the images.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory (resumes if present).")
@click.option("--layers", required=True, callback=_layers, help="Teacher hidden-state indices, e.g. '32' or '16 32'.")
@click.option("--image-states", is_flag=True, help="Also store image-token states pooled to the student's grid.")
@click.option("--image-layers", callback=_layers, default=None, help="Layers for image states [--layers].")
@click.option("--limit", type=int, default=None, help="Only the first N records.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "int8"]), default="float16", show_default=True,
              help="Storage dtype (int8: per-row absmax scale).")
@click.option("--device", type=click.Choice(["cuda", "mps", "cpu"]), default=None, help="[cuda if available]")
@click.option("--torch-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Teacher compute dtype [bfloat16 on cuda, float32 on cpu].")
@click.option("--image-framing", type=click.Choice(["resize", "pad"]), default="resize", show_default=True,
              help="resize: stretched square as the student sees it; pad: LLaVA-1.5's training framing.")
@click.option("--shard-size", default="1.9GB", show_default=True, help="Largest shard, e.g. 1.9GB, 200MB.")
@click.option("--stats-tokens", type=int, default=200_000, show_default=True, help="Tokens for mean/std.")
@click.option("--student-image-tokens", type=int, default=None, help="[the student config's image_seq_length]")
@click.option("--logits-topk", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also store the teacher's top-K next-token log-probs and ids at every aligned token (for "
                   "`train --kd-weight`), and the teacher → student vocabulary map.")
def build(teacher, student_tokenizer, data, image_root, out, layers, image_states, image_layers, limit, batch_size,
          dtype, device, torch_dtype, image_framing, shard_size, stats_tokens, student_image_tokens, logits_topk):
    """Run the teacher and write the cache. Under `torchrun --nproc-per-node N`, rank r takes records r::N."""
    import torch

    from bonsai_mlx.units import parse_size

    from .build import BuildConfig
    from .build import build as run_build

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch_dtype is None:
        torch_dtype = "bfloat16" if device == "cuda" else "float32"
    cfg = BuildConfig(teacher=teacher, student_tokenizer=student_tokenizer, data=data, image_root=image_root, out=out,
                      layers=layers, image_states=image_states, image_layers=image_layers, limit=limit,
                      batch_size=batch_size, dtype=dtype, device=device, torch_dtype=torch_dtype,
                      image_framing=image_framing, shard_bytes=parse_size(shard_size), stats_tokens=stats_tokens,
                      student_image_tokens=student_image_tokens, logits_topk=logits_topk)
    run_build(cfg, log=lambda m: click.echo(m, err=True))


@cli.command()
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
def verify(cache_dir):
    """Check every shard's checksum, shapes, dtypes and the index against the manifest."""
    from .format import read_manifest
    from .format import verify as run_verify

    problems = run_verify(cache_dir)
    if problems:
        for p in problems[:20]:
            click.echo(f"FAIL {p}", err=True)
        raise BonsaiError(f"{cache_dir}: {len(problems)} problem(s)")
    m = read_manifest(cache_dir)
    click.echo(f"ok: {m['num_samples']} samples in {len(m['shards'])} shards, layers {m['layers']}, "
               f"coverage {m['coverage']:.3f}")


def main():
    from bonsai_mlx.cli import run_click  # click + stdlib only; no mlx

    run_click(cli)
