"""GGUF export (export/gguf.py) proven in llama.cpp itself, through llama-cpp-python, against transformers on the
`to_hf.py` export: the F32 GGUF equals it to float32 rounding (text), with the mmproj to ggml's GELU table (images,
one non-square), the F16 GGUF as llama.cpp users run it within a stated bound, Q8_0 / Q4_0 within stated bounds of
F16, a QLoRA adapter fused like `generate --adapter`, bad input refused in one line.

Tolerances (all relative to the logits' scale, max |logit|; measured on these tiny random students, noise 0.1 —
enough that greedy outputs vary: ~30 distinct top-1 tokens over the prompts' 158 positions):
- `--type f32` in the runner's exact mode (F32 KV cache, no flash attention): the text path is float32 arithmetic
  in another order — measured 1e-6, bound `EXACT_TOL` 1e-4. With an image, ggml's GELU (tower and projector) reads
  an F16 table, so the image features differ by ~1e-3 (measured 0.1%, correlation 0.9999995) and the logits by
  0.06%: bound `IMAGE_TOL` 0.5%.
- `--type f16` with llama.cpp's defaults: F16 weights, activations rounded to F16 in the matmuls, an F16 KV cache
  and flash attention — ~1e-3 per layer; measured up to 1.2% at single positions: bound `F16_TOL` 3%.
Greedy tokens must be equal wherever the reference's choice is not a near-tie: a step whose top-2 gap in the
reference logits is within 4× the measured prefill error may go either way, so the comparison of that sequence
stops there — and at least `MIN_COMPARED` of all tokens must have been compared, so it cannot pass by stopping early.
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

EXACT_TOL, IMAGE_TOL, F16_TOL = 1e-4, 5e-3, 3e-2  # max |Δlogit| / max |logit| (module docstring)
MIN_COMPARED = 0.75
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
    """transformers' greedy `n` tokens (and a second value kept for call sites: the prompt length)."""
    with torch.no_grad():
        kw = {"pixel_values": torch.from_numpy(pixel_values.transpose(0, 3, 1, 2))} if pixel_values is not None else {}
        gen = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **kw)
    return gen[0, len(ids):].tolist(), len(ids)


def eos_ids(hf):
    e = hf.generation_config.eos_token_id
    return [e] if isinstance(e, int) else list(e)


class Agreement:
    """Greedy tokens step by step (module docstring): on the reference's greedy sequence, at every step our argmax
    must be its token unless its top-2 gap is within 2× our |Δlogit| at that very step (the flip is then explained by
    the measured error); such explained flips stay under 1 - `MIN_COMPARED` of all steps. `check()` at the end."""

    def __init__(self, suppress):
        self.steps = self.flips = 0
        self.suppress = list(suppress)  # EOS ids, which transformers' min_new_tokens masks

    def add(self, ours, ref, ref_tokens, what):
        """`ours`, `ref`: [n, V] logits at the n generation steps of `ref_tokens` (teacher-forced)."""
        ours, ref = ours.copy(), ref.copy()
        ours[:, self.suppress] = ref[:, self.suppress] = -np.inf
        for i, tok in enumerate(ref_tokens):
            self.steps += 1
            if int(np.argmax(ours[i])) == tok:
                continue
            top2 = np.sort(ref[i])[-2:]
            keep = np.isfinite(ref[i])
            assert top2[1] - top2[0] <= 2 * np.abs(ours[i] - ref[i])[keep].max(), (what, i)  # an unexplained flip
            self.flips += 1

    def check(self):
        assert self.flips <= (1 - MIN_COMPARED) * self.steps, (self.flips, self.steps)



@pytest.fixture(scope="module", params=[(True, -1), (False, -2)], ids=["tied-layer-1", "untied-layer-2"])
def student(request, tmp_path_factory, tokenizer):
    tie, layer = request.param
    root = tmp_path_factory.mktemp("gguf")
    d, _ = build_llava(root / "student", tokenizer, vision_feature_layer=layer, tie=tie, seed=11, noise=0.1,
                       projector_hidden_act="gelu_pytorch_tanh")
    hf_dir = export_hf(str(d), root / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    ggufs = {t: export_gguf(str(d), root / t, type_=t, log=lambda m: None) for t in ("f32", "f16", "q8_0", "q4_0")}
    return d, hf, ggufs, tokenizer


def images(tmp_path):
    rng = np.random.default_rng(3)
    out = []
    for i, (w, h) in enumerate(((32, 32), (64, 64), (48, 32))):  # the last is non-square: stretched, as SigLIP
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        out.append(tmp_path / f"{i}.png")
    return out


def check_text(run, hf, tok, tol):
    """Every position's logits within `tol` of transformers', over the prompt and its 20 greedy tokens; greedy
    agreement step by step (`Agreement`)."""
    agree = Agreement(eos_ids(hf))
    for p in PROMPTS:
        _, ids = chat_ids(tok, p, image=False, n_image=0)
        ref_tokens, _ = hf_greedy(hf, ids)
        full = ids + ref_tokens
        run.prefill(full)
        ours = np.asarray(run.llm.scores[: len(full)], np.float32)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([full])).logits[0].numpy()
        err = np.abs(ours - ref).max()
        assert err <= tol * np.abs(ref).max(), (p, err)
        n = len(ids) - 1
        agree.add(ours[n : n + len(ref_tokens)], ref[n : n + len(ref_tokens)], ref_tokens, p)
    agree.check()
    return agree


