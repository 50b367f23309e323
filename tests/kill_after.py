"""Test helper: run `bonsai-mlx ARGS…` and SIGKILL the process right after optimizer step N (on every rank), as a
preempted job dies: no clean shutdown, only what the last checkpoint holds survives.

    python tests/kill_after.py N train --out RUN …
"""

import bonsai_mlx  # noqa: F401  (first: on Linux it loads OpenBLAS before mlx.core)

# isort: split
import os
import signal
import sys

from bonsai_mlx.train import trainer


def main():
    n = int(sys.argv[1])
    init = trainer.Trainer.__init__

    def with_kill(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.on_step.append(lambda t, rec: t.step == n and os.kill(os.getpid(), signal.SIGKILL))

    trainer.Trainer.__init__ = with_kill
    from bonsai_mlx.cli import main as cli_main

    cli_main(sys.argv[2:])


if __name__ == "__main__":
    main()
