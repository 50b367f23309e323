"""Load an optimized BLAS before MLX on Linux.

The Linux `mlx[cpu]` wheel bundles netlib's reference BLAS (f32 GEMM ~3-6 GFLOP/s on a 2-core EPYC). Loading an
optimized BLAS with RTLD_GLOBAL *before* `mlx.core` is first imported makes MLX's BLAS calls resolve to it
(~150-230 GFLOP/s there, same results within fp tolerance). macOS is untouched (Accelerate / Metal).

Which BLAS: PyPI's OpenBLAS (`scipy-openblas32`, a dependency on Linux) through the shim the CPU extension builds
(csrc/blas_shim.c: MLX calls `cblas_sgemm`, that wheel exports `scipy_cblas_sgemm`), so `pip install` alone gives the
fast GEMM; else a system OpenBLAS (Debian's libopenblas0-pthread, …). `BONSAI_BLAS=pip` / `system` picks one of the
two, `BONSAI_BLAS=/path/to/libopenblas.so.0` a library, `BONSAI_BLAS=none` turns this off.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys
from functools import lru_cache

CANDIDATES = [
    # Debian / Ubuntu (libopenblas0-pthread, libopenblas0-openmp, libopenblas0)
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
    # Fedora / RHEL (openblas-threads, openblas)
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    # Arch, Alpine and source installs
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
]
HINT = (
    "bonsai-mlx: no optimized BLAS found, MLX's CPU matmuls use the slow reference BLAS (~50x slower). "
    "Reinstall bonsai-mlx where a C compiler is available (its BLAS shim loads pip's scipy-openblas32), or install "
    "one (Debian/Ubuntu: apt install libopenblas0-pthread; Fedora: dnf install openblas-threads), or set "
    "BONSAI_BLAS=/path/to/libopenblas.so.0; BONSAI_BLAS=none silences this."
)
SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libbonsai_blas.so")

loaded = None  # path of the library loaded, or None
status = "not attempted"


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "x86_64", "AMD64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(m, m)


def maybe_load() -> None:
    global loaded, status
    if status != "not attempted":
        return
    if sys.platform != "linux":
        status = "not needed (not Linux)"
        return
    choice = os.environ.get("BONSAI_BLAS", "").strip()
    if choice.lower() == "none":
        status = "disabled (BONSAI_BLAS=none)"
        return
    if importlib.util.find_spec("mlx") is None:
        status = "mlx not installed"  # e.g. the teacher tool on a CUDA box: leave the process alone
        return
    if "mlx.core" in sys.modules:
        status = "too late: mlx.core was imported before bonsai_mlx"
        return
    if choice.lower() in ("", "pip") and _load_pip():
        return
    if choice.lower() == "pip":
        print(f"bonsai-mlx: BONSAI_BLAS=pip: {status}; using MLX's bundled reference BLAS", file=sys.stderr)
        return
    system = choice.lower() in ("", "system")
    paths = [p.format(arch=_arch()) for p in CANDIDATES] if system else [choice]
    for p in paths:
        if os.path.exists(p):
            try:
                ctypes.CDLL(p, mode=os.RTLD_GLOBAL)
            except OSError as e:
                status = f"failed to load {p}: {e}"
                continue
            loaded, status = p, f"loaded {p}"
            return
    if choice.lower() == "system":
        choice = "system (no OpenBLAS in " + ", ".join(paths) + ")"
    if choice:
        print(f"bonsai-mlx: BONSAI_BLAS={choice} does not exist; using MLX's bundled reference BLAS", file=sys.stderr)
        status = f"BONSAI_BLAS={choice} not found"
        return
    status = "none found"
    print(HINT, file=sys.stderr)


def _load_pip() -> bool:
    """PyPI's OpenBLAS, then the shim that gives its symbols MLX's names (both RTLD_GLOBAL)."""
    global loaded, status
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        status = "scipy-openblas32 is not installed"
        return False
    lib = os.path.join(list(spec.submodule_search_locations)[0], "lib", "libscipy_openblas.so")
    if not os.path.exists(SHIM):
        status = "the BLAS shim was not built (reinstall bonsai-mlx with a C compiler)"
        return False
    try:
        ctypes.CDLL(lib, mode=os.RTLD_GLOBAL)
        ctypes.CDLL(SHIM, mode=os.RTLD_GLOBAL)
    except OSError as e:
        status = f"failed to load scipy-openblas32: {e}"
        return False
    loaded, status = SHIM, f"loaded {lib} (scipy-openblas32, pip) through {os.path.basename(SHIM)}"
    return True


def set_threads(n: int) -> bool:
    """Set the loaded OpenBLAS's thread count (`openblas_set_num_threads`); False when no OpenBLAS was loaded.

    Tiny models (the demo's pico student) run faster on one BLAS thread: their many small batched products pay
    OpenBLAS's thread hand-off on every call (`python bench/pico_train_step.py`: a demo training step 0.149 s with
    1 thread, 0.172 s with 2)."""
    if not loaded:
        return False
    try:
        ctypes.CDLL(loaded).openblas_set_num_threads(int(n))
    except (OSError, AttributeError):
        return False
    return True


@lru_cache(maxsize=1)
def sgemv():
    """The loaded BLAS's `cblas_sgemv` as a ctypes function (row-major call), or None when no BLAS was loaded. MLX
    itself only calls sgemm; the decode path (decode.py) calls this for one-row products."""
    if not loaded:
        return None
    try:
        f = ctypes.CDLL(loaded).cblas_sgemv
    except (OSError, AttributeError):
        return None
    f.restype = None
    i, p = ctypes.c_int, ctypes.c_void_p
    f.argtypes = [i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
    return f
