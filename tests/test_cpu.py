"""The CPU path (bonsai_mlx/cpu/, switched in by `accelerate`) changes speed, not results."""

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import build_llava, image_token_id

from bonsai_mlx.cpu.device import PREFILL_ROWS
from bonsai_mlx.cpu.quantized import CPUQuantizedEmbedding, CPUQuantizedLinear
from bonsai_mlx.io import load_model


@pytest.mark.parametrize("path", ["bonsai kernel", "dequantized slices"])
def test_dequantized_prefill_equals_quantized_kernel(tmp_path, tokenizer, monkeypatch, path):
    """Quantized layers on the CPU take bonsai's compiled kernel (qmm) or, without it, the dequantized slices for
    many rows; either gives MLX's quantized kernel's results."""
    from bonsai_mlx.cpu import qmm, quantized

    calls = []
    if path == "bonsai kernel":
        assert qmm.available(), qmm.status()
        real_q = qmm.quantized_matmul
        monkeypatch.setattr(qmm, "quantized_matmul", lambda *a, **k: calls.append(1) or real_q(*a, **k))
    else:
        monkeypatch.setattr(qmm, "supports", lambda *a, **k: False)
        real = quantized.dequantized_matmul
        monkeypatch.setattr(quantized, "dequantized_matmul", lambda *a: calls.append(1) or real(*a))
    d, _ = build_llava(tmp_path / "m", tokenizer)
    model = load_model(d, quantize=4)
    layer = model.language_model.model.layers[0].mlp.down_proj
    assert type(layer) is CPUQuantizedLinear
    assert type(model.language_model.model.embed_tokens) is CPUQuantizedEmbedding
    ids = mx.array([[3, 4] + [image_token_id(tokenizer)] * 16 + list(range(5, 5 + 3 * PREFILL_ROWS))])
    pix = mx.array(np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32))
    with_policy = np.array(model(ids, pix))
    assert len(calls) >= 7 * 2 + 1  # every quantized linear of both blocks, and the tied LM head, took that path
    for _, m in model.named_modules():
        if type(m) is CPUQuantizedLinear:
            m.__class__ = nn.QuantizedLinear  # the plain quantized kernels
        elif type(m) is CPUQuantizedEmbedding:
            m.__class__ = nn.QuantizedEmbedding
    n = len(calls)
    plain = np.array(model(ids, pix))
    assert len(calls) == n  # the plain kernels ran this time
    assert np.abs(with_policy - plain).max() <= 1e-4


def test_sliced_dequantized_matmul_equals_whole_dequantize(monkeypatch):
    """The slices (output rows when N >= K, summed input columns otherwise) give the whole product, values and
    gradients, for every bit width whose packing the column slices cut."""
    from bonsai_mlx.cpu import quantized

    monkeypatch.setattr(quantized, "DEQUANT_SLICE", 40 * 64)  # several slices of these small weights
    rng = np.random.default_rng(0)
    for (n, k), bits in [((96, 128), 4), ((40, 384), 4), ((40, 384), 3), ((40, 384), 8), ((256, 64), 2)]:
        w = mx.array(rng.standard_normal((n, k)).astype(np.float32))
        wq, scales, biases = mx.quantize(w, group_size=64, bits=bits)
        x = mx.array(rng.standard_normal((2, 9, k)).astype(np.float32))
        q = (wq, scales, biases, 64, bits)

        def whole(x, q=q):
            return x @ mx.dequantize(*q).T

        def sliced(x, q=q):
            return quantized.dequantized_matmul(x, *q)

        assert sliced(x).shape == whole(x).shape
        assert np.abs(np.array(sliced(x)) - np.array(whole(x))).max() <= 1e-4, (n, k, bits)
        g_whole = mx.grad(lambda x, f=whole: f(x).sum())(x)
        g_sliced = mx.grad(lambda x, f=sliced: f(x).sum())(x)
        assert np.abs(np.array(g_sliced) - np.array(g_whole)).max() <= 1e-4, (n, k, bits)


def test_bf16_checkpoint_is_upcast_on_cpu(tmp_path, tokenizer):
    d, _ = build_llava(tmp_path / "m", tokenizer)
    m = load_model(d)
    m.set_dtype(mx.bfloat16)
    from bonsai_mlx.io import save_model

    save_model(m, tmp_path / "bf16", extra_files_from=d)
    code = ("import bonsai_mlx, mlx.core as mx; from bonsai_mlx.io import load_model; "
            f"m = load_model({str(tmp_path / 'bf16')!r}); "
            "print(m.language_model.model.layers[0].mlp.down_proj.weight.dtype)")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, BONSAI_CPU_POLICY="off"))
    assert on.stdout.strip() == "mlx.core.float32" and off.stdout.strip() == "mlx.core.bfloat16", (on, off)


