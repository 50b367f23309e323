"""A quantized transformer block's decode step as one CPU op (csrc/decode_block.cpp, bonsai_mlx/cpu/block.py): the
same logits and greedy ids as mlx-lm's block on the other CPU stand-ins, for Qwen2 (q/k/v biases) and Llama (none),
4 and 8 bits, and used only where it applies."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import build_llava
from mlx_lm.models.cache import make_prompt_cache

from bonsai_mlx.cpu import accelerate, block, qmm
from bonsai_mlx.cpu.decode import decoding

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the extension is built on Linux only (Metal on macOS)")


def _decode_logits(lm, prompt, tokens):
    """Logits after a prefill of `prompt` and after each of `tokens`, one decode step each (as generate's)."""
    cache = make_prompt_cache(lm)
    out = [lm(mx.array([prompt]), cache=cache)[0, -1]]
    with decoding():
        out += [lm(mx.array([[t]]), cache=cache)[0, -1] for t in tokens]
    mx.eval(out)
    return np.stack([np.asarray(o) for o in out])


def _counting(monkeypatch):
    calls = []
    real = block._fused_inputs

    def counting(*a):
        r = real(*a)
        calls.append(r is not None)
        return r

    monkeypatch.setattr(block, "_fused_inputs", counting)
    return calls


def _tiny_llama(bits):
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=320,
                           rope_theta=10000.0, tie_word_embeddings=False)
    mx.random.seed(1)
    m = llama.Model(args)
    nn.quantize(m, group_size=32, bits=bits)
    accelerate(m)
    return m


@pytest.mark.parametrize("bits", [4, 8])
def test_block_op_equals_the_layer_ops(tmp_path, tokenizer, monkeypatch, bits):
    from bonsai_mlx.io import load_model

    d, _ = build_llava(tmp_path / "m", tokenizer, seed=2, noise=0.3)
    models = {"qwen2": load_model(d, quantize=bits).language_model, "llama": _tiny_llama(bits)}
    assert all(isinstance(m.model.layers[0], block.CPUDecoderBlock) for m in models.values())
    assert "bias" in models["qwen2"].model.layers[0].self_attn.q_proj and \
        "bias" not in models["llama"].model.layers[0].self_attn.q_proj
    prompt, tokens = [3, 17, 41, 5, 9, 12, 30, 8, 2, 11], [7, 19, 23, 4, 15]
    for name, lm in models.items():
        calls = _counting(monkeypatch)
        one_op = _decode_logits(lm, prompt, tokens)
        assert calls and all(calls), (name, calls)  # every decode step of every block took the one op
        monkeypatch.setattr(block, "_fused_inputs", lambda *a: None)  # mlx-lm's block on the layer stand-ins
        layers = _decode_logits(lm, prompt, tokens)
        monkeypatch.undo()
        scale = np.abs(layers).max()
        assert np.abs(one_op - layers).max() <= 1e-5 * scale, (name, np.abs(one_op - layers).max(), scale)


def test_greedy_ids_are_unchanged(tmp_path, tokenizer, monkeypatch):
    from bonsai_mlx.generate import generate
    from bonsai_mlx.io import load

    d, _ = build_llava(tmp_path / "m", tokenizer, seed=4, noise=0.3)
    model, processor = load(d, quantize=4)
    prompts = ["Describe it.", "What is the answer to this long question about colours and shapes?"]
    calls = _counting(monkeypatch)
    with_op = [generate(model, processor, p, max_tokens=12).token_ids for p in prompts]
    assert any(calls)
    monkeypatch.setattr(block, "_fused_inputs", lambda *a: None)
    without = [generate(model, processor, p, max_tokens=12).token_ids for p in prompts]
    assert with_op == without and all(len(t) > 0 for t in with_op)


def test_only_where_it_applies(tmp_path, tokenizer, monkeypatch):
    """Not outside decoding() (prefill, training), not for two sequences, not without the extension, not for float
    weights."""
    from bonsai_mlx.io import load_model

    d, _ = build_llava(tmp_path / "m", tokenizer)
    lm = load_model(d, quantize=4).language_model
    blk = lm.model.layers[0]
    cache = make_prompt_cache(lm)
    lm(mx.array([[3, 4, 5]]), cache=cache)
    x = mx.random.normal((1, 1, blk.input_layernorm.weight.shape[0]))
    assert block._fused_inputs(blk, x, [cache[0]]) is None  # outside decoding()
    with decoding():
        assert block._fused_inputs(blk, x, [cache[0]]) is not None
        assert block._fused_inputs(blk, mx.concatenate([x, x]), [cache[0]]) is None  # two rows, one cache
        assert block._fused_inputs(blk, mx.concatenate([x, x]), [cache[0]] * 2) is not None  # a cache per row
        assert block._fused_inputs(blk, x, [None]) is None  # no cache
        monkeypatch.setattr(qmm, "supports", lambda *a, **k: False)
        assert block._fused_inputs(blk, x, [cache[0]]) is None  # the extension unavailable
        monkeypatch.undo()
        f32 = load_model(d).language_model
        assert block._fused_inputs(f32.model.layers[0], x, [cache[0]]) is None  # float weights: the per-layer paths


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_of_different_sequences_equal_each_alone(tmp_path, tokenizer, monkeypatch, bits):
    """decode_rows: B sequences at different positions, each with its own cache, in one op per block: each row's
    logits equal that sequence decoded alone (the one-row op), and equal mlx-lm's block row by row."""
    from bonsai_mlx.io import load_model

    d, _ = build_llava(tmp_path / "m", tokenizer, seed=3, noise=0.3)
    lm = load_model(d, quantize=bits).language_model
    prompts = [[3, 17, 41, 5], [9, 12, 30, 8, 2, 11, 6, 21, 14], [25]]
    steps = [[7, 19, 4], [23, 15, 5], [11, 2, 31]]  # the token each sequence takes at each step

    def run_rows(use_op, calls=None):
        caches = []
        for pr in prompts:
            c = make_prompt_cache(lm)
            lm(mx.array([pr]), cache=c)
            caches.append(c)
        if calls is not None:
            calls.clear()  # the prefills' (one-token prompt) calls: only the decode steps count
        out = []
        with decoding():
            for toks in zip(*steps, strict=True):
                h = lm.model.embed_tokens(mx.array([[t] for t in toks]))  # [B, 1, D]
                for i, layer in enumerate(lm.model.layers):
                    rows = [c[i] for c in caches]
                    h = layer.decode_rows(h, rows) if use_op else block.decode_rows(layer, h, rows)
                out.append(lm.model.embed_tokens.as_linear(lm.model.norm(h))[:, 0])  # [B, V]
        mx.eval(out)
        return np.stack([np.asarray(o) for o in out], axis=1)  # [B, steps, V]

    calls = _counting(monkeypatch)
    batched = run_rows(True, calls)
    assert calls and all(calls)
    monkeypatch.undo()
    alone = np.stack([_decode_logits(lm, pr, st)[1:] for pr, st in zip(prompts, steps, strict=True)])
    scale = np.abs(alone).max()
    assert np.abs(batched - alone).max() <= 1e-5 * scale, np.abs(batched - alone).max()
    monkeypatch.setattr(block, "_fused_inputs", lambda *a: None)
    per_row = run_rows(False)  # mlx-lm's block, each row alone
    assert np.abs(batched - per_row).max() <= 1e-5 * scale, np.abs(batched - per_row).max()
