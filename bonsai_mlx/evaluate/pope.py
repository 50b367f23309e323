"""POPE (Li et al., 2023, "Evaluating Object Hallucination"): building the question files from COCO-format
annotations and scoring a student by its next-token yes/no decision."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import BonsaiError
from .stats import bootstrap_ci, proportion
from .vqa import Evaluator, _progress


def read_pope(path) -> List[dict]:
    path = Path(path)
    if not path.is_file():
        raise BonsaiError(f"POPE file {path}: no such file (build one with `bonsai-mlx pope-build`)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise BonsaiError(f"{path}: invalid JSON at line {n} column {e.colno}: {e.msg}") from None
        if not isinstance(q, dict) or not {"image", "text", "label"} <= set(q):
            raise BonsaiError(f"{path}: line {n} needs image, text and label (POPE's JSON-lines format)")
        if str(q["label"]).lower() not in ("yes", "no"):
            raise BonsaiError(f"{path}: line {n}: label must be yes or no, got {q['label']!r}")
        out.append(q)
    return out


def pope_metrics(preds: Sequence[bool], labels: Sequence[bool]) -> dict:
    """POPE's metrics with "yes" as the positive class: accuracy, precision, recall, F1, yes-ratio (+ 95% CIs)."""
    p = np.asarray(preds, bool)
    y = np.asarray(labels, bool)
    n = len(p)
    tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())

    def f1(ix):
        a, b = p[ix], y[ix]
        t, f_p, f_n = (a & b).sum(), (a & ~b).sum(), (~a & b).sum()
        return 2 * t / (2 * t + f_p + f_n) if (2 * t + f_p + f_n) else float("nan")

    f1v = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
    return {"accuracy": proportion(int((p == y).sum()), n), "precision": proportion(tp, tp + fp),
            "recall": proportion(tp, tp + fn), "f1": {"value": f1v, "ci95": bootstrap_ci(f1, n), "n": n},
            "yes_ratio": proportion(int(p.sum()), n), "tp": tp, "fp": fp, "fn": fn, "tn": n - tp - fp - fn}


def yes_no_ids(tokenizer) -> tuple:
    """First token ids of the answer words "Yes"/"yes" and "No"/"no" (as the answer's first token)."""
    def first(words):
        ids = {tokenizer.encode(w, add_special_tokens=False)[0] for w in words}
        return sorted(ids)

    return first(["Yes", "yes"]), first(["No", "no"])


def eval_pope(ev: Evaluator, questions: List[dict], limit: Optional[int] = None, progress: bool = True) -> dict:
    import mlx.core as mx

    if limit is not None:
        questions = questions[:limit]
    if not questions:
        raise BonsaiError("the POPE file has no questions")
    ev.check_images(q["image"] for q in questions)
    yes_ids, no_ids = yes_no_ids(ev.processor.tokenizer._tokenizer)
    preds, labels, rows = [], [], []
    for q in _progress(questions, len(questions), "eval pope", progress):
        logits = ev.next_token_logits([("user", "<image>\n" + q["text"])], q["image"])
        y, n = mx.max(logits[mx.array(yes_ids)]), mx.max(logits[mx.array(no_ids)])
        pred = bool(y > n)
        preds.append(pred)
        labels.append(str(q["label"]).lower() == "yes")
        rows.append({"question_id": q.get("question_id"), "image": q["image"], "text": q["text"],
                     "label": q["label"], "prediction": "yes" if pred else "no"})
    res = {"task": "pope", **pope_metrics(preds, labels), "predictions": rows}
    return res


def build_pope(annotations, out, images_dir=None, num_images: int = 500, per_image: int = 3, seed: int = 0,
               splits: Sequence[str] = ("random", "popular", "adversarial")) -> Dict[str, Path]:
    """POPE question files from a COCO-format annotation file (Li et al., 2023, "Evaluating Object Hallucination").

    For each of `num_images` images (seeded choice among those with at least one object) up to `per_image` present
    categories become "yes" questions and as many absent ones "no" questions, sampled
    - random: uniformly among absent categories;
    - popular: the most frequent categories of the whole file, skipping present ones;
    - adversarial: the categories that co-occur most often with the present ones, skipping present ones.
    Writes `<out stem>_<split>.jsonl` beside `out` and returns the paths.
    """
    ann_path = Path(annotations)
    try:
        coco = json.loads(ann_path.read_text())
    except FileNotFoundError:
        raise BonsaiError(f"annotations {ann_path}: no such file") from None
    except json.JSONDecodeError as e:
        raise BonsaiError(f"annotations {ann_path}: invalid JSON at line {e.lineno} column {e.colno}") from None
    if not isinstance(coco, dict) or not all(k in coco for k in ("images", "annotations", "categories")):
        raise BonsaiError(f"annotations {ann_path}: not a COCO instances file (needs images, annotations, categories)")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    present: Dict[int, set] = defaultdict(set)
    for a in coco["annotations"]:
        if a["category_id"] in names and a["image_id"] in files:
            present[a["image_id"]].add(names[a["category_id"]])
    if images_dir is not None:
        missing = [files[i] for i in present if not (Path(images_dir) / files[i]).is_file()]
        if missing:
            raise BonsaiError(f"{len(missing)} annotated images are missing under --images {images_dir} "
                              f"(e.g. {missing[0]})")
    freq = Counter(n for objs in present.values() for n in objs)
    popular = [n for n, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))]
    co: Dict[str, Counter] = defaultdict(Counter)
    for objs in present.values():
        for a in objs:
            for b in objs:
                if a != b:
                    co[a][b] += 1
    all_names = sorted(set(names.values()))
    rng = random.Random(seed)
    chosen = sorted(present)
    rng.shuffle(chosen)
    chosen = sorted(chosen[:num_images])
    # the "yes" questions are the same in every split (as in POPE); only the negatives differ
    positives = {i: rng.sample(sorted(present[i]), min(per_image, len(present[i]))) for i in chosen}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in splits:
        if split not in ("random", "popular", "adversarial"):
            raise BonsaiError(f"unknown POPE split {split!r}; use random, popular or adversarial")
        srng = random.Random(f"{seed}-{split}")
        lines = []
        for image_id in chosen:
            objs = present[image_id]
            pos = positives[image_id]
            absent = [n for n in all_names if n not in objs]
            if split == "random":
                neg = srng.sample(absent, min(len(pos), len(absent)))
            elif split == "popular":
                neg = [n for n in popular + all_names if n not in objs]
                neg = list(dict.fromkeys(neg))[: len(pos)]
            else:
                score = Counter()
                for o in objs:
                    score.update(co[o])
                ranked = sorted(absent, key=lambda n: (-score[n], -freq[n], n))
                neg = ranked[: len(pos)]
            qs = [(n, "yes") for n in pos] + [(n, "no") for n in neg]
            for name, label in qs:
                lines.append({"question_id": len(lines) + 1, "image": files[image_id], "image_id": image_id,
                              "text": f"Is there a {name} in the image?", "label": label, "object": name})
        path = out.with_name(f"{out.stem}_{split}{out.suffix or '.jsonl'}")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
        tmp.replace(path)
        paths[split] = path
    return paths
