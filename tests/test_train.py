"""SFT training: learning, exact resume after a kill, what trains, bad records, config, plot, fuse."""

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
from PIL import Image

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.train.config import TrainConfig
from bonsai_mlx.train.trainer import Trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("sft")
    student, _ = build_llava(root / "student", tokenizer, seed=1, noise=0.1)  # away from the tiny HF init: LoRA learns
    data = make_shapes_data(root / "data", 48)
    return root, student, data


KILL = Path(__file__).with_name("kill_after.py")  # runs the CLI, SIGKILLed after a given optimizer step


def cli(*args, env=None, kill_after=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    head = [str(KILL), str(kill_after)] if kill_after else ["-m", "bonsai_mlx.cli"]
    return subprocess.run([sys.executable, *head, *args], capture_output=True, text=True, env=e, timeout=600)


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_sft_learns_and_resumes_exactly_after_kill(setup):
    root, student, data = setup
    common = ["train", "--phase", "sft", "--model", str(student), "--data", str(data), "--image-root",
              str(data.parent / "images"), "--max-steps", "200", "--batch-size", "4", "--lr", "3e-3",
              "--lr-projector", "3e-3", "--save-every", "100", "--seed", "3"]
    a, b = root / "run_a", root / "run_b"
    r = cli(*common, "--out", str(a))
    assert r.returncode == 0, r.stderr[-2000:]
    ma = metrics(a)
    assert [m["step"] for m in ma] == list(range(1, 201))
    start, end = ma[0]["loss"], np.mean([m["loss"] for m in ma[-10:]])
    assert end < 0.5 * start, (start, end)

    r = cli(*common, "--out", str(b), kill_after=130)
    assert r.returncode == -9  # SIGKILL: no clean shutdown
    assert json.loads((b / "checkpoint" / "trainer_state.json").read_text())["step"] == 100
    assert len(metrics(b)) == 130
    r = cli("train", "--out", str(b), "--resume")  # everything else comes from the checkpoint's config
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    mb = metrics(b)
    assert [m["step"] for m in mb] == list(range(1, 201))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(ma, mb, strict=True)) <= 1e-6
    for f in ("adapters.safetensors", "projector.safetensors"):
        wa, wb = mx.load(str(a / "checkpoint" / f)), mx.load(str(b / "checkpoint" / f))
        assert set(wa) == set(wb) and all(mx.array_equal(wa[k], wb[k]).item() for k in wa), f

    # plot the run
    r = cli("plot", str(a))
    assert r.returncode == 0, r.stderr
    png = Image.open(a / "curves.png")
    assert png.size[0] > 500

    # What 200 steps guarantee is measured teacher-forced, with margins, on held-out pictures (not one greedy string
    # at the end of the run: which token wins a near tie depends on the machine's float rounding along the run).
    import bonsai_mlx

    held = make_shapes_data(root / "held", 16, seed=1)
    records = json.loads(held.read_text())
    base, processor = bonsai_mlx.load(student)
    tuned, _ = bonsai_mlx.load(student, adapter=a / "checkpoint")
    gain = []
    for rec in records:
        image, truth = held.parent / "images" / rec["image"], rec["conversations"][1]["value"]
        gain.append(answer_logprob(tuned, processor, image, "What colour is the shape?", truth)
                    - answer_logprob(base, processor, image, "What colour is the shape?", truth))
    # the adapter makes the right answer (colour word + <|im_end|>) far likelier than the untrained model does:
    # +15.4 nats on average where written. (Which colour ranks first is not settled after 200 steps: 11 of 16 on one
    # BLAS kernel type, 5 of 16 on another — not asserted.)
    assert np.mean(gain) > 3.0, gain

    # the checkpoint works as --adapter in generate: its greedy ids are the loaded model's (a fixed model, so exact)
    image = str(held.parent / "images" / records[0]["image"])
    q = "What colour is the shape?"
    for model, extra in ((tuned, ["--adapter", str(a / "checkpoint")]), (base, [])):
        r = cli("generate", "--model", str(student), *extra, "--image", image, "--prompt", q, "--max-tokens", "3",
                "--json")
        assert r.returncode == 0, r.stderr
        want = bonsai_mlx.generate(model, processor, q, image=image, max_tokens=3)
        assert json.loads(r.stdout)["token_ids"] == want.token_ids, (r.stdout, want)