def test_fast_cpu_functions_match_mlx(monkeypatch):
    """The CPU fast paths (rational tanh for SwiGLU / tanh-GELU, fast-softmax attention with its own backward) give
    MLX's results and gradients within float32 tolerance, for causal (in query chunks too), boolean, additive and no
    masks, GQA, and single-query decode."""
    import mlx.nn as nn

    from bonsai_mlx.cpu import activations, attention
    from bonsai_mlx.cpu.activations import fast_gelu_tanh, fast_swiglu, fast_tanh
    from bonsai_mlx.cpu.attention import fast_sdpa

    monkeypatch.setattr(attention, "CAUSAL_CHUNK", 3)  # 7 causal queries → 2 chunks

    y = mx.linspace(-60, 60, 100001)
    assert float(mx.abs(fast_tanh(y) - mx.tanh(y)).max()) < 1e-6
    assert float(mx.abs(fast_swiglu(y, mx.ones_like(y)) - nn.silu(y)).max()) < 1e-5
    assert float(mx.abs(fast_gelu_tanh(y) - nn.gelu_approx(y)).max()) < 1e-5
    g = mx.grad(lambda a: fast_swiglu(a, a).sum())(y)
    want = mx.grad(lambda a: (nn.silu(a) * a).sum())(y)
    assert float(mx.abs(g - want).max() / mx.abs(want).max()) < 1e-6
    big = mx.array([-1e30, -1e6, -60.0, 1e6])  # exactly 0 below the clamp (not a residue that grows with |x|)
    assert fast_swiglu(big, mx.ones_like(big)).tolist()[:3] == [0.0, 0.0, 0.0]
    assert fast_gelu_tanh(big).tolist()[:3] == [0.0, 0.0, 0.0]
    assert abs(fast_swiglu(big, mx.ones_like(big)).tolist()[3] - 1e6) <= 0.1
    # the clamp kernels zero what multiplies sigmoid below the clamp (the rational's rounding there is not relied on),
    # and a masked score's exponential is exactly 0 (at the exp clamp the rational alone leaves 1.8e-7)
    assert activations._swiglu_clamped(big)[1].tolist() == [0.0, 0.0, 0.0, 1e6]  # gate zeroed below -2·_TANH_CLAMP
    assert activations._fast_exp_rows(mx.array([[0.0, -1e30, -40.0, -1.0]])).tolist()[0][:3] == [1.0, 0.0, 0.0]

    mx.random.seed(0)
    q, k, v = mx.random.normal((2, 4, 7, 8)), mx.random.normal((2, 2, 9, 8)), mx.random.normal((2, 2, 9, 8))
    boolean = mx.random.uniform(shape=(2, 1, 7, 9)) > 0.3
    boolean[..., 0] = True  # every row keeps at least one key
    additive = mx.random.normal((7, 9))
    for mask in ("causal", None, boolean, additive):
        def f(q, k, v, fast, mask=mask):
            if fast:
                return fast_sdpa(q, k, v, 0.35, mask)
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)

        assert float(mx.abs(f(q, k, v, True) - f(q, k, v, False)).max()) < 1e-5
        ga = mx.grad(lambda *a: (f(*a, True) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
        gb = mx.grad(lambda *a: (f(*a, False) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
        assert max(float(mx.abs(a - b).max()) for a, b in zip(ga, gb, strict=True)) < 1e-4
    for mask in (None, "causal"):  # decode: one query against the whole cache
        want = mx.fast.scaled_dot_product_attention(q[:, :, -1:], k, v, scale=0.35, mask=mask)
        assert float(mx.abs(fast_sdpa(q[:, :, -1:], k, v, 0.35, mask) - want).max()) < 1e-5


def test_sliced_tied_head_equals_the_full_product_and_decode_uses_it(tmp_path, tokenizer, monkeypatch):
    from bonsai_mlx.cpu import decode
    from bonsai_mlx.cpu.policy import CPU_CACHE_LIMIT

    rng = np.random.default_rng(0)
    W = mx.array(rng.standard_normal((5 * 2048 + 77, 64)).astype(np.float32))  # last slice shorter
    x = mx.array(rng.standard_normal((1, 1, 64)).astype(np.float32))
    full, sliced = np.array(x @ W.T), np.array(decode.sliced_head(x, W))
    assert sliced.shape == full.shape and np.abs(sliced - full).max() <= 1e-4 * np.abs(full).max()

    d, _ = build_llava(tmp_path / "m", tokenizer)
    model = load_model(d)
    head = model.language_model.model.embed_tokens
    assert type(head) is decode.CPUTiedHead
    monkeypatch.setattr(decode, "HEAD_SLICE_ROWS", 16)  # the tiny vocabulary in several slices
    calls = []
    real = decode.sliced_head
    monkeypatch.setattr(decode, "sliced_head", lambda *a: calls.append(a[0].shape) or real(*a))
    h = mx.array(rng.standard_normal((1, PREFILL_ROWS, head.weight.shape[1])).astype(np.float32))
    many = np.array(head.as_linear(h))  # prefill-sized: the plain product
    assert not calls
    one = np.array(head.as_linear(h[:, -1:]))  # decode: sliced
    assert calls and np.abs(one[0, 0] - many[0, -1]).max() <= 1e-5
    assert mx.set_cache_limit(CPU_CACHE_LIMIT) >= CPU_CACHE_LIMIT  # the model raised it


def test_decode_gemv_equals_matmul_and_only_applies_inside_decoding():
    from bonsai_mlx.cpu import blas as _blas
    from bonsai_mlx.cpu import decode

    rng = np.random.default_rng(1)
    W = mx.array(rng.standard_normal((300, 64)).astype(np.float32))
    b = mx.array(rng.standard_normal(300).astype(np.float32))
    x = mx.array(rng.standard_normal((1, 1, 64)).astype(np.float32))
    assert decode.gemv(x, W) is None  # outside decoding(): MLX's matmul
    with decode.decoding():
        assert decode.gemv(mx.concatenate([x, x], axis=1), W) is None  # more than one row
        assert decode.gemv(x.astype(mx.float16), W.astype(mx.float16)) is None
        y, yb = decode.gemv(x, W), decode.gemv(x, W, b)
    if not _blas.loaded:  # BONSAI_BLAS=none: no cblas_sgemv to call
        assert y is None and yb is None
        return
    assert y.shape == (1, 1, 300) and yb.shape == (1, 1, 300)
    assert float(mx.abs(y - x @ W.T).max()) <= 1e-5
    assert float(mx.abs(yb - (x @ W.T + b)).max()) <= 1e-5
    lin = nn.Linear(64, 300)
    lin.weight, lin.bias = W, b
    lin.__class__ = decode.CPULinear
    with decode.decoding():
        assert float(mx.abs(lin(x) - (x @ W.T + b)).max()) <= 1e-5


def _real_size_model(quantize=None):
    """The real student's architecture (SigLIP-B/16-224 + Qwen2.5-0.5B) with lazy random weights (never evaluated)."""
    from bonsai_mlx.model import LlavaModel, ModelConfig, quantize_language_model

    vision = {"model_type": "siglip_vision_model", "hidden_size": 768, "intermediate_size": 3072,
              "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "patch_size": 16,
              "hidden_act": "gelu_pytorch_tanh"}
    text = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "tie_word_embeddings": True, "max_position_embeddings": 32768}
    m = LlavaModel(ModelConfig.from_dict({"model_type": "llava", "vision_config": vision, "text_config": text,
                                          "image_token_index": 151665, "vision_feature_layer": -1,
                                          "vision_feature_select_strategy": "full"}))
    if quantize:
        quantize_language_model(m, bits=quantize)
    return m


def _classes(model):
    return {name: type(m) for name, m in model.named_modules()}


def test_accelerate_is_the_one_swap_and_lists_it_on_the_real_size_config(monkeypatch):
    from pathlib import Path

    from bonsai_mlx.cpu import accelerate

    monkeypatch.delenv("BONSAI_CPU_POLICY", raising=False)
    m = _real_size_model()
    before = _classes(m)
    report = accelerate(m)
    assert report.enabled and not report.upcast and report.cache_limit >= 1 << 30
    assert report.swapped == {
        "Attention → CPUAttention": 24, "MLP → CPUSwiGLUMLP": 24,  # mlx-lm's Qwen2 blocks
        "TransformerBlock → CPUDecoderBlock": 24,
        "Linear → CPULinear": 24 * 7, "Embedding → CPUTiedHead": 1,  # q k v o gate up down; the tied head
        "RMSNorm → CPURMSNorm": 24 * 2 + 1,  # each block's two norms and the final one
        "Attention → CPUVisionAttention": 12, "MLP → CPUVisionMLP": 12,  # the SigLIP tower
    }, report.swapped
    after = _classes(m)
    changed = {k for k in before if before[k] is not after[k]}
    assert len(changed) == sum(report.swapped.values())
    assert all(issubclass(after[k], before[k]) for k in changed)  # stand-ins are the original classes too
    assert accelerate(m).swapped == {}  # idempotent
    q = _real_size_model(quantize=4)
    assert accelerate(q).swapped == {
        "Attention → CPUAttention": 24, "MLP → CPUSwiGLUMLP": 24, "QuantizedLinear → CPUQuantizedLinear": 24 * 7,
        "TransformerBlock → CPUDecoderBlock": 24,
        "QuantizedEmbedding → CPUQuantizedEmbedding": 1, "Attention → CPUVisionAttention": 12,
        "MLP → CPUVisionMLP": 12, "RMSNorm → CPURMSNorm": 24 * 2 + 1,
    }

    monkeypatch.setenv("BONSAI_CPU_POLICY", "off")
    m = _real_size_model()
    m.set_dtype(mx.bfloat16)
    before = _classes(m)
    report = accelerate(m)
    assert not report.enabled and report.swapped == {} and not report.upcast
    assert _classes(m) == before and m.language_model.model.norm.weight.dtype == mx.bfloat16

    # nothing else in the package swaps a module's class
    root = Path(__file__).resolve().parents[1] / "bonsai_mlx"
    swaps = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") for i, line in
             enumerate(p.read_text().splitlines(), 1) if "__class__ =" in line and "sys.modules" not in line]
    assert swaps and all(s.startswith("cpu/policy.py:") for s in swaps), swaps
