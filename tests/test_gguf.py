"""GGUF export (export/gguf.py) proven in llama.cpp itself, through llama-cpp-python: the text GGUF's logits and
greedy tokens equal transformers' on the `to_hf.py` export, with the mmproj too (images, one non-square), Q8_0 /
Q4_0 within stated bounds of F16, a QLoRA adapter fused like `generate --adapter`, and bad input refused in one line.

Tolerances. F16 stores each weight with a relative rounding error ≤ 2^-11, and llama.cpp's CPU matmuls with F16
weights also round the activations to F16 — so every product carries ~1e-3 relative error, and the logits of these
tiny random models (std ~1) move by ~1e-2: the bound is `F16_TOL` on the max |Δlogit|, relative to the logits' scale.
"""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import build_llava, make_shapes_data
from PIL import Image
from transformers import LlavaForConditionalGeneration

try:
    import llama_cpp  # noqa: F401
except ImportError as e:  # fail loudly: the GGUF must be proven in llama.cpp, not skipped
    raise ImportError("the GGUF tests need llama-cpp-python: pip install -e '.[dev]' (builds it from its sdist)") from e

from bonsai_mlx.export.gguf import export_gguf
from bonsai_mlx.export.hf import export as export_hf
from bonsai_mlx.export.llama_runner import LlamaCppRunner
from bonsai_mlx.io import load
from bonsai_mlx.processing import ImageProcessor
from bonsai_mlx.prompting import CHAT_TEMPLATE

F16_TOL = 0.03  # max |Δlogit| / max |logit| (see the module docstring)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Describe the picture.", "What colour is the shape? Answer in one word.", "Zweite Frage — 猫?",
           "count: 1 2 3"]


