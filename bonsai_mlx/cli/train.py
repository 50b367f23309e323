"""`bonsai-mlx train` (flags → `train.config.resolve_config` → `train.trainer.Trainer`) and `bonsai-mlx plot`.

Help texts take their defaults from `TrainConfig` (one place for every default)."""

from __future__ import annotations

import click

from ..train.config import PROJECTOR_LR
from ..train.config import default as _d
from ..units import DTYPE_NAMES


@click.command()
@click.option("--phase", type=click.Choice(["pretrain", "sft", "hsd"]), default=None,
              help="pretrain: the projector alone on caption data (LLaVA's stage 1); sft: cross-entropy on answers "
                   "(LoRA + projector); hsd: plus hidden-state distillation from a teacher cache [sft].")
@click.option("--model", metavar="DIR_OR_ID", default=None, help="Student to train (from `bonsai-mlx init`).")
@click.option("--data", metavar="JSON", default=None, help="LLaVA-Instruct JSON (list of records) or JSONL.")
@click.option("--image-root", metavar="DIR", default=None, help="Folder the records' `image` paths are relative to.")
@click.option("--out", metavar="RUN_DIR", default=None, help="Run directory: checkpoint/, metrics.jsonl, config.json.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML file with any of these options (keys like batch_size or batch-size); flags override it.")
@click.option("--limit", type=int, default=None, help="Train on the first N records of --data only [all].")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps to train (default: one epoch).")
@click.option("--epochs", type=float, default=None, help="Epochs to train instead of --max-steps.")
@click.option("--batch-size", type=int, default=None, help=f"Sequences per micro-batch [{_d('batch_size')}].")
@click.option("--grad-accum", type=int, default=None, help=f"Micro-batches per optimizer step [{_d('grad_accum')}].")
@click.option("--lr", type=float, default=None, help=f"Peak learning rate of the LoRA adapters [{_d('lr')}].")
@click.option("--lr-projector", type=float, default=None,
              help=f"Peak learning rate of the projector [{PROJECTOR_LR['sft']}; {PROJECTOR_LR['pretrain']} in "
                   "--phase pretrain].")
@click.option("--projector-from", metavar="RUN_DIR", default=None,
              help="Start from the projector of this run's checkpoint (e.g. a --phase pretrain run) instead of the "
                   "model's own.")
@click.option("--warmup", type=float, default=None, help=f"Warmup as a ratio of the total steps [{_d('warmup')}].")
@click.option("--weight-decay", type=float, default=None, help=f"AdamW weight decay [{_d('weight_decay')}].")
@click.option("--lora-rank", type=int, default=None, help=f"LoRA rank r [{_d('lora_rank')}].")
@click.option("--lora-alpha", type=float, default=None, help=f"LoRA alpha; the update is scaled by alpha/r [{_d('lora_alpha')}].")
@click.option("--lora-dropout", type=float, default=None, help=f"LoRA dropout [{_d('lora_dropout')}].")
@click.option("--train-lm", type=click.Choice(["lora", "full"]), default=None,
              help="lora: adapters on the frozen base [default]; full: train every LM weight (needs --quantize none).")
@click.option("--train-vision/--no-train-vision", default=None,
              help="Also train the vision tower (at --lr-vision); for tasks the frozen tower cannot see [off].")
@click.option("--lr-vision", type=float, default=None, help=f"Peak learning rate of the vision tower [{_d('lr_vision')}].")
@click.option("--warmup-vision", type=float, default=None,
              help="Warmup ratio of the vision tower's learning rate [--warmup]; a later start keeps a random tower "
                   "from collapsing while the LM learns to look.")
@click.option("--quantize", type=click.Choice(["4", "8", "none"]), default=None,
              help=f"Precision of the frozen base LM [{_d('quantize')}] (QLoRA); none keeps it in --dtype.")
