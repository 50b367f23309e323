"""examples/hsd_evidence: the `--quick` experiment end to end (teacher in PyTorch → teacher cache → SFT and HSD students
via `bonsai-mlx train` → `bonsai-mlx eval` → table, plot, doc), its statistics, resume and the plan guard."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "examples" / "hsd_evidence" / "run.py"
sys.path.insert(0, str(RUN.parent))

import run as hsd_run  # noqa: E402


def test_mean_ci_is_the_t_interval_over_seeds():
    m, h = hsd_run.mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and h == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert math.isnan(hsd_run.mean_ci([0.4])[1])


def test_runs_cover_the_grid_and_ablations_only_at_the_smallest_fraction(tmp_path):
    p = hsd_run.Plan(out=tmp_path)
    runs = hsd_run.runs_of(p)
    main = [r for r in runs if not r.variant.ablation]
    assert len(main) == 7 * 3 * 3  # SFT + 3 α × {text, text+image}; 3 fractions; 3 seeds
    assert {r.fraction for r in runs if r.variant.ablation} == {0.1}
    assert len({r.name for r in runs}) == len(runs)
    hsd = next(r for r in runs if r.variant.name == "hsd-img-a0.3-raw")
    cmd = hsd_run.train_cmd(p, hsd, Path("s"), Path("d"), Path("c"), Path("o"))
    assert cmd[cmd.index("--limit") + 1] == "1000" and "--no-standardize" in cmd
    assert cmd[cmd.index("--image-weight") + 1] == "1" and cmd[cmd.index("--phase") + 1] == "hsd"
    sft = hsd_run.train_cmd(p, runs[0], Path("s"), Path("d"), Path("c"), Path("o"))
    assert "--teacher-cache" not in sft and sft[sft.index("--phase") + 1] == "sft"


def _cli(*args, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=str(ROOT))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsd_quick") / "exp"
    r = _cli("--quick", "--out", str(out))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return out


def test_quick_experiment_end_to_end(quick):
    out = quick
    # the teacher: a llava-hf LlavaForConditionalGeneration with CLIP + Llama, read back by transformers
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(out / "teacher"))
    assert cfg.model_type == "llava" and cfg.vision_config.model_type == "clip_vision_model"
    assert cfg.text_config.model_type == "llama" and cfg.vision_feature_layer == -2
    assert (out / "teacher" / "model.safetensors").exists()
    teacher = json.loads((out / "teacher" / "teacher_eval.json").read_text())
    assert teacher["accuracy"]["n"] == 100
    # the cache verifies
    v = subprocess.run([sys.executable, "-m", "teacher_cache", "verify", str(out / "cache")], capture_output=True,
                       text=True)
    assert v.returncode == 0 and v.stdout.startswith("ok:"), v.stderr
    # every run: its accuracy is what `bonsai-mlx eval` wrote
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 3 * 2 * 2
    for x in results:
        ev = json.loads((out / "runs" / x["name"] / "eval.json").read_text())
        assert x["accuracy"] == ev["accuracy"]["value"] and ev["accuracy"]["n"] == 100
        if x["variant"] != "sft":
            assert 0 < x["coverage"] <= 1 and x["l_text"] > 0
    assert all(x["l_img"] > 0 for x in results if x["variant"] == "hsd-img-a0.3")
    assert all(x["l_img"] == 0 for x in results if x["variant"] == "hsd-txt-a0.3")
    # the doc: the teacher's accuracy, each cell's mean and its paired Δ recomputed here from results.json
    doc = (out / "hsd_evidence.md").read_text()
    assert f"Teacher (ceiling): **{teacher['accuracy']['value']:.3f}**" in doc
    by = {(x["variant"], x["fraction"], x["seed"]): x["accuracy"] for x in results}
    for f in (0.3, 1.0):
        sft = [by[("sft", f, s)] for s in (0, 1)]
        img = [by[("hsd-img-a0.3", f, s)] for s in (0, 1)]
        m = sum(img) / 2
        d = [a - b for a, b in zip(img, sft, strict=True)]
        md = sum(d) / 2
        hd = 12.706 * abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2)
        assert f"{m:.3f} ± " in doc and f"{md:+.3f} ± {hd:.3f}" in doc
    won = "HSD beat SFT" in doc
    assert won != ("HSD did not beat SFT anywhere" in doc)
    from PIL import Image

    with Image.open(out / "hsd_evidence.png") as im:
        assert im.size[0] > 500


def test_quick_experiment_resumes_and_refuses_another_plan(quick):
    before = (quick / "results.json").read_text()
    r = _cli("--quick", "--out", str(quick), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (quick / "results.json").read_text() == before  # nothing retrained: every run was already done
    r = _cli("--out", str(quick), timeout=60)
    assert r.returncode != 0 and "another plan" in r.stderr and "Traceback" not in r.stderr


def test_sentence_plan_has_the_kd_variants_and_their_commands(tmp_path):
    p = hsd_run.sentence_plan(tmp_path, quick=False)
    assert p.answers == "sentence" and p.logits_topk > 0 and len(p.seeds) == 3
    labels = [v.label for v in p.variants]
    assert labels[0] == "SFT" and any("KD uld" in x for x in labels) and any("KD mapped" in x for x in labels)
    assert any("HSD" in x and "KD" in x for x in labels)
    kd = next(r for r in hsd_run.runs_of(p) if r.variant.kd_loss == "mapped" and r.variant.kd_weight > 0)
    cmd = hsd_run.train_cmd(p, kd, Path("s"), Path("d"), Path("c"), Path("o"))
    assert cmd[cmd.index("--phase") + 1] == "hsd" and cmd[cmd.index("--kd-loss") + 1] == "mapped"
    assert cmd[cmd.index("--alpha") + 1] == "0.0"


def test_quick_sentence_experiment_with_logit_distillation(tmp_path):
    """--answers sentence --quick: sentence answers, a cache with the teacher's top-k logits, SFT / HSD / KD (uld,
    mapped) / HSD+KD students, and the report's verdict recomputed from results.json."""
    out = tmp_path / "kd"
    r = _cli("--answers", "sentence", "--quick", "--out", str(out))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    answers = [t["value"] for x in json.loads((out / "data" / "train.json").read_text()) for t in x["conversations"]
               if t["from"] == "gpt"]
    assert sum(len(a.split()) >= 3 for a in answers) / len(answers) > 0.9  # sentences, not words
    man = json.loads((out / "cache" / "manifest.json").read_text())
    assert man["logits_topk"] == 32 and man["vocab_map"]["mapped_tokens"] > 0
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 6 * 2
    for x in results:
        assert x["eval_ce"] > 0
        if "kd-" in x["variant"]:
            assert x["l_kd"] > 0
        if "kd-mapped" in x["variant"]:
            assert 0 < x["kd_covered"] <= 1
    doc = (out / "hsd_evidence.md").read_text()
    by = {(x["variant"], x["seed"]): x["eval_ce"] for x in results}
    d = [by[("kd-uld-b0.5", s)] - by[("sft", s)] for s in (0, 1)]
    hd = 12.706 * abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2)
    assert f"{sum(d) / 2:+.3f} ± {hd:.3f}" in doc  # the paired Δ CE of KD uld, as the table prints it
    assert ("distillation beat SFT" in doc) != ("distillation did not beat SFT anywhere" in doc)
    assert "By held-out CE, distillation " in doc
