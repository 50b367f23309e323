"""Phase hsd: α=0 is SFT, distillation learns, the loss equals its formula, mismatched caches are refused,
resume is exact."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_llava, build_teacher, make_shapes_data, train_llama_tokenizer
from mlx.utils import tree_flatten

from bonsai_mlx.train.config import TrainConfig
from bonsai_mlx.train.distill import AlignProjectors, TargetBuilder, distill_terms
from bonsai_mlx.train.trainer import Trainer

KILL = Path(__file__).with_name("kill_after.py")  # runs the CLI, SIGKILLed after a given optimizer step


def cli(*args, env=None, module="bonsai_mlx.cli", kill_after=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    head = [str(KILL), str(kill_after)] if kill_after else ["-m", module]
    return subprocess.run([sys.executable, *head, *args], capture_output=True, text=True, env=e, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("hsd")
    student, _ = build_llava(root / "student", tokenizer, seed=1, noise=0.1)
    teacher, _ = build_teacher(root / "teacher", train_llama_tokenizer())
    data = make_shapes_data(root / "data", 16)
    cache = build_cache(teacher, student, data, root / "cache")
    return root, student, data, cache, teacher


def build_cache(teacher, student, data, cache):
    r = subprocess.run([sys.executable, "-m", "teacher_cache", "build", "--teacher", str(teacher),
                        "--student-tokenizer", str(student), "--data", str(data), "--image-root",
                        str(data.parent / "images"), "--out", str(cache), "--layers", "2 3", "--image-states",
                        "--image-layers", "2", "--device", "cpu", "--batch-size", "8"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return cache


@pytest.fixture(scope="module")
def mixed(world):
    """The same pictures with text-only records among them, as the 665k mix has ShareGPT's, and its cache."""
    root, student, data, _, teacher = world
    records = json.loads(data.read_text())
    for k in range(6):
        records.insert(3 * k + 1, {"id": f"text-{k}", "conversations": [
            {"from": "human", "value": f"Name colour number {k}."},
            {"from": "gpt", "value": ["red", "green", "blue"][k % 3]}]})
    mixed_data = data.with_name("mixed.json")
    mixed_data.write_text(json.dumps(records))
    return root, student, mixed_data, build_cache(teacher, student, mixed_data, root / "cache_mixed"), teacher


def cfg(world, out, **kw):
    root, student, data, cache, _ = world
    base = dict(model=str(student), data=str(data), image_root=str(data.parent / "images"), out=str(out),
                batch_size=4, lr=3e-3, lr_projector=3e-3, seed=2, max_steps=6)
    base.update(kw)
    return TrainConfig(**base)


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_alpha_zero_reproduces_sft_exactly(mixed, tmp_path):
    """On data mixing text-only and image records (the image term counted over the image records only)."""
    _, _, _, cache, _ = mixed
    Trainer(cfg(mixed, tmp_path / "sft"), log=lambda m: None).train()
    Trainer(cfg(mixed, tmp_path / "hsd", phase="hsd", teacher_cache=str(cache), alpha=0.0),
            log=lambda m: None).train()
    a, b = metrics(tmp_path / "sft"), metrics(tmp_path / "hsd")
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    assert all(x["l_text"] > 0 for x in b)  # the distillation terms were computed, with weight 0
    for f in ("adapters.safetensors", "projector.safetensors"):
        wa, wb = (mx.load(str(tmp_path / r / "checkpoint" / f)) for r in ("sft", "hsd"))
        assert set(wa) == set(wb) and all(mx.array_equal(wa[k], wb[k]).item() for k in wa), f
    assert (tmp_path / "hsd" / "checkpoint" / "align.safetensors").exists()


def test_image_states_cache_keeps_text_only_records(mixed):
    from safetensors.numpy import load_file

    _, _, data, cache, _ = mixed
    records = json.loads(data.read_text())
    text_only = [i for i, r in enumerate(records) if "image" not in r]
    man = json.loads((cache / "manifest.json").read_text())
    index = json.loads((cache / "index.json").read_text())
    assert man["image_layers"] == [2] and man["num_samples"] == len(records) and not man["failed"]
    for i in range(len(records)):
        name, row = index[str(i)]
        t = load_file(str(cache / name))
        a, b = t["text_offsets"][row : row + 2]
        assert b > a and t["text.L3"][a:b].shape == (b - a, man["hidden_size"])  # text states for every record
        img_row = t["image_rows"][row]
        assert (img_row == -1) == (i in text_only)  # an image row only where there is an image
        if img_row >= 0:
            assert t["image.L2"].shape[0] == int((t["image_rows"] >= 0).sum())
    r = cli("verify", str(cache), module="teacher_cache")
    assert r.returncode == 0, r.stdout + r.stderr