def test_f32_text_gguf_equals_transformers(student):
    d, hf, ggufs, tok = student
    with LlamaCppRunner(ggufs["f32"]["model"], logits_all=True, exact=True) as run:
        for p in PROMPTS:
            text, ids = chat_ids(tok, p, image=False, n_image=0)
            # llama.cpp's own tokenizer (gpt2 BPE + qwen2 pre-tokenizer, from the GGUF) gives our ids
            assert run.llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        check_text(run, hf, tok, EXACT_TOL)
    with LlamaCppRunner(ggufs["f32"]["model"], exact=True) as run:  # free-running greedy: the very same tokens
        for p in PROMPTS:
            _, ids = chat_ids(tok, p, image=False, n_image=0)
            assert run.greedy(ids, 20, suppress=eos_ids(hf)) == hf_greedy(hf, ids)[0], p


def test_f16_text_gguf_as_llama_cpp_runs_it(student):
    d, hf, ggufs, tok = student
    with LlamaCppRunner(ggufs["f16"]["model"], logits_all=True) as run:
        check_text(run, hf, tok, F16_TOL)


@pytest.mark.parametrize("kind,tol,exact", [("f32", IMAGE_TOL, True), ("f16", F16_TOL, False)])
def test_image_gguf_gives_transformers_greedy_tokens(student, tmp_path, kind, tol, exact):
    d, hf, ggufs, tok = student
    proc = ImageProcessor.from_pretrained(d, default_size=32)
    n_img = hf.config.image_seq_length
    agree = Agreement(eos_ids(hf))
    image_id = hf.config.image_token_index
    with LlamaCppRunner(ggufs[kind]["model"], ggufs[kind]["mmproj"], logits_all=True, exact=exact) as run:
        for img, p in zip(images(tmp_path), PROMPTS, strict=False):
            _, ids = chat_ids(tok, p, image=True, n_image=n_img)
            pix = proc([img])
            ref_tokens, _ = hf_greedy(hf, ids, pix)
            full = ids + ref_tokens
            run.prefill(full, image=proc.resized(img), image_token_id=image_id)
            with torch.no_grad():
                ref = hf(input_ids=torch.tensor([full]),
                         pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2))).logits[0].numpy()
            n = len(ids) - 1
            ours = np.asarray(run.llm.scores[n : n + len(ref_tokens)], np.float32)  # the text after the image
            ref = ref[n : n + len(ref_tokens)]
            err = np.abs(ours - ref).max()
            assert err <= tol * np.abs(ref).max(), (img.name, err)
            agree.add(ours, ref, ref_tokens, (img.name, p))
    agree.check()


def test_q8_0_and_q4_0_stay_within_bounds_of_f16(student):
    """Over every position of the prompts, against F16 in llama.cpp: the relative RMS logit error, the top-1
    agreement and the mean per-position correlation. Justification: Q8_0's weights are off by 0.5% RMS and Q4_0's
    by 8.5% (block-of-32 absmax scales on Gaussian weights; read back from the files in the next test), llama.cpp
    also rounds the activations to Q8_0 for these products, and these tiny random students amplify an input error
    a few times into the logits. Measured on 4 students (tied/untied, 3 seeds): Q8_0 2.8–3.0% RMS, top-1 0.95–1.0,
    corr 1.000; Q4_0 26–34%, 0.51–0.70, 0.94–0.97. The bounds leave about 2× room for other seeds and fixtures and
    keep Q4_0 far from chance (top-1 1/448)."""
    d, hf, ggufs, tok = student
    logits = {}
    for t in ("f16", "q8_0", "q4_0"):
        with LlamaCppRunner(ggufs[t]["model"], logits_all=True) as run:
            rows = []
            for p in PROMPTS:
                _, ids = chat_ids(tok, p, image=False, n_image=0)
                run.prefill(ids)
                rows.append(np.asarray(run.llm.scores[: len(ids)], np.float32))
            logits[t] = np.concatenate(rows)
    f = logits["f16"]
    stats = {}
    for t in ("q8_0", "q4_0"):
        q = logits[t]
        stats[t] = (float(np.sqrt(((q - f) ** 2).mean() / (f ** 2).mean())), float((q.argmax(1) == f.argmax(1)).mean()),
                    float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(q, f, strict=True)])))
    (r8, t8, c8), (r4, t4, c4) = stats["q8_0"], stats["q4_0"]
    assert 0 < r8 <= 0.08 and t8 >= 0.85 and c8 >= 0.995, stats
    assert r8 < r4 <= 0.6 and t4 >= 0.35 and c4 >= 0.85, stats


