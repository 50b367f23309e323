"""Data parallel training with mx.distributed under `mlx.launch` (ring backend on loopback)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_llava, build_teacher, make_shapes_data, train_llama_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("dist")
    student, _ = build_llava(root / "student", tokenizer, seed=1, noise=0.1)
    data = make_shapes_data(root / "data", 16)
    teacher, _ = build_teacher(root / "teacher", train_llama_tokenizer())
    cache = root / "cache"
    r = subprocess.run([sys.executable, "-m", "teacher_cache", "build", "--teacher", str(teacher),
                        "--student-tokenizer", str(student), "--data", str(data), "--image-root",
                        str(data.parent / "images"), "--out", str(cache), "--layers", "3", "--image-states",
                        "--device", "cpu", "--batch-size", "8"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return root, student, data, cache


KILL = Path(__file__).with_name("kill_after.py")  # runs the CLI, SIGKILLed after a given optimizer step


def train(*args, ranks=1, env=None, kill_after=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    head = [str(KILL), str(kill_after)] if kill_after else ["-m", "bonsai_mlx.cli"]
    cmd = [sys.executable, *head, "train", *args]
    if ranks > 1:
        port = str(random.randint(20000, 40000))
        launch = "from mlx._distributed_utils.launch import main; main()"  # what the `mlx.launch` script runs
        cmd = [sys.executable, "-c", launch, "-n", str(ranks), "--backend", "ring", "--starting-port", port, "--",
               *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=600)


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def common(world, *extra, lr="3e-3"):
    root, student, data, cache = world
    return ["--model", str(student), "--data", str(data), "--image-root", str(data.parent / "images"),
            "--max-steps", "12", "--lr", lr, "--lr-projector", lr, "--lr-align", lr, "--seed", "5",
            "--lora-dropout", "0", *extra]  # dropout masks depend on the micro-batch shape: off for equality


def weights(run):
    out = {}
    for f in ("adapters.safetensors", "projector.safetensors", "align.safetensors"):
        if (run / "checkpoint" / f).exists():
            out.update({f"{f}:{k}": np.array(v) for k, v in mx.load(str(run / "checkpoint" / f)).items()})
    return out


@pytest.mark.parametrize("phase", ["sft", "hsd"])
def test_two_ranks_equal_one_process_with_twice_the_batch(world, tmp_path, phase):
    extra = ["--phase", phase] + (["--teacher-cache", str(world[3]), "--alpha", "0.5"] if phase == "hsd" else [])
    one, two = tmp_path / "one", tmp_path / "two"
    # A small lr: Adam turns float-rounding differences of near-zero gradients (sums in another order, other
    # padding) into lr-sized steps; the weights still move ~1e-3 from their start.
    r = train(*common(world, *extra, lr="1e-4"), "--batch-size", "4", "--out", str(one))
    assert r.returncode == 0, r.stderr[-2000:]
    r = train(*common(world, *extra, lr="1e-4"), "--batch-size", "2", "--out", str(two), ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    m1, m2 = metrics(one), metrics(two)
    assert [x["step"] for x in m2] == list(range(1, 13)) and m2[0]["tokens"] == m1[0]["tokens"]
    keys = ["loss", "ce"] + (["l_text", "l_img"] if phase == "hsd" else [])
    for k in keys:
        assert max(abs(a[k] - b[k]) for a, b in zip(m1, m2, strict=True)) <= 1e-5, k
    w1, w2 = weights(one), weights(two)
    assert set(w1) == set(w2)
    assert max(np.abs(w1[k] - w2[k]).max() for k in w1) <= 1e-5
    lora_b = [k for k in w1 if k.endswith("lora_b")]
    assert max(np.abs(w1[k]).max() for k in lora_b) > 5e-4  # trained: B started at zero


def test_killed_two_rank_run_resumes_in_one_process(world, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert train(*common(world), "--batch-size", "4", "--out", str(ref)).returncode == 0
    r = train(*common(world), "--batch-size", "2", "--save-every", "6", "--out", str(run), ranks=2,
              kill_after=9)
    assert "exited with code -9" in r.stderr  # both ranks were killed (mlx.launch itself exits 0)
    st = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert st["global_batch"] == 4 and st["step"] == 6 and len(metrics(run)) == 9
    r = train("--out", str(run), "--resume")  # one process: per-rank batch becomes the global 4
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = metrics(ref), metrics(run)
    assert [x["step"] for x in b] == list(range(1, 13))
    # float32: the ranks pad to their own lengths and sum in another order (relative, not absolute, 1e-5)
    assert max(abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1.0) for x, y in zip(a, b, strict=True)) <= 1e-5
