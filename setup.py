"""Builds bonsai-mlx's optional CPU extension (csrc/: the quantized matmul for MLX and the pip-BLAS shim) with CMake.

The extension is optional: on macOS nothing is built (Metal's kernels are the fast path), and where the build fails
(no C++ compiler, an MLX without its CMake files) the install still succeeds, with one line saying what is lost;
bonsai_mlx then runs MLX's own kernels (`bonsai-mlx doctor` says which are in use). BONSAI_NO_EXTENSION=1 skips it.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
HINT = ("bonsai-mlx: the CPU extension was not built ({why}); installing without it — 4-bit CPU inference uses MLX's "
        "scalar kernel and the BLAS must come from the system (apt install libopenblas0-pthread)")


class CMakeBuild(build_ext):
    def run(self):
        for ext in self.extensions:
            self.build_cmake(ext)

    def build_cmake(self, ext):
        if sys.platform != "linux" or os.environ.get("BONSAI_NO_EXTENSION"):
            return
        if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
            print(HINT.format(why="no C++ compiler"), file=sys.stderr)
            return
        out = Path(self.get_ext_fullpath(ext.name)).resolve().parent  # …/bonsai_mlx/cpu (in place for -e)
        build = Path(self.build_temp).resolve() / "cmake"
        build.mkdir(parents=True, exist_ok=True)
        cfg = [_cmake(), "-S", str(ROOT / "csrc"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
               f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}"]
        try:
            subprocess.run(cfg, check=True, capture_output=True, text=True)
            subprocess.run([_cmake(), "--build", str(build), "-j", str(os.cpu_count() or 1)], check=True,
                           capture_output=True, text=True)
        except (subprocess.CalledProcessError, OSError) as e:
            tail = (getattr(e, "stderr", None) or getattr(e, "stdout", None) or str(e)).strip().splitlines()
            print(HINT.format(why=tail[-1] if tail else "cmake failed"), file=sys.stderr)
            return
        # the MLX the extension was compiled against: bonsai_mlx/cpu/qmm.py refuses another one (its C++ ABI)
        import mlx.core as mx

        (out / "_qmm_build.txt").write_text(f"mlx {mx.__version__}\n")

    def get_ext_filename(self, name):
        return name.replace(".", os.sep) + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def _cmake():
    try:
        import cmake  # PyPI's cmake (≥ 3.24 is needed; Debian 12 has 3.25)

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return "cmake"


setup(ext_modules=[Extension("bonsai_mlx.cpu._qmm", sources=[])], cmdclass={"build_ext": CMakeBuild})
