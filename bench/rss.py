"""Peak resident memory of the current process, for the benchmark workers (no heavy imports)."""

import resource


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
