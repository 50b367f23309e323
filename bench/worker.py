"""Benchmark workers: run one in its own process, and measure its peak resident memory (no heavy imports)."""

import json
import os
import resource
import subprocess
import sys


def peak_rss_gb() -> float:
    """VmHWM where /proc has it: Linux's ru_maxrss carries the parent's peak across fork + exec, so a worker started
    by a benchmark that holds a real-size model would report that model's memory."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e9  # macOS: bytes


def run_worker(script: str, args: list, env=None) -> dict:
    """`python script --worker *args` in its own process; its last stdout line is its JSON result."""
    e = dict(os.environ, **(env or {}))
    r = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, env=e)
    if r.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