def test_hsd_lowers_l_text_while_ce_falls(world, tmp_path):
    _, _, _, cache, _ = world
    out = tmp_path / "run"
    Trainer(cfg(world, out, phase="hsd", teacher_cache=str(cache), alpha=0.5, max_steps=200, lr_align=3e-3),
            log=lambda m: None).train()
    m = metrics(out)
    first = lambda k: np.mean([x[k] for x in m[:5]])  # noqa: E731
    final = lambda k: np.mean([x[k] for x in m[-10:]])  # noqa: E731
    assert final("l_text") < 0.5 * first("l_text"), (first("l_text"), final("l_text"))
    assert final("ce") < first("ce")
    assert final("l_img") < first("l_img")
    assert 0 < m[-1]["coverage"] <= 1 and m[-1]["aligned_pairs"] > 0
    r = cli("plot", str(out))
    assert r.returncode == 0


class FakeCache:
    def __init__(self, entries, stats, D):
        self.entries, self.stats, self.hidden_size = entries, stats, D

    def get(self, i, text_layers, image_layers):
        return self.entries[i]


class S:
    def __init__(self, index, image_path=None):
        self.index, self.image_path, self.record_id = index, image_path, str(index)


def test_l_text_equals_numpy_reference():
    rng = np.random.default_rng(0)
    B, T, d, D = 2, 7, 8, 12
    entries = {
        0: {"positions": np.array([1, 3, 6]), "text": {5: rng.standard_normal((3, D)).astype(np.float32)}, "image": {}},
        1: {"positions": np.array([0, 2, 4, 9]), "text": {5: rng.standard_normal((4, D)).astype(np.float32)},
            "image": {}},  # position 9 is past T: dropped (truncation)
    }
    stats = {"mean.L5": rng.standard_normal(D).astype(np.float32),
             "std.L5": (rng.random(D) + 0.5).astype(np.float32)}
    tb = TargetBuilder(FakeCache(entries, stats, D), [(2, 5)], None, image_token_id=99)
    extra = tb([S(0), S(1)], np.zeros((B, T), np.int32))
    assert extra["text_index"].shape == (64,) and extra["text_weight"].sum() == 6

    hidden = [mx.array(rng.standard_normal((B, T, d)).astype(np.float32)) for _ in range(3)]

    class M:
        pass

    m = M()
    m.align = AlignProjectors(d, D, [(2, 5)], None)
    lt, li = distill_terms(m, hidden, {k: mx.array(v) for k, v in extra.items()}, [(2, 5)], None)
    got = float(lt) / float(extra["text_weight"].sum())

    W, b = np.array(m.align.text["s2_t5"].weight), np.array(m.align.text["s2_t5"].bias)
    h = np.array(hidden[2])
    errs = []
    for r, e in entries.items():
        for p, t in zip(e["positions"], e["text"][5], strict=True):
            if p >= T:
                continue
            z = (t - stats["mean.L5"]) / stats["std.L5"]
            errs.append(((h[r, p] @ W.T + b - z) ** 2).sum() / D)
    assert abs(got - np.mean(errs)) <= 1e-5 and float(li) == 0.0


def test_no_standardize_gives_the_raw_teacher_states():
    rng = np.random.default_rng(1)
    D = 6
    x = rng.standard_normal((3, D)).astype(np.float32) * 5 + 2
    img = rng.standard_normal((2, D)).astype(np.float32) * 3
    entries = {0: {"positions": np.array([0, 1, 2]), "text": {4: x}, "image": {4: img}}}
    stats = {"mean.L4": np.full(D, 2.0, np.float32), "std.L4": np.full(D, 5.0, np.float32)}
    ids = np.array([[1, 99, 99, 3]], np.int32)
    args = (FakeCache(entries, stats, D), [(1, 4)], (1, 4))
    z = TargetBuilder(*args, image_token_id=99)([S(0, "a.png")], ids)
    raw = TargetBuilder(*args, image_token_id=99, standardize=False)([S(0, "a.png")], ids)
    np.testing.assert_allclose(raw["text_target_0"][:3], x)
    np.testing.assert_allclose(raw["image_target"], img)
    np.testing.assert_allclose(z["text_target_0"][:3], (x - 2) / 5, rtol=1e-6)
    np.testing.assert_allclose(z["image_target"], (img - 2) / 5, rtol=1e-6)


