"""`bonsai-mlx info` (a model's sizes) and `bonsai-mlx doctor` (this machine's speed and what it means)."""

from __future__ import annotations

import click


@click.command()
@click.option("--model", required=True, metavar="ID_OR_DIR", help="Student directory or hub id (llava-style).")
@click.option("--adapter", default=None, type=click.Path(), metavar="DIR", help="Also count a checkpoint's LoRA.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object.")
def info(model, adapter, as_json):
    """Parameters per component, bytes on disk and in memory at each precision, image tokens, context length."""
    import json

    from ..info import model_info

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


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as one JSON object.")
def doctor(as_json):
    """MLX version and device, the BLAS in use, measured GEMM / 4-bit GFLOP/s and memory bandwidth, and what they
    mean for speed (decode ceilings, prefill estimate for the 0.5 B language model)."""
    import json

    from ..doctor import advice, report

    r = report()
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"MLX {r['mlx']} on {r['device']} ({r['platform']})")
    click.echo(f"BLAS: {r['blas']}")
    click.echo(f"quantized kernel: {r['quantized_kernel']}")
    click.echo(f"transparent huge pages: {r['transparent_huge_pages']} (the LM's weights go to 2 MB pages where "
               "this is madvise or always)")
    click.echo(f"f32 GEMM {r['gemm_f32_gflops']:.1f} GFLOP/s | 4-bit matmul {r['q4_matmul_gflops']:.1f} GFLOP/s | "
               f"memory read {r['read_bandwidth_gbs']:.1f} GB/s")
    click.echo(f"Qwen2.5-0.5B decode ceiling: {r['decode_ceiling_f32_tok_s']:.1f} tok/s at float32, "
               f"{r['decode_ceiling_4bit_tok_s']:.1f} tok/s at 4 bits; prefill ~{r['prefill_estimate_f32_tok_s']:.0f} "
               "tok/s at float32 (GEMM-bound)")
    for line in advice(r):
        click.echo(f"advice: {line}")