def answer_logprob(model, processor, image, question, answer):
    """Teacher-forced log-probability (nats, summed) of `answer` + <|im_end|> after the generation prompt."""
    tok = processor.tokenizer._tokenizer
    prompt = processor.prompt_ids(question, with_image=True)
    target = tok.encode(answer + "<|im_end|>", add_special_tokens=False)
    pix = mx.array(processor.image_processor([str(image)]))
    logits = model(mx.array([prompt + target]), pix)[0, len(prompt) - 1:-1].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return float(mx.take_along_axis(logp, mx.array(target)[:, None], axis=-1).sum())


def test_only_projector_and_lora_change(setup):
    root, student, data = setup
    cfg = TrainConfig(model=str(student), data=str(data), image_root=str(data.parent / "images"),
                      out=str(root / "run_c"), max_steps=3, batch_size=4, lr=1e-2, lr_projector=1e-2, warmup=0.0)
    t = Trainer(cfg, log=lambda m: None)
    before = {k: np.array(v) for k, v in tree_flatten(t.model.parameters())}
    trainable = {k for k, _ in tree_flatten(t.model.trainable_parameters())}
    assert trainable and all(k.startswith("multi_modal_projector.") or k.endswith(("lora_a", "lora_b"))
                             for k in trainable)
    assert any(k.startswith("multi_modal_projector.") for k in trainable)
    t.train()
    after = {k: np.array(v) for k, v in tree_flatten(t.model.parameters())}
    for k, v in before.items():
        if k in trainable:
            if k.endswith("lora_a"):
                continue  # A may move little; B and the projector must move
        else:
            assert np.array_equal(v, after[k]), f"frozen {k} changed"
    assert any(not np.array_equal(before[k], after[k]) for k in trainable if k.endswith("lora_b"))
    assert any(not np.array_equal(before[k], after[k]) for k in trainable if k.startswith("multi_modal_projector."))