def test_mismatched_cache_is_refused(world, tmp_path, tokenizer):
    root, student, data, cache, _ = world
    other = tmp_path / "other.json"
    recs = json.loads(data.read_text())
    other.write_text(json.dumps(recs[:-1]))
    args = ["train", "--phase", "hsd", "--teacher-cache", str(cache), "--model", str(student), "--image-root",
            str(data.parent / "images"), "--out", str(tmp_path / "r"), "--max-steps", "1"]
    r = cli(*args, "--data", str(other))
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "dataset_sha256" in lines[0], r.stderr

    from bonsai_mlx.pico import train_tokenizer

    other_student = tmp_path / "student2"
    shutil.copytree(student, other_student)
    train_tokenizer(corpus=["a different corpus for a different tokenizer"] * 3).save_pretrained(str(other_student))
    r = cli(*[a if a != str(student) else str(other_student) for a in args], "--data", str(data))
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "student_tokenizer.sha256" in lines[0], r.stderr

    r = cli(*args, "--data", str(data), "--text-layers", "2:1")
    assert r.returncode == 1 and "has [2, 3]" in r.stderr


def test_hsd_resume_after_kill_is_exact(world, tmp_path):
    root, student, data, cache, _ = world
    common = ["train", "--phase", "hsd", "--teacher-cache", str(cache), "--model", str(student), "--data", str(data),
              "--image-root", str(data.parent / "images"), "--max-steps", "60", "--batch-size", "4",
              "--save-every", "30", "--seed", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(*common, "--out", str(a)).returncode == 0
    r = cli(*common, "--out", str(b), kill_after=45)
    assert r.returncode == -9
    r = cli("train", "--out", str(b), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    ma, mb = metrics(a), metrics(b)
    assert [x["step"] for x in mb] == list(range(1, 61))
    for k in ("loss", "ce", "l_text", "l_img"):
        assert max(abs(x[k] - y[k]) for x, y in zip(ma, mb, strict=True)) <= 1e-6, k
    for f in ("adapters.safetensors", "projector.safetensors", "align.safetensors"):
        wa, wb = mx.load(str(a / "checkpoint" / f)), mx.load(str(b / "checkpoint" / f))
        assert all(mx.array_equal(wa[k], wb[k]).item() for k in wa), f


def test_hsd_with_full_lm_and_vision_training(world, tmp_path):
    """HSD combines with --train-lm full / --train-vision (the setup of a student that starts random): every
    component trains, the align projectors are saved beside weights.safetensors, and the checkpoint reloads."""
    _, student, _, cache, _ = world
    run = tmp_path / "full"
    t = Trainer(cfg(world, run, phase="hsd", teacher_cache=str(cache), alpha=0.5, quantize="none", train_lm="full",
                    train_vision=True, lora_dropout=0.0, max_steps=4), log=lambda m: None)
    before = {k: np.array(v) for k, v in tree_flatten(t.model.parameters())}
    t.train()
    after = {k: np.array(v) for k, v in tree_flatten(t.model.parameters())}
    for prefix in ("vision_tower.", "language_model.", "multi_modal_projector.", "align."):
        assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    m = metrics(run)
    assert len(m) == 4 and all(np.isfinite(x["l_text"]) and x["l_text"] > 0 for x in m)
    ck = run / "checkpoint"
    assert (ck / "weights.safetensors").exists() and (ck / "align.safetensors").exists()
    saved = mx.load(str(ck / "weights.safetensors"))
    assert not any(k.startswith("align.") for k in saved)
    from bonsai_mlx.io import load

    model, _ = load(student, adapter=ck)
    for k in ("vision_tower.vision_model.embeddings.patch_embedding.weight", "language_model.model.norm.weight"):
        got = dict(tree_flatten(model.parameters()))[k]
        assert np.array_equal(np.array(got), after[k]), k
