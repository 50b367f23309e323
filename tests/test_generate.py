"""Generation: greedy parity with transformers, KV cache vs recomputation, adapters, bad input, info."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import build_llava
from PIL import Image, ImageDraw

from bonsai_mlx.adapters import add_lora, apply_adapter, lora_config, save_adapter
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.generate import generate
from bonsai_mlx.io import load


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    d, hf = build_llava(tmp_path_factory.mktemp("gen") / "m", tokenizer, seed=3, noise=0.3)
    # weights perturbed well away from the init: greedy tokens vary with the image and the prompt
    return d, hf


def _pictures(tmp_path):
    a = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(a).ellipse([8, 8, 40, 40], fill="blue")
    b = Image.new("RGB", (50, 50), "black")
    ImageDraw.Draw(b).rectangle([20, 5, 45, 30], fill="yellow")
    pa, pb = tmp_path / "a.png", tmp_path / "b.png"
    a.save(pa)
    b.save(pb)
    return pa, pb


def test_greedy_tokens_equal_transformers_generate(student, tmp_path):
    d, hf = student
    model, processor = load(d)
    eos = sorted(processor.tokenizer.eos_token_ids)
    for img, prompt in zip(_pictures(tmp_path), ["What colour is the circle?", "Describe it."], strict=True):
        res = generate(model, processor, prompt, image=str(img), max_tokens=20)
        ids = processor.prompt_ids(prompt, with_image=True)
        pix = processor.image_processor([str(img)], channels_first=True)
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              pixel_values=torch.from_numpy(pix), do_sample=False, max_new_tokens=20,
                              eos_token_id=eos, pad_token_id=eos[0])
        ref = [t for t in out[0, len(ids):].tolist() if t not in eos]
        assert res.token_ids == ref
        assert len(res.token_ids) == 20 or res.finish_reason == "stop"


def test_kv_cached_decoding_equals_full_recomputation(student, tmp_path, monkeypatch):
    # decode runs its one-row products through cblas_sgemv where OpenBLAS is loaded (cpu.decode.gemv), prefill and the
    # reference below through MLX's matmul
    from bonsai_mlx.cpu import blas as _blas
    from bonsai_mlx.cpu import decode as cpu_decode
    from bonsai_mlx.cpu import policy_enabled

    d, _ = student
    model, processor = load(d)
    img = str(_pictures(tmp_path)[0])
    calls = []  # (inside decoding(), took cblas_sgemv)
    real = cpu_decode.gemv

    def recording(*args):
        y = real(*args)
        calls.append((cpu_decode._DECODING.get(), y is not None))
        return y

    monkeypatch.setattr(cpu_decode, "gemv", recording)
    res = generate(model, processor, "What is here?", image=img, max_tokens=12)
    decode = [took for inside, took in calls if inside]
    assert decode or not policy_enabled()  # BONSAI_CPU_POLICY=off: the linears are MLX's own
    assert all(took == bool(_blas.loaded) for took in decode)
    assert not any(took for inside, took in calls if not inside)  # prefill: MLX's matmul
    ids = processor.prompt_ids("What is here?", with_image=True)
    pixels = mx.array(processor.image_processor([img]))
    seq = list(ids)
    for step, tok in enumerate(res.token_ids):
        full = model(mx.array([seq]), pixels)[0, -1].astype(mx.float32)
        ref = full - mx.logsumexp(full)
        assert np.abs(np.array(res.logprobs[step]) - np.array(ref)).max() <= 1e-4, step
        seq.append(tok)


def test_one_pass_prefill_equals_full_forward_and_chunks(student, tmp_path):
    # generate's prefill runs the whole prompt at once and the LM head on the last position only; chunked (long
    # prompts) it must fill the same KV cache and give the same logits
    from mlx_lm.models.cache import make_prompt_cache

    from bonsai_mlx.generate import prefill, prepare_inputs

    d, _ = student
    model, processor = load(d)
    img = str(_pictures(tmp_path)[1])
    ids, embeds, _ = prepare_inputs(model, processor, "Describe it.", image=img)
    full = model(ids[None], mx.array(processor.image_processor([img])))[0, -1]  # [V]
    caches = []
    for step in (2048, 7):  # one pass; chunks of 7
        cache = make_prompt_cache(model.language_model)
        logits = prefill(model, embeds, cache, step=step)
        assert logits.shape == (1, full.shape[0])
        assert np.abs(np.array(logits[0]) - np.array(full)).max() <= 1e-4, step
        assert cache[0].offset == len(ids)
        caches.append(cache)
    # the reference: every layer on every row (mlx-lm's own blocks), logits for all positions
    from bonsai_mlx.language import lm_forward

    ref_cache = make_prompt_cache(model.language_model)
    ref_logits, _ = lm_forward(model.language_model, embeds[None], ref_cache)
    no_cache, _ = lm_forward(model.language_model, embeds[None], last_only=True)  # the eval path
    assert np.abs(np.array(no_cache[0, -1]) - np.array(ref_logits[0, -1])).max() <= 1e-4
    for cache in caches:  # the last layer computed only its K/V for all rows: the caches are the reference's
        for got, want in zip(cache, ref_cache, strict=True):
            assert got.offset == want.offset == len(ids)
            for a, b in zip(got.state[:2], want.state[:2], strict=True):  # keys, values
                assert np.abs(np.array(a[..., : len(ids), :]) - np.array(b[..., : len(ids), :])).max() <= 1e-4


def test_temperature_sampling_is_seeded(student):
    d, _ = student
    model, processor = load(d)
    a = generate(model, processor, "Say something.", max_tokens=10, temp=1.5, top_k=50, seed=7)
    b = generate(model, processor, "Say something.", max_tokens=10, temp=1.5, top_k=50, seed=7)
    assert a.token_ids == b.token_ids


def test_adapter_round_trip(student, tmp_path):
    d, _ = student
    model, processor = load(d)
    cfg = lora_config(rank=4, alpha=8)
    add_lora(model, cfg)
    # non-zero B (fresh LoRA is an identity) and a changed projector, so the adapter matters
    rng = np.random.default_rng(0)
    for layer in model.language_model.model.layers:
        layer.self_attn.q_proj.lora_b = mx.array(rng.standard_normal(layer.self_attn.q_proj.lora_b.shape) * 0.5,
                                                 dtype=mx.float32)
        layer.mlp.down_proj.lora_b = mx.array(rng.standard_normal(layer.mlp.down_proj.lora_b.shape) * 0.5,
                                              dtype=mx.float32)
    model.multi_modal_projector.linear_2.bias = mx.ones_like(model.multi_modal_projector.linear_2.bias)
    model.eval()  # LoRA dropout off
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_adapter(model, ckpt, cfg)
    assert json.loads((ckpt / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 2.0

    ids = mx.array([processor.prompt_ids("hi", with_image=True)])
    pix = mx.array(np.random.default_rng(1).standard_normal((1, 32, 32, 3)).astype(np.float32))
    want = np.array(model(ids, pix))
    base, _ = load(d)
    assert np.abs(np.array(base(ids, pix)) - want).max() > 1e-3  # the adapter changes the output
    adapted, _ = load(d, adapter=ckpt)
    assert np.abs(np.array(adapted(ids, pix)) - want).max() <= 1e-5

    with pytest.raises(BonsaiError, match="no such directory"):
        apply_adapter(base, tmp_path / "nope")


def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "bonsai_mlx.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_generate_json_and_folder_mode(student, tmp_path):
    d, _ = student
    pa, pb = _pictures(tmp_path)
    r = _cli("generate", "--model", str(d), "--image", str(pa), "--prompt", "What colour?", "--max-tokens", "5",
             "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    for k in ("image", "prompt_tokens", "token_ids", "text", "ttft_s", "vision_s", "prefill_tps", "decode_tps",
              "peak_memory_gb"):
        assert k in obj
    model, processor = load(d)
    assert obj["token_ids"] == generate(model, processor, "What colour?", image=str(pa), max_tokens=5).token_ids

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in (pa, pb):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = _cli("generate", "--model", str(d), "--image", str(folder), "--prompt", "What colour?", "--max-tokens", "3")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [os.path.basename(x["image"]) for x in lines] == ["a.png", "b.png", "broken.jpg"]
    assert "error" in lines[2] and "broken.jpg" in lines[2]["error"]
    assert all("token_ids" in x for x in lines[:2])

    # streaming mode prints the answer on stdout and the stats on stderr
    r = _cli("generate", "--model", str(d), "--image", str(pa), "--prompt", "What colour?", "--max-tokens", "4")
    assert r.returncode == 0 and "decode" in r.stderr and "ttft" in r.stderr


def test_cli_bad_input_one_line_errors(student, tmp_path):
    d, _ = student
    good = _pictures(tmp_path)[0]
    (tmp_path / "text.png").write_text("hello")
    buf = good.read_bytes()
    img = Image.open(good).convert("RGB")
    img.save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert buf
    cases = [
        (["--image", str(tmp_path / "missing.png"), "--prompt", "hi"], "missing.png"),
        (["--image", str(tmp_path / "text.png"), "--prompt", "hi"], "text.png"),
        (["--image", str(tmp_path / "cut.jpg"), "--prompt", "hi"], "cut.jpg"),
        (["--image", str(good), "--prompt", "   "], "empty"),
        (["--prompt", "word " * 3000], "context"),
        (["--image", str(good), "--prompt", "hi", "--top-p", "2"], "--top-p"),
    ]
    for args, needle in cases:
        r = _cli("generate", "--model", str(d), *args)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode != 0, args
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)


def test_info_counts_match_transformers(student):
    d, hf = student
    r = _cli("info", "--model", str(d), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert info["parameters"]["vision"] == n(hf.model.vision_tower)
    assert info["parameters"]["projector"] == n(hf.model.multi_modal_projector)
    assert info["parameters"]["language"] == n(hf.model.language_model)  # tied head: counted once
    mem = info["memory_bytes"]
    assert mem["float32"] > mem["bfloat16"] > mem["8-bit"] > mem["4-bit"]
    assert info["image_tokens"] == 16 and info["context_length"] == 512


def test_python_api_in_the_style_of_mlx_lm(student):
    import bonsai_mlx
    import bonsai_mlx.generate as gen_module  # the submodule import must not shadow the function

    d, _ = student
    model, processor = bonsai_mlx.load(str(d))
    a = bonsai_mlx.generate(model, processor, "Describe it.", max_tokens=5)
    b = gen_module.generate(model, processor, "Describe it.", max_tokens=5)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 5 and isinstance(a.text, str)


def test_eval_vqa_and_generate_give_the_same_ids_through_one_engine(student, tmp_path, monkeypatch):
    """`eval --task vqa` answers with the engine `generate` uses: for a one-question record its ids are
    `bonsai-mlx generate`'s for the same image and question; a multi-turn record's later question is the engine's
    answer to the chat history (the chat template), and every answer went through `generate_tokens`."""
    import bonsai_mlx.generate as engine
    from bonsai_mlx.evaluate.vqa import Evaluator, eval_vqa

    d, _ = student
    pa, pb = _pictures(tmp_path)
    records = [
        {"id": "one", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                           {"from": "gpt", "value": "blue"}]},
        {"id": "two", "image": "b.png", "conversations": [{"from": "human", "value": "Describe it.\n<image>"},
                                                           {"from": "gpt", "value": "a square"},
                                                           {"from": "human", "value": "Which colour?"},
                                                           {"from": "gpt", "value": "yellow"}]},
    ]
    data = tmp_path / "vqa.json"
    data.write_text(json.dumps(records))
    r = _cli("eval", "--model", str(d), "--task", "vqa", "--data", str(data), "--image-root", str(tmp_path),
             "--max-tokens", "6", "--out", str(tmp_path / "res.json"))
    assert r.returncode == 0, r.stderr
    preds = json.loads((tmp_path / "res.json").read_text())["predictions"]
    assert [(p["id"], p["turn"]) for p in preds] == [("one", 0), ("two", 0), ("two", 1)]
    g = _cli("generate", "--model", str(d), "--image", str(pa), "--prompt", "What colour?", "--max-tokens", "6",
             "--json")
    assert g.returncode == 0, g.stderr
    assert preds[0]["token_ids"] == json.loads(g.stdout)["token_ids"] and preds[0]["token_ids"]
    g = _cli("generate", "--model", str(d), "--image", str(pb), "--prompt", "Describe it.", "--max-tokens", "6",
             "--json")
    assert preds[1]["token_ids"] == json.loads(g.stdout)["token_ids"]  # `<image>` after the text: moved first

    model, processor = load(d)
    calls = []
    real = engine.generate_tokens
    monkeypatch.setattr(engine, "generate_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = eval_vqa(Evaluator(model, processor, tmp_path), records, max_tokens=6, progress=False)
    assert len(calls) == 3 and [p["token_ids"] for p in res["predictions"]] == [p["token_ids"] for p in preds]
    history = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
               {"role": "assistant", "content": "a square"}, {"role": "user", "content": "Which colour?"}]
    want = generate(model, processor, messages=history, image=str(pb), max_tokens=6)
    assert preds[2]["token_ids"] == want.token_ids