def test_bad_records_are_skipped_and_counted(setup, tmp_path):
    root, student, data = setup
    good = json.loads(data.read_text())[:8]
    imgs = data.parent / "images"
    (imgs / "garbage.png").write_text("not an image")
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(imgs / "full.jpg", quality=95)
    jpg = (imgs / "full.jpg").read_bytes()
    (imgs / "cut.jpg").write_bytes(jpg[: int(len(jpg) * 0.7)])  # header intact, pixels cut off

    def r(i, image, convs):
        return {"id": f"bad{i}", **({"image": image} if image else {}), "conversations": convs}

    h, g = (lambda v: {"from": "human", "value": v}), (lambda v: {"from": "gpt", "value": v})
    bad = [
        r(1, "nope.png", [h("<image>\nQ"), g("A")]),  # missing_image
        r(2, "garbage.png", [h("<image>\nQ"), g("A")]),  # corrupt_image (header)
        r(3, "cut.jpg", [h("<image>\nQ"), g("A")]),  # corrupt_image (found when decoded)
        r(4, "0_0.png", [h("<image>\nQ")]),  # no_assistant_turn
        r(5, "0_0.png", [h("Q"), g("A")]),  # image_token_missing
        r(6, "0_0.png", [h("<image><image>"), g("A")]),  # image_token_repeated
        r(7, "0_0.png", [h("<image>"), g(["A"])]),  # non_string_value
        r(8, "0_0.png", [h("<image>"), {"from": "system", "value": "A"}]),  # unknown_role
    ]
    f = tmp_path / "mixed.json"
    f.write_text(json.dumps(good + bad))
    out = tmp_path / "run"
    res = cli("train", "--model", str(student), "--data", str(f), "--image-root", str(imgs), "--out", str(out),
              "--max-steps", "4", "--batch-size", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    start = res.stderr.split("\n\n")[0]
    for reason in ("missing_image", "corrupt_image", "no_assistant_turn", "image_token_missing",
                   "image_token_repeated", "non_string_value", "unknown_role"):
        assert f"skipped 1 × {reason}" in start, reason
    assert "9 of 16 records usable" in start  # cut.jpg passes the header check and is dropped when decoded
    # 4 steps × 2 = all 8 good-or-late samples' batches: the truncated JPEG is met, dropped and counted
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["skipped"]["corrupt_image"] == 2, state
    assert "'corrupt_image': 2" in res.stderr.splitlines()[-1]

    res = cli("train", "--model", str(student), "--data", str(f), "--image-root", str(imgs), "--out",
              str(tmp_path / "strict"), "--max-steps", "1", "--strict")
    assert res.returncode == 1 and "record bad1" in res.stderr and "--strict" in res.stderr
    assert len([x for x in res.stderr.splitlines() if x.strip()]) == 1


def test_limit_trains_on_the_first_records(setup, tmp_path):
    root, student, data = setup
    res = cli("train", "--model", str(student), "--data", str(data), "--image-root", str(data.parent / "images"),
              "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2", "--limit", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{data}: 3 of 3 records usable" in res.stderr
    res = cli("train", "--model", str(student), "--data", str(data), "--out", str(tmp_path / "r0"), "--limit", "0")
    assert res.returncode == 1 and res.stderr.strip() == "error: --limit must be at least 1"


def test_config_yaml_flags_override_and_json_errors(setup, tmp_path):
    root, student, data = setup
    y = tmp_path / "c.yaml"
    y.write_text(f"model: {student}\ndata: {data}\nimage_root: {data.parent / 'images'}\nbatch-size: 2\n"
                 f"max_steps: 2\nlora_rank: 4\n")
    out = tmp_path / "run"
    res = cli("train", "--config", str(y), "--out", str(out), "--lora-rank", "8")
    assert res.returncode == 0, res.stderr[-2000:]
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["batch_size"] == 2 and resolved["lora_rank"] == 8 and resolved["max_steps"] == 2
    assert json.loads((out / "checkpoint" / "adapter_config.json").read_text())["lora_parameters"]["rank"] == 8

    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,\n  "image": "a.png",, }]')
    res = cli("train", "--model", str(student), "--data", str(bad), "--out", str(tmp_path / "r2"))
    assert res.returncode == 1 and "line 2 column" in res.stderr and "Traceback" not in res.stderr
    y.write_text("unknown_key: 1\n")
    res = cli("train", "--config", str(y), "--out", str(tmp_path / "r3"))
    assert res.returncode == 1 and "unknown_key" in res.stderr
    # a missing data file, a folder that is not a student: one line each
    res = cli("train", "--model", str(student), "--data", str(tmp_path / "nope.json"), "--out", str(tmp_path / "r4"))
    assert res.returncode == 1 and "--data" in res.stderr and "no such file" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0
    res = cli("train", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "r5"))
    assert res.returncode == 1 and "no config.json" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_fuse_equals_adapter(setup, tmp_path):
    root, student, data = setup
    cfg = TrainConfig(model=str(student), data=str(data), image_root=str(data.parent / "images"),
                      out=str(tmp_path / "run"), max_steps=3, batch_size=4, lr=1e-2, lr_projector=1e-2, warmup=0.0,
                      quantize="none", eval_data=str(data), eval_every=2)
    Trainer(cfg, log=lambda m: None).train()
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"split": "eval"' in x]
    assert [e["step"] for e in evals] == [2, 3] and evals[0]["samples"] == 48
    assert abs(evals[-1]["perplexity"] - np.exp(evals[-1]["loss"])) < 1e-6 * evals[-1]["perplexity"]
    from bonsai_mlx.io import load

    model, processor = load(student, adapter=tmp_path / "run" / "checkpoint")
    ids = mx.array([processor.prompt_ids("What colour?", with_image=True)])
    pix = mx.array(processor.image_processor([str(data.parent / "images" / "0_1.png")]))
    want = np.array(model(ids, pix))
    res = cli("fuse", "--model", str(student), "--adapter", str(tmp_path / "run" / "checkpoint"), "--out",
              str(tmp_path / "fused"))
    assert res.returncode == 0, res.stderr
    fused, _ = load(tmp_path / "fused")
    assert np.abs(np.array(fused(ids, pix)) - want).max() <= 1e-5
    with pytest.raises(BonsaiError):
        TrainConfig(model="m", data="d", out="o", max_steps=3, epochs=1.0).validate()


