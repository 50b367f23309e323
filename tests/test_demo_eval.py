"""`bonsai-mlx demo` (a short run) and `bonsai-mlx eval` / `pope-build` on its outputs: the numbers the demo prints
are the eval code's, eval's answers are `generate`'s, the loss is the trainer's, POPE decisions are the logits'."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx.evaluate.pope import pope_metrics, yes_no_ids


def cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "bonsai_mlx.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "d"
    r = cli("demo", "--out", str(out), "--steps", "40", "--train-images", "300", "--eval-questions", "50")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_demo_outputs(demo):
    out, stdout = demo
    for f in ("demo.json", "eval_before.json", "eval_after.json", "curves.png", "run/metrics.jsonl",
              "run/checkpoint/weights.safetensors", "pico/config.json", "pico-vision/model.safetensors",
              "data/train.json", "data/eval.json"):
        assert (out / f).exists(), f
    summary = json.loads((out / "demo.json").read_text())
    after = json.loads((out / "eval_after.json").read_text())
    assert summary["after"]["accuracy"] == after["accuracy"]
    assert after["accuracy"]["n"] == 50 and sum(v["n"] for v in after["per_type"].values()) == 50
    assert {v["n"] for v in after["per_type"].values()} == {10}
    correct = sum(p["correct"] for p in after["predictions"])
    assert after["accuracy"]["value"] == pytest.approx(correct / 50)
    for t, v in after["per_type"].items():  # the printed table: chance, before and after with intervals
        line = next(x for x in stdout.splitlines() if x.startswith(t + " "))
        assert f"{summary['chance'][t]:.2f}" in line and f"{v['value']:.2f} [{v['ci95'][0]:.2f}" in line
    assert len([json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]) == 40
    assert "generate:" in stdout and "Q: " in stdout and "A: " in stdout
    assert summary["elapsed_s"] > 0
    # the vision pretraining learned (its per-patch loss falls) and changed only the vision tower
    vp = summary["vision_pretrain"]
    assert vp["steps"] == 300 and vp["loss_last"] < 0.5 * vp["loss_first"]
    from safetensors.numpy import load_file

    a, b = load_file(str(out / "pico" / "model.safetensors")), load_file(str(out / "pico-vision" / "model.safetensors"))
    assert set(a) == set(b)
    changed = {k for k in a if not np.array_equal(a[k], b[k])}
    assert changed and all(k.startswith("vision_tower.") for k in changed)


def test_eval_vqa_matches_generate_and_demo(demo, tmp_path):
    out, _ = demo
    res_path = tmp_path / "vqa.json"
    r = cli("eval", "--model", str(out / "pico-vision"), "--adapter", str(out / "run" / "checkpoint"), "--task", "vqa",
            "--data", str(out / "data" / "eval.json"), "--image-root", str(out / "data"), "--limit", "12", "--out",
            str(res_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "overall" in r.stdout
    res = json.loads(res_path.read_text())
    demo_preds = json.loads((out / "eval_after.json").read_text())["predictions"][:12]
    assert [p["prediction"] for p in res["predictions"]] == [p["prediction"] for p in demo_preds]
    import bonsai_mlx

    model, processor = bonsai_mlx.load(out / "pico-vision", adapter=out / "run" / "checkpoint")
    records = json.loads((out / "data" / "eval.json").read_text())
    for rec, pred in list(zip(records[:12], res["predictions"], strict=True))[:4]:
        q = rec["conversations"][0]["value"].replace("<image>\n", "")
        g = bonsai_mlx.generate(model, processor, q, image=str(out / "data" / rec["image"]), max_tokens=8)
        assert g.text.strip() == pred["prediction"].strip()


def test_eval_loss_is_the_training_loss(demo, tmp_path):
    out, _ = demo
    res_path = tmp_path / "loss.json"
    r = cli("eval", "--model", str(out / "pico-vision"), "--adapter", str(out / "run" / "checkpoint"), "--task", "loss",
            "--data", str(out / "data" / "eval.json"), "--image-root", str(out / "data"), "--out", str(res_path))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(res_path.read_text())
    import bonsai_mlx
    from bonsai_mlx.train.data import SFTDataset, read_records
    from bonsai_mlx.train.trainer import evaluate_loss

    model, processor = bonsai_mlx.load(out / "pico-vision", adapter=out / "run" / "checkpoint")
    tok = processor.tokenizer._tokenizer
    ds = SFTDataset(read_records(out / "data" / "eval.json"), tok, out / "data", processor.image_seq_length)
    want = evaluate_loss(model, ds, processor.image_processor, tok.pad_token_id)
    assert res["loss"]["value"] == pytest.approx(want["loss"], rel=1e-5)
    assert res["loss"]["n"] == 50 and res["tokens"] == want["tokens"]
    lo, hi = res["loss"]["ci95"]
    assert lo < res["loss"]["value"] < hi
    assert res["perplexity"]["value"] == pytest.approx(np.exp(want["loss"]), rel=1e-5)


def test_pope_build_and_eval(demo, tmp_path):
    out, _ = demo
    r = cli("pope-build", "--annotations", str(out / "data" / "instances_eval.json"), "--images", str(out / "data"),
            "--out", str(tmp_path / "pope.jsonl"), "--num-images", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "adversarial:" in r.stdout
    res_path = tmp_path / "pope.json"
    r = cli("eval", "--model", str(out / "pico-vision"), "--adapter", str(out / "run" / "checkpoint"), "--task", "pope",
            "--data", str(tmp_path / "pope_random.jsonl"), "--image-root", str(out / "data"), "--out", str(res_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "f1" in r.stdout and "yes_ratio" in r.stdout
    res = json.loads(res_path.read_text())
    preds = [p["prediction"] == "yes" for p in res["predictions"]]
    labels = [p["label"] == "yes" for p in res["predictions"]]
    assert sum(labels) * 2 == len(labels)
    want = pope_metrics(preds, labels)
    for k in ("accuracy", "precision", "recall", "yes_ratio"):
        assert res[k]["value"] == want[k]["value"] or (np.isnan(res[k]["value"]) and np.isnan(want[k]["value"]))
    # each decision is the comparison of the "yes" and "no" logits after the assistant header
    import bonsai_mlx

    model, processor = bonsai_mlx.load(out / "pico-vision", adapter=out / "run" / "checkpoint")
    yes, no = yes_no_ids(processor.tokenizer._tokenizer)
    for p in res["predictions"][:4]:
        ids = processor.prompt_ids(p["text"], with_image=True)
        px = mx.array(processor.image_processor([str(out / "data" / p["image"])]))
        logits = np.array(model(mx.array([ids]), px))[0, -1]
        assert (max(logits[yes]) > max(logits[no])) == (p["prediction"] == "yes")


def test_eval_and_demo_bad_input(demo, tmp_path):
    out, _ = demo
    r = cli("eval", "--model", str(out / "pico"), "--task", "pope", "--data", str(tmp_path / "none.jsonl"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "pope-build" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "text": "Is there a cat?", "label": "maybe"}\n')
    r = cli("eval", "--model", str(out / "pico"), "--task", "pope", "--data", str(bad))
    assert r.returncode == 1 and "line 1" in r.stderr and r.stderr.count("\n") == 1
    r = cli("eval", "--model", str(out / "pico"), "--task", "vqa", "--data", str(out / "data" / "eval.json"),
            "--image-root", str(tmp_path))
    assert r.returncode == 1 and "not found" in r.stderr and r.stderr.count("\n") == 1
    r = cli("demo", "--out", str(out))
    assert r.returncode == 1 and "--force" in r.stderr
    r = cli("pope-build", "--annotations", str(tmp_path / "x.json"), "--out", str(tmp_path / "p.jsonl"))
    assert r.returncode == 1 and "no such file" in r.stderr


def test_patch_targets_put_each_box_in_its_cell():
    """The demo's tower pretraining target: each annotated box's category at the patch holding its centre."""
    from bonsai_mlx.demo import patch_targets

    coco = {"images": [{"id": 1, "width": 64, "height": 64}, {"id": 2, "width": 64, "height": 64}],
            "categories": [{"id": 7, "name": "red circle"}, {"id": 9, "name": "blue square"}],
            "annotations": [{"image_id": 1, "category_id": 9, "bbox": [44, 2, 18, 18]},   # top right
                            {"image_id": 1, "category_id": 7, "bbox": [2, 44, 18, 18]},   # bottom left
                            {"image_id": 2, "category_id": 7, "bbox": [22, 22, 20, 20]}]}  # centre
    t = patch_targets(coco, image_size=48, patch_size=16)  # a 3×3 grid
    assert t[1].tolist() == [0, 0, 2, 0, 0, 0, 1, 0, 0]
    assert t[2].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]
