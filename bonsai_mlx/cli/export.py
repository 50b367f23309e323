"""`bonsai-mlx fuse` (adapters merged into a new student) and `bonsai-mlx export` (to transformers / PEFT)."""

from __future__ import annotations

import click

from ..errors import BonsaiError
from ..units import DTYPE_NAMES


@click.command()
@click.option("--model", required=True, metavar="DIR_OR_ID", help="Base student the adapter was trained on.")
@click.option("--adapter", required=True, type=click.Path(), metavar="DIR", help="Training checkpoint directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New student directory.")
@click.option("--dequantize", is_flag=True, help="Write a quantized base LM back in full precision.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def fuse(model, adapter, out, dequantize, force):
    """Merge a checkpoint's LoRA adapters and projector into a new student directory."""
    from pathlib import Path

    from ..adapters import fuse_lora
    from ..hub import resolve
    from ..io import load, save_model

    p = Path(out)
    if p.exists() and any(p.iterdir()) and not force:
        raise BonsaiError(f"--out {out} exists and is not empty; pass --force to replace it")
    m, _ = load(model, adapter=adapter)
    fuse_lora(m, dequantize=dequantize)
    save_model(m, out, extra_files_from=resolve(model))
    click.echo(f"wrote fused student to {out}")


@click.command()
@click.option("--model", required=True, metavar="DIR_OR_ID", help="Student directory or hub id.")
@click.option("--adapter", default=None, type=click.Path(), metavar="DIR",
              help="Training checkpoint whose LoRA adapters and projector are fused in.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True,
              help="Weight dtype of the export.")
@click.option("--shard-size", default="2GB", show_default=True, help="Largest safetensors shard, e.g. 2GB, 500MB.")
@click.option("--peft", is_flag=True, help="Also write the adapters as a PEFT LoRA adapter in OUT/peft.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
def export(model, adapter, out, dtype, shard_size, peft, force):
    """Export to a transformers LlavaForConditionalGeneration directory (fusing an adapter if given).

    Same as `python convert/to_hf.py`. Loads with LlavaForConditionalGeneration.from_pretrained(OUT) and
    AutoProcessor.from_pretrained(OUT); no custom code.
    """
    from ..export.hf import export as run_export

    run_export(model, out, adapter=adapter, dtype=dtype, shard_size=shard_size, peft=peft, force=force)
    click.echo(f"exported to {out}")
