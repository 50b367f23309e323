"""The optimized BLAS that bonsai_mlx loads before MLX changes speed, not results."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import build_llava, image_token_id

from bonsai_mlx.cpu import blas as _blas

CODE = r"""
import sys, numpy as np
import bonsai_mlx, bonsai_mlx.cpu.blas as b
import mlx.core as mx
from bonsai_mlx.io import load_model
m = load_model(sys.argv[1])
ids = mx.array(np.load(sys.argv[2]))
pix = mx.array(np.load(sys.argv[3]))
np.save(sys.argv[4], np.array(m(ids, pix)))
print(b.status)
"""


def test_blas_loading_changes_no_results(tmp_path, tokenizer):
    """The pip BLAS (scipy-openblas32 through the shim, the default) and a system OpenBLAS where one is installed
    give the reference BLAS's logits."""
    if sys.platform != "linux":
        pytest.skip("the BLAS loader only acts on Linux")
    found = [p.format(arch=_blas._arch()) for p in _blas.CANDIDATES if os.path.exists(p.format(arch=_blas._arch()))]
    d, _ = build_llava(tmp_path / "m", tokenizer, hidden_size=128, intermediate_size=256)  # GEMM-sized enough
    rng = np.random.default_rng(0)
    ids = np.array([[3, 4] + [image_token_id(tokenizer)] * 16 + list(rng.integers(3, 300, 40))], np.int32)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "pix.npy", rng.standard_normal((1, 32, 32, 3)).astype(np.float32))
    outs = {}
    for mode in ("default", "pip", "none") + (("system",) if found else ()):
        env = dict(os.environ)
        env.pop("BONSAI_BLAS", None)
        if mode != "default":
            env["BONSAI_BLAS"] = mode
        r = subprocess.run([sys.executable, "-c", CODE, str(d), str(tmp_path / "ids.npy"), str(tmp_path / "pix.npy"),
                            str(tmp_path / f"{mode}.npy")], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[mode] = (np.load(tmp_path / f"{mode}.npy"), r.stdout.strip().splitlines()[-1])
    assert "scipy-openblas32, pip" in outs["default"][1] and outs["pip"][1] == outs["default"][1]
    assert outs["none"][1].startswith("disabled")
    if found:
        assert outs["system"][1] == f"loaded {found[0]}"
    for mode in outs:
        assert np.abs(outs[mode][0] - outs["none"][0]).max() <= 1e-5, mode
