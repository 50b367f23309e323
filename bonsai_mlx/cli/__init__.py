"""The `bonsai-mlx` command line: one small file per command (flags and printing only; the work lives in the
library), registered on one click group here.

Every subcommand turns a user mistake (missing file, bad checkpoint, offline hub) into one line on stderr and a
non-zero exit code; tracebacks are for bugs only. Importing this package imports neither mlx nor torch: each command
imports what it needs when it runs.
"""

from __future__ import annotations

import sys

import click

from ..errors import BonsaiError
from . import demo, eval, export, generate, info, init, serve, train


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


for _cmd in (init.init, init.forward, generate.generate, info.info, train.train, train.plot, export.fuse,
             export.export, info.doctor, eval.eval_cmd, eval.pope_build, demo.demo, serve.serve):
    cli.add_command(_cmd)


def run_click(group, args=None) -> None:
    """Run a click command or group; a BonsaiError (a user mistake) becomes one line on stderr and exit code 1."""
    try:
        group(args=args, standalone_mode=False)
    except BonsaiError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


def main(args=None):
    run_click(cli, args)
