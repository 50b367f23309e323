"""`--phase pretrain` (LLaVA's stage 1: the projector alone) and `--projector-from` (SFT/HSD start from its projector)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_llava, make_shapes_data
from mlx.utils import tree_flatten

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.train.config import TrainConfig
from bonsai_mlx.train.trainer import Trainer

KILL = Path(__file__).with_name("kill_after.py")


def cli(*args, kill_after=None):
    head = [str(KILL), str(kill_after)] if kill_after else ["-m", "bonsai_mlx.cli"]
    return subprocess.run([sys.executable, *head, *args], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("pretrain")
    student, _ = build_llava(root / "student", tokenizer, seed=1, noise=0.1)
    data = make_shapes_data(root / "data", 32)
    return root, student, data


def test_pretrain_trains_only_the_projector_and_sft_starts_from_it(setup):
    root, student, data = setup
    cfg = TrainConfig(phase="pretrain", model=str(student), data=str(data), image_root=str(data.parent / "images"),
                      out=str(root / "pre"), max_steps=30, batch_size=4, seed=0)
    t = Trainer(cfg, log=lambda m: None)
    before = {k: np.array(v) for k, v in tree_flatten(t.model.parameters())}
    trainable = [k for k, _ in tree_flatten(t.model.trainable_parameters())]
    assert trainable and all(k.startswith("multi_modal_projector.") for k in trainable), trainable
    t.train()
    ms = metrics(root / "pre")
    # LLaVA-1.5's stage-1 schedule: peak 1e-3 after a 3% warmup, cosine to 0
    assert max(m["lr_projector"] for m in ms) == pytest.approx(1e-3, rel=1e-6)
    assert ms[0]["lr_projector"] < 1e-3 and ms[-1]["lr_projector"] < 1e-4
    after = {k: np.array(v) for k, v in tree_flatten(t.model.parameters())}
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed and all(k.startswith("multi_modal_projector.") for k in changed), changed
    assert set(changed) == {k for k in before if k.startswith("multi_modal_projector.")}
    ck = root / "pre" / "checkpoint"
    assert (ck / "projector.safetensors").exists()
    assert not (ck / "adapters.safetensors").exists() and not (ck / "weights.safetensors").exists()

    # SFT from the pretrained projector: its projector starts at exactly those weights (the run dir or checkpoint/)
    saved = mx.load(str(ck / "projector.safetensors"))
    for ref in (root / "pre", ck):
        sft = Trainer(TrainConfig(phase="sft", model=str(student), data=str(data),
                                  image_root=str(data.parent / "images"), out=str(root / f"sft_{ref.name}"),
                                  max_steps=1, batch_size=4, projector_from=str(ref)), log=lambda m: None)
        own = dict(tree_flatten(sft.model.multi_modal_projector.parameters()))
        assert own and all(mx.array_equal(v, saved[f"multi_modal_projector.{k}"]).item() for k, v in own.items())
        assert any(k.endswith("lora_b") for k, _ in tree_flatten(sft.model.trainable_parameters()))
    # without it, SFT starts from the model's own projector
    plain = Trainer(TrainConfig(phase="sft", model=str(student), data=str(data),
                                image_root=str(data.parent / "images"), out=str(root / "sft_plain"), max_steps=1,
                                batch_size=4), log=lambda m: None)
    own = dict(tree_flatten(plain.model.multi_modal_projector.parameters()))
    assert all(np.array_equal(np.array(v), before[f"multi_modal_projector.{k}"]) for k, v in own.items())

    with pytest.raises(BonsaiError, match="projector-from"):
        TrainConfig(phase="sft", model=str(student), data=str(data), out=str(root / "x"),
                    projector_from=str(root / "nowhere")).validate()
    with pytest.raises(BonsaiError, match="projector alone"):
        TrainConfig(phase="pretrain", model=str(student), data=str(data), out=str(root / "x"),
                    train_vision=True).validate()


def test_pretrain_loss_falls_and_resumes_exactly_after_kill(setup):
    root, student, data = setup
    common = ["train", "--phase", "pretrain", "--model", str(student), "--data", str(data), "--image-root",
              str(data.parent / "images"), "--max-steps", "60", "--batch-size", "4", "--lr-projector", "1e-2",
              "--save-every", "20", "--seed", "1"]
    a, b = root / "run_a", root / "run_b"
    r = cli(*common, "--out", str(a))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"--projector-from {a}" in r.stderr  # the next stage's flag, named where the run ends
    ma = metrics(a)
    start, end = np.mean([m["loss"] for m in ma[:5]]), np.mean([m["loss"] for m in ma[-10:]])
    assert end < 0.9 * start, (start, end)  # 6.22 → 4.83 (0.78) where written: the projector alone moves slowly

    r = cli(*common, "--out", str(b), kill_after=50)
    assert r.returncode == -9
    assert json.loads((b / "checkpoint" / "trainer_state.json").read_text())["step"] == 40
    r = cli("train", "--out", str(b), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    mb = metrics(b)
    assert [m["step"] for m in mb] == list(range(1, 61))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(ma, mb, strict=True)) <= 1e-6
    wa, wb = (mx.load(str(d / "checkpoint" / "projector.safetensors")) for d in (a, b))
    assert set(wa) == set(wb) and all(mx.array_equal(wa[k], wb[k]).item() for k in wa)

    # the pretrain checkpoint generates as an --adapter (projector only, no LoRA)
    image = str(data.parent / "images" / json.loads(data.read_text())[0]["image"])
    r = cli("generate", "--model", str(student), "--adapter", str(a / "checkpoint"), "--image", image, "--prompt",
            "What colour is the shape?", "--max-tokens", "2", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads(r.stdout)["token_ids"]) >= 1