@click.option("--max-seq-len", type=int, default=None, help=f"Truncate sequences to this many tokens [{_d('max_seq_len')}].")
@click.option("--eval-data", metavar="JSON", default=None, help="Held-out JSON for the eval loss.")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N steps (and at the end).")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps (always at the end).")
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR/checkpoint (exactly: same losses as unbroken).")
@click.option("--seed", type=int, default=None, help=f"Seed for data order, LoRA init and dropout [{_d('seed')}].")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help=f"Compute dtype of the non-quantized weights [{_d('dtype')}; bfloat16 suits Apple GPUs].")
@click.option("--data-cache", metavar="DIR", default=None,
              help="Folder of the prepared-data cache (tokenized samples keyed by the data file's and the tokenizer's "
                   "sha256, …) [$BONSAI_MLX_CACHE/prepared, else ~/.cache/bonsai-mlx/prepared].")
@click.option("--strict/--no-strict", default=None, help="Stop at the first bad record instead of skipping it.")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help="Recompute LM blocks in backward.")
@click.option("--compile/--no-compile", "compile_", default=None, help="mx.compile the training step [on].")
@click.option("--teacher-cache", metavar="CACHE_DIR", default=None,
              help="hsd: teacher hidden states from `python -m teacher_cache build`.")
@click.option("--alpha", type=float, default=None, help=f"hsd: loss = (1-alpha)·CE + alpha·distillation [{_d('alpha')}].")
@click.option("--image-weight", type=float, default=None, help=f"hsd: weight of L_img inside the distillation [{_d('image_weight')}].")
@click.option("--text-layers", metavar="S:T,…", default=None,
              help="hsd: student:teacher hidden-state pairs for L_text [student last : cache's deepest].")
@click.option("--image-layer", metavar="S:T", default=None,
              help="hsd: student:teacher pair for L_img [cache's image layer at the same relative depth].")
@click.option("--lr-align", type=float, default=None, help=f"hsd: learning rate of the alignment projectors [{_d('lr_align')}].")
@click.option("--standardize/--no-standardize", default=None,
              help="hsd: standardize teacher states per channel with the cache's mean/std [on]; off: raw states.")
@click.option("--kd-weight", type=float, default=None,
              help=f"hsd: + kd_weight·L_kd, the teacher's next-token distribution at the aligned tokens (a cache built "
                   f"with --logits-topk) [{_d('kd_weight')}].")
@click.option("--kd-loss", type=click.Choice(["uld", "mapped"]), default=None,
              help=f"hsd: uld (sorted probabilities, no vocabulary map) or mapped (KL over the teacher tokens whose "
                   f"string is one student token) [{_d('kd_loss')}].")
def train(config_file, resume, compile_, **opts):
    """Train the student: projector pretraining on captions, QLoRA SFT on LLaVA-Instruct-format data, or HSD with a
    teacher cache.

    \b
    Example:
      bonsai-mlx train --phase pretrain --model bonsai --data blip_laion_cc_sbu_558k.json \\
          --image-root LLaVA-Pretrain/images --out runs/pretrain --batch-size 32
      bonsai-mlx train --phase sft --model bonsai --data llava_v1_5_mix665k.json --image-root data \\
          --projector-from runs/pretrain --out runs/sft --max-steps 2000 --batch-size 4 --grad-accum 4
      bonsai-mlx train --phase hsd --teacher-cache cache/ --alpha 0.5 --model bonsai --data … --out runs/hsd
      bonsai-mlx train --phase hsd --teacher-cache cache/ --alpha 0.3 --kd-weight 0.5 --kd-loss uld …

    Bad records are skipped and counted (reported at the start and the end); progress shows loss, supervised
    tokens/s, learning rate and ETA; RUN_DIR/metrics.jsonl logs every step (`bonsai-mlx plot RUN_DIR` draws it).
    """
    from ..train.config import resolve_config
    from ..train.trainer import Trainer

    if compile_ is not None:
        opts["compile"] = compile_
    cfg = resolve_config(opts, config_file, resume)
    Trainer(cfg, resume=resume, log=lambda m: click.echo(m, err=True)).train()


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="PNG path [RUN_DIR/curves.png].")
def plot(run_dir, out):
    """Draw a run's metrics.jsonl (train and eval loss, learning rate, tokens/s) as a PNG."""
    from ..plotting import plot_metrics

    path = plot_metrics(run_dir, out)
    click.echo(f"wrote {path}")
