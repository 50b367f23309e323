"""Logit distillation across tokenizers (#23): the teacher's top-k log-probs in the cache, the vocabulary map, the
`uld` and `mapped` losses against NumPy, and the trainer (β = 0 is today's run, a cache without logits is refused,
both losses logged and plotted)."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import build_llava, build_teacher, make_shapes_data, train_llama_tokenizer
from safetensors.numpy import load_file

from bonsai_mlx.train.config import TrainConfig
from bonsai_mlx.train.kd import mapped_sum, uld_sum
from bonsai_mlx.train.trainer import Trainer
from teacher_cache.vocab_map import build_map, token_strings

K = 8


# --- the losses against NumPy ------------------------------------------------------------------------------------
def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def uld_reference(logits, t_logp, weight):
    total = 0.0
    for z, lt, w in zip(logits, t_logp, weight, strict=True):
        ps = np.sort(_softmax(z.astype(np.float64)))[::-1][: len(lt)]
        pt = np.exp(lt.astype(np.float64))
        total += w * (np.abs(ps - pt).sum() + abs((1 - ps.sum()) - (1 - pt.sum())))
    return total


def mapped_reference(logits, t_logp, s_ids, mask, weight):
    total, covered = 0.0, 0.0
    for z, lt, ids, m, w in zip(logits, t_logp, s_ids, mask, weight, strict=True):
        if w == 0:
            continue
        on = m > 0
        ls = _log_softmax(z.astype(np.float64))[ids[on]]
        qs = np.exp(ls) / np.exp(ls).sum()
        pt = np.exp(lt.astype(np.float64))[on]
        qt = pt / pt.sum()
        total += w * (qt * (np.log(qt) - np.log(qs))).sum()
        covered += w * pt.sum()
    return total, covered


def test_kd_losses_equal_numpy_on_a_hand_built_batch():
    rng = np.random.default_rng(0)
    P, V = 6, 50
    logits = rng.normal(0, 2, (P, V)).astype(np.float32)
    teacher = rng.normal(0, 2, (P, 70))  # a teacher vocabulary of another size
    t_logp = np.stack([np.sort(_log_softmax(t))[::-1][:K] for t in teacher]).astype(np.float32)
    s_ids = rng.integers(0, V, (P, K)).astype(np.int32)
    for r in range(P):  # the map is one-to-one: distinct student ids within a row
        s_ids[r] = rng.permutation(V)[:K]
    mask = (rng.random((P, K)) < 0.6).astype(np.float32)  # unmapped teacher tokens
    mask[2] = 0.0  # a position where nothing maps: weight 0, as TargetBuilder sets it
    weight = np.array([1, 1, 0, 1, 1, 0], np.float32)  # and the last row is padding
    got = float(uld_sum(mx.array(logits), mx.array(t_logp), mx.array(weight)))
    want = uld_reference(logits, t_logp, weight)
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)
    kl, cov = mapped_sum(mx.array(logits), mx.array(t_logp), mx.array(s_ids), mx.array(mask), mx.array(weight))
    want_kl, want_cov = mapped_reference(logits, t_logp, s_ids, mask, weight)
    assert abs(float(kl) - want_kl) <= 1e-5 * max(1.0, abs(want_kl)), (float(kl), want_kl)
    assert abs(float(cov) - want_cov) <= 1e-5, (float(cov), want_cov)
    # a student equal to the teacher on the mapped support has KL 0; sorted-equal distributions have ULD 0
    same = np.full((1, V), -30.0, np.float32)
    same[0, s_ids[0]] = t_logp[0]
    kl0, _ = mapped_sum(mx.array(same), mx.array(t_logp[:1]), mx.array(s_ids[:1]), mx.array(np.ones((1, K), np.float32)),
                        mx.array([1.0]))
    assert abs(float(kl0)) <= 1e-5
    full = np.stack([_log_softmax(t) for t in teacher[:1]]).astype(np.float32)  # [1, 70]
    top = np.ascontiguousarray(np.sort(full[0])[::-1][:K][None])
    assert abs(float(uld_sum(mx.array(full), mx.array(top), mx.array([1.0])))) <= 1e-5
    # gradients flow to the student's logits
    g = mx.grad(lambda z: uld_sum(z, mx.array(t_logp), mx.array(weight)))(mx.array(logits))
    assert float(mx.abs(g).sum()) > 0 and float(mx.abs(g[5]).sum()) == 0.0  # padding gets none


# --- the vocabulary map ------------------------------------------------------------------------------------------
CORPUS = ["The red circle is left of the blue square.", "There are 3 shapes: a circle, a square and 2 triangles.",
          "Is the green triangle above the circle? Yes, it is."]


@pytest.fixture(scope="module")
def llama_tok():
    return train_llama_tokenizer(extra_corpus=CORPUS, word_pieces=True)


def test_vocabulary_map_maps_what_it_should_and_nothing_else(llama_tok, tokenizer):
    vmap = build_map(llama_tok, tokenizer)
    ts, ss = token_strings(llama_tok), token_strings(tokenizer)
    t_id = {s: i for i, s in enumerate(ts) if s is not None}
    s_id = {s: i for i, s in enumerate(ss) if s is not None}
    # ASCII words with and without a leading space, digits and punctuation: in both vocabularies, mapped
    should = [w for w in (" the", " circle", " square", " red", "The", " The", "3", "2", ".", ",", "?", ":")
              if w in t_id and w in s_id]
    assert len(should) >= 8, should
    assert any(w.startswith(" ") for w in should) and any(w.isdigit() for w in should)
    assert any(not w.startswith(" ") and w.isalpha() for w in should)
    for w in should:
        assert vmap[t_id[w]] == s_id[w], w
    assert "▁the" in llama_tok.get_vocab() and ts[llama_tok.convert_tokens_to_ids("▁the")] == " the"
    # every mapped pair has the same text; nothing else is mapped
    for ti in np.flatnonzero(vmap >= 0):
        assert ts[ti] is not None and ts[ti] == ss[vmap[ti]], (ti, ts[ti], ss[vmap[ti]])
    assert len(set(vmap[vmap >= 0].tolist())) == int((vmap >= 0).sum())  # one-to-one
    unmapped = [llama_tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<unk>", "<image>", "<pad>", "<0x41>",
                                                             "<0x0A>")]
    assert all(vmap[i] == -1 for i in unmapped)
    # a byte-level token that is half of a UTF-8 character has no string of its own
    half = [i for i, p in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
            if p in ("\u00c3", "\u00e2")]  # lead bytes 0xC3 / 0xE2
    assert half and all(ss[i] is None for i in half)
    # the space conventions really differ: "the" without the space is not " the"
    if "the" in t_id and " the" in s_id:
        assert vmap[t_id["the"]] != s_id[" the"]


# --- the cache with logits ---------------------------------------------------------------------------------------
def run(module, *args):
    e = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=e, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer, llama_tok):
    root = tmp_path_factory.mktemp("kd")
    student, _ = build_llava(root / "student", tokenizer, seed=1, noise=0.1)
    teacher, hf_teacher = build_teacher(root / "teacher", llama_tok)
    data = make_shapes_data(root / "data", 12)
    base = ["build", "--teacher", str(teacher), "--student-tokenizer", str(student), "--data", str(data),
            "--image-root", str(data.parent / "images"), "--layers", "2 3", "--device", "cpu", "--batch-size", "4"]
    for name, extra in (("plain", []), ("logits", ["--logits-topk", str(K), "--shard-size", "4KB"])):
        r = run("teacher_cache", *base, "--out", str(root / name), *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    return root, student, teacher, hf_teacher, data


def test_cache_with_logits_reads_back_and_matches_the_teachers_log_softmax(world):
    root, student, teacher, hf_teacher, data = world
    out = root / "logits"
    r = run("teacher_cache", "verify", str(out))
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["logits_topk"] == K and man["vocab_map"]["mapped_tokens"] > 0 and len(man["shards"]) >= 2
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from teacher_cache.format import CacheReader
    from teacher_cache.records import frame_image, prepare, student_side

    st = student_side(str(student))
    ttok = AutoTokenizer.from_pretrained(str(teacher))
    proc = AutoImageProcessor.from_pretrained(str(teacher))
    vmap = load_file(str(out / "vocab_map.safetensors"))["teacher_to_student"]
    assert np.array_equal(vmap, build_map(ttok, st.tokenizer, hf_teacher.config.text_config.vocab_size))
    records = json.loads(data.read_text())
    reader = CacheReader(out)
    checked = 0
    for sh in man["shards"]:
        t = load_file(str(out / sh["file"]))  # safetensors' own reader
        assert t["logits_topk_logp"].dtype == np.float16 and t["logits_topk_ids"].dtype == np.int32
        for row, si in enumerate(t["sample_index"].tolist()):
            a, b = t["text_offsets"][row], t["text_offsets"][row + 1]
            rec = records[si]
            p = prepare(si, rec, st, ttok, 36, hf_teacher.config.image_token_id)
            img = frame_image(Image.open(data.parent / "images" / rec["image"]), "resize", 48, proc.image_mean)
            pix = proc(images=img, do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                logits = hf_teacher(input_ids=torch.tensor([p.teacher_ids]), pixel_values=pix).logits[0]
            lp = torch.log_softmax(logits[p.teacher_positions].float(), -1)
            vals, ids = lp.topk(K, -1)
            got_lp, got_ids = t["logits_topk_logp"][a:b].astype(np.float32), t["logits_topk_ids"][a:b]
            assert np.array_equal(got_ids, ids.numpy()), si
            # float16 storage: ≤ 1e-3 relative in log-prob, ≤ 1e-3 absolute in probability
            assert np.abs(got_lp - vals.numpy()).max() <= 1e-3 * np.abs(vals.numpy()).max()
            assert np.abs(np.exp(got_lp) - np.exp(vals.numpy())).max() <= 1e-3
            e = reader.get(si)
            assert np.array_equal(e["topk_ids"], got_ids) and np.allclose(e["topk_logp"], got_lp)
            assert e["positions"].tolist() == p.student_positions
            checked += 1
            if checked >= 4:
                break
        if checked >= 4:
            break
    # plan counts the logits' bytes (within 5% of what build wrote)
    r = run("teacher_cache", "plan", "--data", str(data), "--layers", "2 3", "--teacher", str(teacher),
            "--student-tokenizer", str(student), "--shard-size", "4KB", "--logits-topk", str(K))
    assert r.returncode == 0 and f"top {K}" in r.stdout, r.stderr
    est = int(r.stdout.split("total: ")[1].split(" bytes")[0].replace(",", ""))
    written = sum((out / s["file"]).stat().st_size for s in man["shards"])
    assert abs(est - written) / written <= 0.05, (est, written)


# --- the trainer -------------------------------------------------------------------------------------------------
def cfg(world, out, cache, **kw):
    root, student, _, _, data = world
    base = dict(model=str(student), data=str(data), image_root=str(data.parent / "images"), out=str(out),
                batch_size=4, lr=3e-3, lr_projector=3e-3, seed=2, max_steps=5, phase="hsd",
                teacher_cache=str(root / cache), alpha=0.3)
    base.update(kw)
    return TrainConfig(**base)


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_beta_zero_reproduces_todays_run_exactly(world, tmp_path):
    Trainer(cfg(world, tmp_path / "plain", "plain"), log=lambda m: None).train()
    Trainer(cfg(world, tmp_path / "kd0", "logits", kd_weight=0.0), log=lambda m: None).train()
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "kd0")
    keys = ("loss", "ce", "l_text", "l_img")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert all("l_kd" not in r for r in b)


@pytest.mark.parametrize("loss", ["uld", "mapped"])
def test_kd_terms_enter_the_loss_and_are_logged_and_plotted(world, tmp_path, loss):
    out = tmp_path / loss
    Trainer(cfg(world, out, "logits", kd_weight=2.0, kd_loss=loss, alpha=0.0), log=lambda m: None).train()
    m = metrics(out)
    kd = [r["l_kd"] for r in m if "l_kd" in r]
    assert len(kd) == 5 and all(np.isfinite(kd)) and all(k > 0 for k in kd), kd
    for r in m:  # α = 0: loss = CE + β·L_kd, each a mean over the step's batch
        assert abs(r["loss"] - (r["ce"] + 2.0 * r["l_kd"])) <= 1e-5 * r["loss"], r
    if loss == "mapped":
        cov = [r["kd_covered"] for r in m]
        assert all(0 < c <= 1 for c in cov), cov
    r = run("bonsai_mlx.cli", "plot", str(out))
    assert r.returncode == 0 and (out / "curves.png").exists(), r.stderr


def test_kd_without_logits_in_the_cache_is_refused_in_one_line(world, tmp_path):
    root, student, _, _, data = world
    r = run("bonsai_mlx.cli", "train", "--phase", "hsd", "--teacher-cache", str(root / "plain"), "--kd-weight", "0.5",
            "--model", str(student), "--data", str(data), "--image-root", str(data.parent / "images"), "--out",
            str(tmp_path / "x"), "--max-steps", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()[-1]
    assert "--logits-topk" in err and "holds no teacher logits" in err, err
    r = run("bonsai_mlx.cli", "train", "--phase", "sft", "--kd-weight", "0.5", "--model", str(student), "--data",
            str(data), "--out", str(tmp_path / "y"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--kd-weight needs --phase hsd" in r.stderr
