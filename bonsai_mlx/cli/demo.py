"""`bonsai-mlx demo`: the offline shapes demo (`bonsai_mlx/demo.py`)."""

from __future__ import annotations

import click

from ..errors import BonsaiError


@click.command()
@click.option("--out", default="bonsai-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the data, the student, the run, the plot and the results.")
@click.option("--steps", default=None, type=int, help="Training steps [1500].")
@click.option("--train-vision/--no-train-vision", default=True, show_default=True,
              help="Also train the (pretrained) vision tower during SFT, at a tenth of the lr.")
@click.option("--vision-pretrain-steps", default=None, type=int,
              help="Steps of vision-tower pretraining on the train annotations before SFT; 0 skips it [300].")
@click.option("--train-images", default=None, type=int, help="Training images (one multi-turn record each) [10000].")
@click.option("--eval-questions", default=None, type=int, help="Held-out questions, equal shares per type [250].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for data, weights and data order.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
def demo(out, steps, train_vision, vision_pretrain_steps, train_images, eval_questions, seed, force):
    """Offline demo: teach a tiny random student to answer questions about coloured shapes (~5 min on 2 cores).

    Builds a synthetic visual-QA set and a pico student, scores the untrained student on held-out questions,
    pretrains its vision tower for a few seconds on the training images' annotations, trains it (SFT: LM in full,
    vision tower at a low lr), scores it again, prints a before/after table per question type with chance levels and
    95% intervals, writes the training curve (OUT/curves.png) and the results (OUT/demo.json), and answers one
    held-out image.
    """
    from ..demo import DemoConfig, run_demo

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