def test_grad_checkpoint_and_epochs(setup, tmp_path):
    """--grad-checkpoint recomputes blocks in backward: the same losses (dropout off); --epochs sets the steps."""
    root, student, data = setup
    base = ["train", "--model", str(student), "--data", str(data), "--image-root", str(data.parent / "images"),
            "--epochs", "0.5", "--batch-size", "4", "--lr", "3e-3", "--lr-projector", "3e-3", "--lora-dropout", "0"]
    assert cli(*base, "--out", str(tmp_path / "a")).returncode == 0
    r = cli(*base, "--out", str(tmp_path / "b"), "--grad-checkpoint")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert len(a) == 6  # 48 records / batch 4 = 12 steps per epoch
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) <= 1e-5
    # with dropout the recomputed blocks would draw new masks: refused
    r = cli(*[x for x in base if x not in ("--lora-dropout", "0")], "--out", str(tmp_path / "c"), "--grad-checkpoint")
    assert r.returncode == 1 and "--lora-dropout 0" in r.stderr



def test_train_vision_and_full_lm(setup, tmp_path):
    """--train-vision / --train-lm full: those weights train, land in weights.safetensors, and `--adapter` (generate,
    eval, fuse, export) reproduces the trained model; kill + resume stays exact."""
    root, student, data = setup
    with pytest.raises(BonsaiError, match="needs --quantize none"):
        TrainConfig(model="m", data="d", out="o", train_lm="full").validate()
    common = dict(model=str(student), data=str(data), image_root=str(data.parent / "images"), max_steps=4,
                  batch_size=4, lr=1e-2, lr_projector=1e-2, warmup=0.0, quantize="none", train_lm="full",
                  train_vision=True, lora_dropout=0.0, seed=2)
    t = Trainer(TrainConfig(out=str(tmp_path / "run"), **common), log=lambda m: None)
    trainable = {k for k, _ in tree_flatten(t.model.trainable_parameters())}
    allp = {k for k, _ in tree_flatten(t.model.parameters())}
    assert trainable == allp  # everything trains, no LoRA factors
    before = {k: np.array(v) for k, v in tree_flatten(t.model.parameters())}
    t.train()
    after = {k: np.array(v) for k, v in tree_flatten(t.model.parameters())}
    for prefix in ("vision_tower.", "language_model.", "multi_modal_projector."):
        assert any(not np.array_equal(before[k], after[k]) for k in allp if k.startswith(prefix)), prefix
    saved = mx.load(str(tmp_path / "run" / "checkpoint" / "weights.safetensors"))
    assert {k for k in allp if not k.startswith("multi_modal_projector.")} == set(saved)
    assert not (tmp_path / "run" / "checkpoint" / "adapters.safetensors").exists()

    from bonsai_mlx.io import load

    model, processor = load(student, adapter=tmp_path / "run" / "checkpoint")
    ids = mx.array([processor.prompt_ids("What colour?", with_image=True)])
    pix = mx.array(processor.image_processor([str(data.parent / "images" / "0_1.png")]))
    t.model.eval()
    assert np.abs(np.array(model(ids, pix)) - np.array(t.model(ids, pix))).max() <= 1e-6
    base, _ = load(student)
    assert np.abs(np.array(base(ids, pix)) - np.array(model(ids, pix))).max() > 1e-3

    # kill after step 3 (checkpoint at 2) → resume → same losses and weights as the unbroken run
    args = ["train", "--model", str(student), "--data", str(data), "--image-root", str(data.parent / "images"),
            "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--lr-projector", "1e-2", "--warmup", "0",
            "--quantize", "none", "--train-lm", "full", "--train-vision", "--lora-dropout", "0", "--seed", "2",
            "--save-every", "2", "--out", str(tmp_path / "killed")]
    r = cli(*args, kill_after=3)
    assert r.returncode == -9
    r = cli("train", "--out", str(tmp_path / "killed"), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    la = [m["loss"] for m in metrics(tmp_path / "run")]
    lb = [m["loss"] for m in metrics(tmp_path / "killed")]
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) <= 1e-6
    w2 = mx.load(str(tmp_path / "killed" / "checkpoint" / "weights.safetensors"))
    assert max(float(mx.abs(saved[k] - w2[k]).max()) for k in saved) <= 1e-6