def test_gguf_weights_read_back_within_their_types_error(student):
    """The stored matrices, dequantized with the gguf package, are the student's weights within each type's
    rounding: F32 exact, F16 ≤ 2^-11 relative, Q8_0 ≤ absmax/254 per 32-block, Q4_0 ≤ absmax/8 (levels -8…7 of absmax/8:
    the extreme opposite the absmax clips by up to one step; absmax/16 elsewhere), plus
    the F16 rounding of the block scale."""
    from gguf import GGUFReader, quants
    from safetensors.numpy import load_file

    d, hf, ggufs, tok = student
    src = {}
    for f in d.glob("*.safetensors"):
        src.update(load_file(str(f)))
    name = {"blk.0.ffn_down.weight": "language_model.model.layers.0.mlp.down_proj.weight",
            "blk.1.attn_q.weight": "language_model.model.layers.1.self_attn.q_proj.weight",
            "blk.1.attn_q.bias": "language_model.model.layers.1.self_attn.q_proj.bias"}
    for t, per_block in (("f32", 0.0), ("f16", None), ("q8_0", 254), ("q4_0", 8)):
        r = GGUFReader(str(ggufs[t]["model"]))
        for x in r.tensors:
            if x.name not in name:
                continue
            w = src[name[x.name]].astype(np.float32)
            got = quants.dequantize(x.data, x.tensor_type).reshape(w.shape)
            if x.name.endswith(".bias") or t == "f32":
                assert np.array_equal(got, w), (t, x.name)
            elif t == "f16":
                assert np.abs(got - w).max() <= np.abs(w).max() * 2.0 ** -11
            else:
                blocks = np.abs(w).reshape(w.shape[0], -1, 32).max(-1, keepdims=True)
                err = np.abs(got - w).reshape(w.shape[0], -1, 32)
                # + the F16 rounding of the block scale itself (≤ 2^-11 of it, times up to 127 resp. 8 steps)
                assert (err <= blocks * (1 / per_block + 2.0 ** -10) + 1e-7).all(), (t, x.name)


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
    model, proc = load(d, adapter=ckpt, pack=False)  # the 4-bit base + LoRA, unfused, in MLX, exact prompts
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


def test_a_bias_free_projector_runs_in_llama_cpp_with_zero_biases(tmp_path, tokenizer):
    """llama.cpp's mlp projector adds mm.0/mm.2 biases unconditionally: a bias-free projector is written with zero
    biases, and llama.cpp then matches transformers on an image prompt (F32 files, exact mode)."""
    d, _ = build_llava(tmp_path / "student", tokenizer, seed=3, noise=0.1, projector_hidden_act="gelu_pytorch_tanh",
                       projector_bias=False)
    hf = LlavaForConditionalGeneration.from_pretrained(str(export_hf(str(d), tmp_path / "hf"))).eval()
    assert hf.config.multimodal_projector_bias is False
    g = export_gguf(str(d), tmp_path / "g", type_="f32", log=lambda m: None)
    from gguf import GGUFReader

    biases = {x.name: x.data for x in GGUFReader(str(g["mmproj"])).tensors if x.name in ("mm.0.bias", "mm.2.bias")}
    assert set(biases) == {"mm.0.bias", "mm.2.bias"} and all(not np.any(b) for b in biases.values())
    proc = ImageProcessor.from_pretrained(d, default_size=32)
    img = images(tmp_path)[2]
    _, ids = chat_ids(tokenizer, PROMPTS[0], image=True, n_image=hf.config.image_seq_length)
    with LlamaCppRunner(g["model"], g["mmproj"], exact=True) as run:
        run.prefill(ids, image=proc.resized(img), image_token_id=hf.config.image_token_index)
        ours = run.last_logits()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]),
                 pixel_values=torch.from_numpy(proc([img]).transpose(0, 3, 1, 2))).logits[0, -1].numpy()
    assert np.abs(ours - ref).max() <= IMAGE_TOL * np.abs(ref).max()
