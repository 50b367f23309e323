"""The decode step's one-op CPU RMSNorm, RoPE, attention and SwiGLU (csrc/fused.cpp, bonsai_mlx/cpu/fused.py): MLX's results
(RoPE: the exact rotation), used by generate's decode steps only, and the student's greedy ids unchanged."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import build_llava

from bonsai_mlx.cpu import fused, qmm
from bonsai_mlx.cpu.decode import decoding

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the extension is built on Linux only (Metal on macOS)")


def _rope_reference(x, offset, base, scale, traditional):
    """The rotation in float64: theta = scale · position · base^(-i / (D/2))."""
    xn = np.asarray(x, np.float64)
    h = xn.shape[-1] // 2
    pos = scale * (offset + np.arange(xn.shape[-2]))
    th = pos[:, None] * base ** (-np.arange(h) / h)
    c, s = np.cos(th), np.sin(th)
    if traditional:
        a, b = xn[..., 0::2], xn[..., 1::2]
        y = np.empty_like(xn)
        y[..., 0::2], y[..., 1::2] = a * c - b * s, a * s + b * c
        return y
    a, b = xn[..., :h], xn[..., h:]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def test_outside_decoding_they_do_not_apply():
    x = mx.random.normal((1, 1, 64))
    assert fused.rms_norm(x, mx.ones((64,)), 1e-6) is None  # no decoding(): the caller runs MLX's op
    with decoding():
        assert fused.rms_norm(x.astype(mx.bfloat16), mx.ones((64,), mx.bfloat16), 1e-6) is None  # float32 only
        assert fused.rope(x[None], nn.RoPE(32), 0) is None  # dims != head size
        q = mx.random.normal((1, 4, 2, 16))
        assert fused.attend_one(q, q, q, 0.25) is None  # two queries


def test_rms_norm_equals_mlx():
    with decoding():
        for shape in [(1, 1, 896), (3, 64), (2, 5, 96)]:
            x, w = mx.random.normal(shape), mx.random.normal(shape[-1:])
            got, want = fused.rms_norm(x, w, 1e-6), mx.fast.rms_norm(x, w, 1e-6)
            assert got.shape == want.shape and float(mx.abs(got - want).max()) <= 1e-5 * float(mx.abs(want).max())
        x = mx.random.normal((8, 128)).T  # a transposed view
        w = mx.random.normal((8,))
        assert float(mx.abs(fused.rms_norm(x, w, 1e-5) - mx.fast.rms_norm(x, w, 1e-5)).max()) <= 1e-5 * 10


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_is_the_exact_rotation_and_matches_mlx(traditional):
    with decoding():
        for shape, offset, base, scale in [((1, 14, 1, 64), 0, 1e6, 1.0), ((1, 14, 1, 64), 287, 1e6, 1.0),
                                           ((2, 2, 1, 64), 2047, 1e4, 1.0), ((1, 3, 5, 32), 9, 1e4, 0.5)]:
            x = mx.random.normal(shape)
            rope = nn.RoPE(shape[-1], traditional=traditional, base=base, scale=scale)
            got = fused.rope(x, rope, offset)
            ref = _rope_reference(x, offset, base, scale, traditional)
            assert np.abs(np.asarray(got) - ref).max() <= 1e-6 * np.abs(ref).max() + 1e-6, (shape, offset)
            # MLX's float32 angles are off by ~1e-4 at position 2,000 (ours are exact): the same up to that
            assert float(mx.abs(got - rope(x, offset=offset)).max()) <= 3e-4, (shape, offset)


def test_attend_one_equals_mlx_on_a_cache_view():
    with decoding():
        for h, hk, s in [(14, 2, 251), (4, 4, 1), (8, 2, 37)]:
            q = mx.random.normal((1, h, 1, 64))
            k = mx.random.normal((1, hk, 256, 64))[:, :, :s]  # the KV cache's view of its buffer
            v = mx.random.normal((1, hk, 256, 64))[:, :, :s]
            got = fused.attend_one(q, k, v, 0.125)
            want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)
            assert got.shape == want.shape and float(mx.abs(got - want).max()) <= 1e-5, (h, hk, s)


def test_swiglu_equals_mlx():
    with decoding():
        g, u = mx.random.normal((1, 1, 4864)) * 4, mx.random.normal((1, 1, 4864))
        want = nn.silu(g) * u
        assert float(mx.abs(fused.swiglu(g, u) - want).max()) <= 1e-6 * float(mx.abs(want).max())
        assert fused.swiglu(g, u[..., :8]) is None  # shapes differ: MLX's broadcasting ops instead


def test_generate_uses_them_and_keeps_the_greedy_ids(tmp_path, tokenizer, monkeypatch):
    from bonsai_mlx.generate import generate
    from bonsai_mlx.io import load

    d, _ = build_llava(tmp_path / "m", tokenizer, seed=5, noise=0.3)
    model, processor = load(d)
    ext = qmm.extension()
    calls = []

    class Recording:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ext, name)

    monkeypatch.setattr(qmm, "extension", lambda: Recording())
    prompts = ["Describe it.", "What is the answer to this long question about colours and shapes?"]
    with_fused = [generate(model, processor, p, max_tokens=12).token_ids for p in prompts]
    assert {"rms_norm", "rope", "attend_one", "swiglu"} <= set(calls)
    monkeypatch.setattr(qmm, "extension", lambda: None)  # unavailable: MLX's ops
    without = [generate(model, processor, p, max_tokens=12).token_ids for p in prompts]
    assert with_fused == without and all(len(t) == 12 for t in with_fused)
