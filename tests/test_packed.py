"""4-bit weights packed into 16-row tiles at load (csrc/packed.h, bonsai_mlx/cpu/pages.py) and the LM's weights in
2 MB pages: the same products, gradients, rows and greedy ids as MLX's layout; only inference packs."""

import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_llava
from test_qmm import REL, _close, _close_kernel, _int8_bound

from bonsai_mlx.cpu import pages, qmm

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the extension is built on Linux only (Metal on macOS)"),
    pytest.mark.skipif(not (qmm.available() and qmm.extension().packed_kernel()),
                       reason="packed tiles need the AVX-512 VNNI kernel (other CPUs keep MLX's layout)"),
]


def _packed(rng, n, k, group_size):
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32))
    wq, s, b = mx.quantize(w, group_size=group_size, bits=4)
    ext = qmm.extension()
    arena = ext.PageArena(ext.PageArena.packed_bytes(n, k, group_size))
    pw, ps, pb = arena.place_packed(wq, s, b, group_size)
    assert pw.shape == ((n + 15) // 16, 8 * k) and ps.shape == pb.shape == ((n + 15) // 16, k // group_size, 16)
    return (wq, s, b), (pw, ps, pb), mx.dequantize(wq, s, b, group_size=group_size, bits=4)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_packed_product_equals_mlx(group_size):
    """Every row count on the tile kernel (int8 activations: decode, a batch and a prompt alike), K not a multiple of
    256, N not a multiple of 16 (a partial last tile), batched and non-contiguous inputs: within the int8 bound of
    test_qmm (for every output), and below the crossover the same result as the row layout's int8 kernel to float
    rounding (the same arithmetic, another summation order)."""
    rng = np.random.default_rng(group_size)
    for rows, n, k in [(1, 301, 384), (2, 77, 640), (3, 130, 896), (4, 16, 384), (5, 3, 416), (7, 64, 384),
                       (9, 301, 384), (17, 45, 384), (64, 77, 1152), (300, 45, 384)]:
        if k % group_size:
            continue
        mlx_layout, tiles, wd = _packed(rng, n, k, group_size)
        x = mx.array(rng.standard_normal((rows, k)).astype(np.float32))
        got = qmm.quantized_matmul(x, *tiles, group_size, 4, packed_n=n)
        assert got.shape == (rows, n) and got.dtype == mx.float32
        assert _within_int8(got, x, wd), (rows, n, k)
        if rows < qmm.int8_rows():
            row_layout = qmm.quantized_matmul(x, *mlx_layout, group_size, 4)
            assert float(mx.abs(got - row_layout).max()) <= 1e-5 * float(mx.abs(row_layout).max()), (rows, n, k)
        xb = mx.array(rng.standard_normal((2, k, rows)).astype(np.float32)).swapaxes(1, 2)  # [2, rows, k] view
        assert _within_int8(qmm.quantized_matmul(xb, *tiles, group_size, 4, packed_n=n), xb, wd)
        xs = mx.array(rng.standard_normal((rows, 2 * k)).astype(np.float32))[:, ::2]
        assert _within_int8(qmm.quantized_matmul(xs, *tiles, group_size, 4, packed_n=n), xs, wd)
        got = qmm.quantized_matmul(x, *tiles, group_size, 4, decode=True, packed_n=n)  # the server's batches
        assert _within_int8(got, x, wd), (rows, n, k)
    # with exact activations (BONSAI_QMM_ACTIVATIONS=float / set_activations): dequantized tiles + sgemm, float bound
    qmm.set_activations("float")
    try:
        for rows in (1, 40):
            x = mx.array(rng.standard_normal((rows, 384)).astype(np.float32))
            _, tiles, wd = _packed(rng, 77, 384, group_size)
            assert _close_kernel(qmm.quantized_matmul(x, *tiles, group_size, 4, packed_n=77), x, wd, 100, 4)
    finally:
        qmm.set_activations("int8")


def _within_int8(got, x, wd):
    """got = x @ wd.T within the bound of rounding x to int8 per block of 32 (test_qmm), at every output."""
    want = x @ wd.T
    slack = REL * max(float(mx.abs(want).max()), 1e-6)
    return bool((np.abs(np.asarray(got - want, np.float64)) <= _int8_bound(x, wd) + slack).all())


def test_packed_vjp_bias_and_compile():
    rng = np.random.default_rng(5)
    mlx_layout, tiles, wd = _packed(rng, 99, 320, 64)
    bias = mx.array(rng.standard_normal(99).astype(np.float32))
    for rows in (1, 37):
        x = mx.array(rng.standard_normal((rows, 320)).astype(np.float32))
        c = mx.array(rng.standard_normal((rows, 99)).astype(np.float32))

        def ours(x):
            return qmm.quantized_matmul(x, *tiles, 64, 4, bias=bias, packed_n=99)

        def mlx(x):
            return mx.quantized_matmul(x, *mlx_layout, group_size=64, bits=4) + bias

        assert _close(mx.grad(lambda x, c=c: (ours(x) * c).sum())(x), mx.grad(lambda x, c=c: (mlx(x) * c).sum())(x))
        assert _within_int8(mx.compile(ours)(x) - bias, x, wd)
    with pytest.raises(ValueError, match="packed"):
        qmm.quantized_matmul(x, tiles[0], tiles[1][:, :2], tiles[2], 64, 4, packed_n=99)  # scales of another K


def test_packed_embedding_rows_and_head_equal_mlx():
    import mlx.nn as nn

    from bonsai_mlx.cpu.quantized import CPUQuantizedEmbedding

    rng = np.random.default_rng(2)
    emb = nn.QuantizedEmbedding(203, 192, group_size=64, bits=4)  # 203 rows: a partial last tile
    q = mx.quantize(mx.array(rng.standard_normal((203, 192)).astype(np.float32)), group_size=64, bits=4)
    emb.update(dict(zip(("weight", "scales", "biases"), q, strict=True)))
    ids = mx.array([[0, 15, 16, 202], [7, 7, 100, 31]])
    want = emb(ids)
    emb.__class__ = CPUQuantizedEmbedding
    placed = pages.place_weights(emb, pack=True)
    assert placed["packed"] == 1 and "weight" not in emb and emb.packed_n == 203 and "packed in 16-row" in repr(emb)
    assert mx.array_equal(emb(ids), want)
    wd = mx.dequantize(*q, group_size=64, bits=4)
    for rows in (3, 20):  # the tied LM head
        x = mx.array(rng.standard_normal((rows, 192)).astype(np.float32))
        assert _within_int8(emb.as_linear(x), x, wd)


def test_a_packed_student_is_close_to_mlx(tmp_path, tokenizer):
    """`load` packs the 4-bit LM (every linear and the tied embedding/head), `load(pack=False)` (export) does not.
    Packed, the prompt's products round their activations to int8 too (decode already did): along the same tokens,
    the next-token log-probabilities move by under a quarter of what quantizing the weights to 4 bits moves them
    (test_qmm's criterion for decode, here for prefill and decode together)."""
    from PIL import Image, ImageDraw
    from test_qmm import _forced_logprobs

    from bonsai_mlx.cpu.quantized import CPUQuantizedLinear
    from bonsai_mlx.generate import generate
    from bonsai_mlx.io import load

    d, _ = build_llava(tmp_path / "m", tokenizer, seed=3, noise=0.3)
    packed, processor = load(d, quantize=4)
    plain, _ = load(d, quantize=4, pack=False)
    f32, _ = load(d)
    lm = packed.language_model
    n_layers = len(lm.model.layers)
    assert packed.acceleration.packed == 7 * n_layers + 1, packed.acceleration.summary()
    assert "16-row tiles" in packed.acceleration.summary()
    down = lm.model.layers[0].mlp.down_proj
    assert type(down) is CPUQuantizedLinear and "weight" not in down and down.packed_n == down.packed_scales.shape[0] * 16
    assert plain.acceleration.packed == 0 and "weight" in plain.language_model.model.layers[0].mlp.down_proj
    img = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(img).ellipse([8, 8, 40, 40], fill="blue")
    img.save(tmp_path / "a.png")
    for prompt, image in [("What colour is the circle?", str(tmp_path / "a.png")),
                          ("What is the answer to this long question about colours and shapes?", None)]:
        ids = generate(packed, processor, prompt, image=image, max_tokens=12).token_ids
        assert len(ids) > 0
        got, mlx, full = (_forced_logprobs(m, processor, prompt, image, ids) for m in (packed, plain, f32))
        for step, (a, b, c) in enumerate(zip(got, mlx, full, strict=True)):
            moved, by_weights = np.abs(a - b).max(), np.abs(b - c).max()
            assert moved <= 0.25 * by_weights, (prompt, step, moved, by_weights)


def test_a_packed_student_is_not_saved_as_a_checkpoint(tmp_path, tokenizer):
    """Saving reads MLX's layout: a packed model is refused in one line and nothing is written."""
    from bonsai_mlx.errors import BonsaiError
    from bonsai_mlx.io import load, save_model

    d, _ = build_llava(tmp_path / "m", tokenizer)
    packed, _ = load(d, quantize=4)
    with pytest.raises(BonsaiError, match="pack=False"):
        save_model(packed, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    plain, _ = load(d, quantize=4, pack=False)
    save_model(plain, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists()