def chat_ids(tokenizer, prompt: str, image: bool, n_image: int):
    messages = [{"role": "user", "content": [{"type": "image"}] * image + [{"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    img = tokenizer.convert_tokens_to_ids("<image>")
    out = []
    for t in ids:
        out.extend([img] * n_image if t == img else [t])
    return text, out


def hf_greedy(hf, ids, pixel_values=None, n=20):
    with torch.no_grad():
        kw = {"pixel_values": torch.from_numpy(pixel_values.transpose(0, 3, 1, 2))} if pixel_values is not None else {}
        gen = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **kw)
    return gen[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=[(True, -1), (False, -2)], ids=["tied-layer-1", "untied-layer-2"])
def student(request, tmp_path_factory, tokenizer):
    tie, layer = request.param
    root = tmp_path_factory.mktemp("gguf")
    d, _ = build_llava(root / "student", tokenizer, vision_feature_layer=layer, tie=tie, seed=11, noise=0.3,
                       projector_hidden_act="gelu_pytorch_tanh")
    hf_dir = export_hf(str(d), root / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    ggufs = {t: export_gguf(str(d), root / t, type_=t, log=lambda m: None) for t in ("f16", "q8_0", "q4_0")}
    return d, hf, ggufs, tokenizer


def images(tmp_path):
    rng = np.random.default_rng(3)
    out = []
    for i, (w, h) in enumerate(((32, 32), (64, 64), (48, 32))):  # the last is non-square: stretched, as SigLIP
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        out.append(tmp_path / f"{i}.png")
    return out


def test_text_gguf_tokenizes_and_scores_as_transformers(student):
    d, hf, ggufs, tok = student
    with LlamaCppRunner(ggufs["f16"]["model"], logits_all=True) as run:
        for p in PROMPTS:
            text, ids = chat_ids(tok, p, image=False, n_image=0)
            # llama.cpp's own tokenizer (gpt2 BPE + qwen2 pre-tokenizer, from the GGUF) gives our ids
            assert run.llm.tokenize(text.encode(), add_bos=False, special=True) == ids
            run.prefill(ids)
            ours = np.asarray(run.llm.scores[: len(ids)], np.float32)
            with torch.no_grad():
                ref = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
            assert np.abs(ours - ref).max() <= F16_TOL * np.abs(ref).max(), p
    with LlamaCppRunner(ggufs["f16"]["model"]) as run:
        for p in PROMPTS:
            _, ids = chat_ids(tok, p, image=False, n_image=0)
            assert run.greedy(ids, 20) == hf_greedy(hf, ids), p


def test_image_gguf_gives_transformers_greedy_tokens(student, tmp_path):
    d, hf, ggufs, tok = student
    proc = ImageProcessor.from_pretrained(d, default_size=32)
    n_img = hf.config.image_seq_length
    with LlamaCppRunner(ggufs["f16"]["model"], ggufs["f16"]["mmproj"]) as run:
        for img, p in zip(images(tmp_path), PROMPTS):
            _, ids = chat_ids(tok, p, image=True, n_image=n_img)
            got = run.greedy(ids, 20, image=proc.resized(img), image_token_id=hf.config.image_token_index)
            assert got == hf_greedy(hf, ids, proc([img])), (img.name, p)


def test_q8_0_and_q4_0_stay_within_bounds_of_f16(student):
    """Q8_0 (8-bit, one F16 scale per 32 weights: error ≤ max|w|/254 per block) must keep the greedy tokens and stay
    within 2× F16's own bound. Q4_0 (4-bit: error ≤ max|w|/16, ~16× coarser) may flip close calls: its logits stay
    within 0.25 of the logit scale and ≥ 60% of greedy tokens agree with F16 before the first divergence counts."""
    d, hf, ggufs, tok = student
    logits, greedy = {}, {}
    for t in ("f16", "q8_0", "q4_0"):
        with LlamaCppRunner(ggufs[t]["model"]) as run:
            logits[t], greedy[t] = [], []
            for p in PROMPTS:
                _, ids = chat_ids(tok, p, image=False, n_image=0)
                run.prefill(ids)
                logits[t].append(run.last_logits())
                greedy[t].append(run.greedy(ids, 20))
    scale = max(np.abs(x).max() for x in logits["f16"])
    err = {t: max(np.abs(a - b).max() for a, b in zip(logits[t], logits["f16"])) / scale for t in ("q8_0", "q4_0")}
    assert err["q8_0"] <= 2 * F16_TOL, err
    assert greedy["q8_0"] == greedy["f16"]
    assert 0 < err["q4_0"] <= 0.25, err  # > 0: it really is another type
    same = [sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(greedy["q4_0"], greedy["f16"])]
    assert np.mean(same) >= 0.6, same


def test_written_types_are_what_the_docs_say(student):
    from gguf import GGUFReader

    d, hf, ggufs, tok = student
    for t, want in (("f16", "F16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        r = GGUFReader(str(ggufs[t]["model"]))
        types = {x.name: x.tensor_type.name for x in r.tensors}
        assert all(v == "F32" for k, v in types.items() if k.endswith((".bias", "_norm.weight"))), types
        head = "output.weight" if "output.weight" in types else "token_embd.weight"
        assert types[head] == ("Q8_0" if t == "q4_0" else want)
        assert types["blk.0.ffn_down.weight"] == want
        assert ("output.weight" in types) == (not hf.config.tie_word_embeddings)
        m = GGUFReader(str(ggufs[t]["mmproj"]))
        names = {x.name for x in m.tensors}
        assert "v.post_ln.weight" not in names and {"mm.0.weight", "mm.2.weight", "v.patch_embd.weight"} <= names
        fl = m.fields["clip.vision.feature_layer"]
        n = hf.config.vision_config.num_hidden_layers
        assert int(fl.parts[fl.data[0]][0]) == n + 1 + hf.config.vision_feature_layer
        assert m.fields["clip.vision.block_count"].types[0].name == "UINT32"


def test_qlora_adapter_exported_to_gguf_gives_generate_adapter_tokens(tmp_path, tokenizer):
    from bonsai_mlx.generate import generate
    from bonsai_mlx.train.config import TrainConfig
    from bonsai_mlx.train.trainer import Trainer

    d, _ = build_llava(tmp_path / "student", tokenizer, seed=5, noise=0.3, projector_hidden_act="gelu_pytorch_tanh")
    data = make_shapes_data(tmp_path / "data", 16)
    cfg = TrainConfig(model=str(d), data=str(data), image_root=str(data.parent / "images"), out=str(tmp_path / "run"),
                      max_steps=4, batch_size=4, lr=2e-2, lr_projector=2e-2, warmup=0.0, quantize="4", lora_rank=4,
                      lora_alpha=8)
    Trainer(cfg, log=lambda m: None).train()
    ckpt = tmp_path / "run" / "checkpoint"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "convert/to_gguf.py", "--model", str(d), "--adapter", str(ckpt), "--out",
                        str(tmp_path / "gguf")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "gguf").iterdir())
    assert files == ["mmproj-student-F16.gguf", "student-F16.gguf"]
    model, proc = load(d, adapter=ckpt)  # the 4-bit base + LoRA, unfused, in MLX
    img = data.parent / "images" / "0_3.png"
    with LlamaCppRunner(tmp_path / "gguf" / "student-F16.gguf", tmp_path / "gguf" / "mmproj-student-F16.gguf") as run:
        for p in ("What colour is the shape?", "Which shape is it?"):
            res = generate(model, proc, p, image=str(img), max_tokens=12)
            ids = proc.prompt_ids(p, with_image=True)
            eos = sorted(proc.tokenizer.eos_token_ids)
            got = run.greedy(ids, 12, image=proc.image_processor.resized(img),
                             image_token_id=model.config.image_token_index, stop=eos)
            assert [t for t in got if t not in eos] == res.token_ids, p
    mx.clear_cache()


def _export_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "bonsai_mlx", "export", "--format", "gguf", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("field,value,named", [
    ("vision_config.model_type", "clip_vision_model", "vision_config.model_type"),
    ("vision_config.hidden_act", "quick_gelu", "vision_config.hidden_act"),
    ("projector_hidden_act", "relu", "projector_hidden_act"),
    ("vision_feature_layer", [-2, -1], "vision_feature_layer"),
    ("vision_feature_select_strategy", "default", "vision_feature_select_strategy"),
    ("text_config.model_type", "llama", "text_config.model_type"),
])
def test_unsupported_checkpoints_are_refused_in_one_line_and_nothing_is_written(tmp_path, tokenizer, field, value,
                                                                                 named):
    d, _ = build_llava(tmp_path / "student", tokenizer, projector_hidden_act="gelu_pytorch_tanh")
    cfg = json.loads((d / "config.json").read_text())
    node, key = (cfg, field) if "." not in field else (cfg[field.split(".")[0]], field.split(".")[1])
    node[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    r = _export_cli("--model", str(d), "--out", str(out))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_export_cli_flags_and_the_erf_gelu_warning(tmp_path, tokenizer):
    d, _ = build_llava(tmp_path / "student", tokenizer)  # llava-hf's default exact-erf projector GELU
    r = _export_cli("--model", str(d), "--out", str(tmp_path / "a"), "--type", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "projector_hidden_act is 'gelu'" in r.stderr and (tmp_path / "a" / "student-Q8_0.gguf").exists()
    r = _export_cli("--model", str(d), "--out", str(tmp_path / "a"))
    assert r.returncode != 0 and "--force" in r.stderr  # an existing export is not overwritten silently
    r = _export_cli("--model", str(d), "--out", str(tmp_path / "b"), "--dtype", "float16")
    assert r.returncode != 0 and "--dtype" in r.stderr and not (tmp_path / "b").exists()
    r = _export_cli("--model", str(d), "--out", str(tmp_path / "c"), "--type", "q4_k")
    assert r.returncode != 0 and "q4_k" in r.stderr
