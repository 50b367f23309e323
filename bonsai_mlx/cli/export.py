"""`bonsai-mlx fuse` (adapters merged into a new student) and `bonsai-mlx export` (to transformers / PEFT)."""

from __future__ import annotations

import click

from ..errors import BonsaiError
from ..units import DTYPE_NAMES

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")  # export/gguf.py TYPES (not imported: the CLI loads no exporter until run)


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
    m, _ = load(model, adapter=adapter, pack=False)  # export reads the weights back: MLX layout
    fuse_lora(m, dequantize=dequantize)
    save_model(m, out, extra_files_from=resolve(model))
    click.echo(f"wrote fused student to {out}")


@click.command()
@click.option("--model", required=True, metavar="DIR_OR_ID", help="Student directory or hub id.")
@click.option("--adapter", default=None, type=click.Path(), metavar="DIR",
              help="Training checkpoint whose LoRA adapters and projector are fused in.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), default="hf", show_default=True,
              help="hf: a transformers LlavaForConditionalGeneration directory; gguf: llama.cpp's text GGUF + "
                   "mmproj GGUF.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help="(hf) Weight dtype of the export [default: float32].")
@click.option("--shard-size", default=None, help="(hf) Largest safetensors shard, e.g. 2GB, 500MB [default: 2GB].")
@click.option("--peft", is_flag=True, help="(hf) Also write the adapters as a PEFT LoRA adapter in OUT/peft.")
@click.option("--type", "type_", type=click.Choice(GGUF_TYPES), default=None,
              help="(gguf) What the text GGUF stores: f16, q8_0, q4_0 (head Q8_0), or f32 (exact, for checking) "
                   "[default: f16]; the mmproj is F16 (F32 with f32).")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
def export(model, adapter, out, fmt, dtype, shard_size, peft, type_, force):
    """Export to transformers (default) or llama.cpp GGUF, fusing an adapter if given.

    --format hf: same as `python convert/to_hf.py`; loads with LlavaForConditionalGeneration.from_pretrained(OUT)
    and AutoProcessor.from_pretrained(OUT), no custom code. --format gguf: same as `python convert/to_gguf.py`;
    runs with llama.cpp's llama-mtmd-cli / llama-server (-m OUT/NAME-TYPE.gguf --mmproj OUT/mmproj-NAME-F16.gguf).
    """
    if fmt == "gguf":
        wrong = [n for n, v in (("--dtype", dtype), ("--shard-size", shard_size), ("--peft", peft)) if v]
        if wrong:
            raise BonsaiError(f"{', '.join(wrong)} apply to --format hf only (a GGUF export takes --type)")
        _gguf(model, adapter, out, type_ or "f16", force)
        return
    if type_ is not None:
        raise BonsaiError("--type applies to --format gguf only (an hf export takes --dtype)")
    from ..export.hf import export as run_export

    run_export(model, out, adapter=adapter, dtype=dtype or "float32", shard_size=shard_size or "2GB", peft=peft,
               force=force)
    click.echo(f"exported to {out}")


def _gguf(model, adapter, out, type_, force):
    from ..export.gguf import export_gguf

    files = export_gguf(model, out, adapter=adapter, type_=type_, force=force, log=lambda m: click.echo(m, err=True))
    click.echo(f"exported to {files['model']} and {files['mmproj']}")


@click.command()
@click.option("--model", required=True, metavar="DIR_OR_ID", help="Student directory or hub id.")
@click.option("--adapter", default=None, type=click.Path(), metavar="DIR",
              help="Training checkpoint whose LoRA adapters and projector are fused in.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--type", "type_", type=click.Choice(GGUF_TYPES), default="f16", show_default=True,
              help="What the text GGUF stores: f16, q8_0, q4_0 (the output head Q8_0), or f32 (exact, for checking); "
                   "the mmproj is F16 (F32 with f32).")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
def export_gguf(model, adapter, out, type_, force):
    """Export to llama.cpp: OUT/NAME-TYPE.gguf (qwen2) and OUT/mmproj-NAME-F16.gguf (SigLIP + mlp projector).

    Same as `bonsai-mlx export --format gguf`. Run with llama.cpp's `llama-mtmd-cli -m OUT/NAME-TYPE.gguf
    --mmproj OUT/mmproj-NAME-F16.gguf --image x.png -p "..."` or `llama-server` with the same two flags.
    """
    _gguf(model, adapter, out, type_, force)
