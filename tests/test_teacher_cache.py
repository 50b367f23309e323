"""The teacher bridge: alignment, build → verify → read back, resume after a kill, torchrun, plan."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_llava, build_teacher, make_shapes_data, train_llama_tokenizer
from safetensors.numpy import load_file

from bonsai_mlx.prompting import encode_example, parse_turns
from teacher_cache.align import align
from teacher_cache.format import CacheReader
from teacher_cache.prompt import vicuna_text

ANSWERS = {
    "ascii": "A red square.",
    "leading_spaces": "   three spaces first, then  two",
    "newlines": "line one\n\n\nline four\n",
    "cjk": "这是一个红色的正方形。猫",
    "emoji": "red 🍎 and green 🍏🍏 done",
}


@pytest.fixture(scope="module")
def llama_tok():
    return train_llama_tokenizer(extra_corpus=list(ANSWERS.values()))


@pytest.mark.parametrize("kind", list(ANSWERS))
def test_alignment_pairs_tokens_that_end_at_the_same_character(tokenizer, llama_tok, kind):
    rec = {"id": kind, "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": ANSWERS[kind]},
        {"from": "human", "value": "And?"}, {"from": "gpt", "value": ANSWERS[kind][::-1]}]}
    ex = encode_example(tokenizer, rec, image_seq_length=4)
    turns, _ = parse_turns(rec)
    ttext, tspans = vicuna_text(turns, 9)
    tenc = llama_tok(ttext, add_special_tokens=True, return_offsets_mapping=True)
    assert [ttext[s:e] for s, e in tspans] == [ex.text[s:e] for s, e in ex.spans]  # same answers on both sides
    s_pos, t_pos, n_resp = align(ex.offsets, ex.spans, tenc["offset_mapping"], tspans)
    assert 0 < len(s_pos) <= n_resp
    coverage = len(s_pos) / n_resp
    assert 0 < coverage <= 1
    for sp, tp in zip(s_pos, t_pos, strict=True):
        s_end, t_end = ex.offsets[sp][1], tenc["offset_mapping"][tp][1]
        turn = next(i for i, (a, b) in enumerate(ex.spans) if a < s_end <= b)
        # both tokens end at the same character of the same answer: both models have read the same text
        assert s_end - ex.spans[turn][0] == t_end - tspans[turn][0]
        assert ex.text[ex.spans[turn][0]:s_end] == ttext[tspans[turn][0]:t_end]
    # monotone and unique
    assert s_pos == sorted(set(s_pos)) and t_pos == sorted(set(t_pos))
    # the last character of every answer is a common token end
    for turn in range(len(ex.spans)):
        assert any(ex.offsets[sp][1] == ex.spans[turn][1] for sp in s_pos)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer, llama_tok):
    root = tmp_path_factory.mktemp("teacher")
    student, _ = build_llava(root / "student", tokenizer, seed=1)
    teacher, hf_teacher = build_teacher(root / "teacher", llama_tok)
    data = make_shapes_data(root / "data", 10)
    return root, student, teacher, hf_teacher, data


def run_tc(*args, env=None, launcher=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    cmd = (launcher or [sys.executable, "-m"]) + ["teacher_cache", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=600)


def build_args(world, out, *extra):
    root, student, teacher, _, data = world
    return ["build", "--teacher", str(teacher), "--student-tokenizer", str(student), "--data", str(data),
            "--image-root", str(data.parent / "images"), "--out", str(out), "--layers", "1 3", "--image-states",
            "--batch-size", "3", "--shard-size", "8KB", "--device", "cpu", *extra]


def test_build_verify_and_values_equal_the_teacher(world, tmp_path):
    root, student, teacher, hf_teacher, data = world
    out = tmp_path / "cache"
    r = run_tc(*build_args(world, out))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_tc("verify", str(out))
    assert r.returncode == 0 and r.stdout.startswith("ok: 10 samples"), r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert len(man["shards"]) >= 3 and man["hidden_size"] == 48 and man["image_pool_grid"] == [4, 4]
    assert 0 < man["coverage"] <= 1 and man["dtype"] == "float16"
    assert man["student_tokenizer"]["sha256"] and man["dataset_sha256"] and man["prompt_template_version"]

    # recompute one record with the transformers teacher and compare with what the cache holds
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from teacher_cache.records import frame_image, prepare, student_side

    st = student_side(str(student))
    ttok = AutoTokenizer.from_pretrained(str(teacher))
    proc = AutoImageProcessor.from_pretrained(str(teacher))
    rec = json.loads(data.read_text())[4]
    p = prepare(4, rec, st, ttok, 36, hf_teacher.config.image_token_id)
    img = frame_image(Image.open(data.parent / "images" / rec["image"]), "resize", 48, proc.image_mean)
    pix = proc(images=img, do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hs = hf_teacher(input_ids=torch.tensor([p.teacher_ids]), pixel_values=pix, output_hidden_states=True).hidden_states
    reader = CacheReader(out)
    got = reader.get(4)
    assert got["positions"].tolist() == p.student_positions
    for k in (1, 3):
        want = hs[k][0, p.teacher_positions].numpy()
        assert np.abs(got["text"][k] - want).max() <= 1e-3
        img_pos = [i for i, t in enumerate(p.teacher_ids) if t == hf_teacher.config.image_token_id]
        grid = hs[k][0, img_pos].reshape(6, 6, -1).permute(2, 0, 1)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (4, 4)).flatten(1).T.numpy()
        assert np.abs(got["image"][k] - pooled).max() <= 1e-3
    # the student positions are the student trainer's own positions of those answer tokens
    ex = encode_example(st.tokenizer, rec, st.image_tokens)
    assert all(ex.labels_mask[i] for i in p.student_positions)

    # stats: per-channel mean/std over the cached text tokens
    stats = load_file(str(out / "stats.safetensors"))
    allk = np.concatenate([reader.get(i)["text"][3] for i in range(10)])
    assert np.abs(stats["mean.L3"] - allk.mean(0)).max() <= 1e-3
    assert np.abs(stats["std.L3"] - allk.std(0)).max() <= 1e-3

    # readable by MLX too (no torch, no pickle)
    import mlx.core as mx

    sh = mx.load(str(out / man["shards"][0]["file"]))
    assert sh["text.L1"].dtype == mx.float16 and sh["text_offsets"].dtype == mx.int64

    # plan's estimate is within 5% of what build wrote
    r = run_tc("plan", "--data", str(data), "--layers", "1 3", "--image-states", "--teacher", str(teacher),
               "--student-tokenizer", str(student), "--shard-size", "8KB")
    assert r.returncode == 0, r.stderr
    est = int(r.stdout.split("total: ")[1].split(" bytes")[0].replace(",", ""))
    written = sum((out / s["file"]).stat().st_size for s in man["shards"])
    assert abs(est - written) / written <= 0.05, (est, written)

    # a corrupted shard is caught
    f = out / man["shards"][1]["file"]
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF
    f.write_bytes(bytes(raw))
    r = run_tc("verify", str(out))
    assert r.returncode == 1 and "sha256" in r.stderr


def test_killed_build_resumes_to_identical_shards(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_tc(*build_args(world, a)).returncode == 0
    r = run_tc(*build_args(world, b), env={"TEACHER_CACHE_KILL_AFTER_SHARDS": "1"})
    assert r.returncode == -9
    assert not (b / "manifest.json").exists() and len(list(b.glob("shard-*.safetensors"))) == 1
    r = run_tc(*build_args(world, b))
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr[-2000:]
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert [s["file"] for s in ma["shards"]] == [s["file"] for s in mb["shards"]]
    for s in ma["shards"]:
        assert (a / s["file"]).read_bytes() == (b / s["file"]).read_bytes(), s["file"]
    assert json.loads((a / "index.json").read_text()) == json.loads((b / "index.json").read_text())
    # a different setting in the same --out is refused
    r = run_tc(*build_args(world, b)[:-2], "--device", "cpu", "--dtype", "int8")
    assert r.returncode == 1 and "dtype" in r.stderr


def test_torchrun_two_ranks_equal_one_process(world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_tc(*build_args(world, one)).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                "-m"]
    r = run_tc(*build_args(world, two), launcher=torchrun)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_tc("verify", str(two)).returncode == 0
    r1, r2 = CacheReader(one), CacheReader(two)
    assert set(r1.index) == set(r2.index) == set(range(10))
    assert {s["file"] for s in r2.manifest["shards"]} & {"shard-00000.safetensors", "shard-00001.safetensors"}
    for i in range(10):
        x, y = r1.get(i), r2.get(i)
        assert np.array_equal(x["positions"], y["positions"])
        for k in (1, 3):
            assert np.abs(x["text"][k] - y["text"][k]).max() <= 1e-3
            assert np.abs(x["image"][k] - y["image"][k]).max() <= 1e-3


def test_teacher_tool_never_imports_mlx():
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name == 'mlx' or name.startswith(('mlx.', 'mlx_lm')):\n"
        "        raise ImportError('no mlx on this box')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import teacher_cache.cli, teacher_cache.build, teacher_cache.format, teacher_cache.planning\n"
        "assert not any(m == 'mlx' or m.startswith('mlx.') for m in sys.modules)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
