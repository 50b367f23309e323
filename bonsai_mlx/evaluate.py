"""Evaluation: held-out loss, short-answer VQA accuracy per question type, and the POPE hallucination probe.

Every metric comes with its sample count and a 95% confidence interval: Wilson score intervals for proportions
(accuracy, precision, recall, yes-ratio), a seeded bootstrap over samples for the loss and F1.

- `loss`: mean cross-entropy (and perplexity) over the assistant tokens of a LLaVA-Instruct JSON (the training loss).
- `vqa`: every assistant turn of every record is a question; the prompt is the conversation up to that turn (earlier
  answers as given, i.e. teacher-forced history) and the answer is generated greedily. Scoring is normalized exact
  match (the VQA-v2 normalization: lower case, punctuation and articles dropped, number words → digits). A turn's type
  is `record["types"][k]` (multi-turn) or `record["type"]`, else "all".
- `pope`: POPE (Li et al., 2023): JSON lines `{"question_id", "image", "text", "label": "yes"|"no"}`; the answer is
  decided by comparing the next-token logits of "Yes"/"yes" and "No"/"no" after the assistant header (no sampling).
  `build_pope` writes random / popular / adversarial splits from any COCO-format annotation file.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .errors import BonsaiError

Z95 = 1.959963984540054


# --- statistics -------------------------------------------------------------------------------------------------


def wilson(k: float, n: int, z: float = Z95) -> List[float]:
    """95% Wilson score interval of a proportion k/n ([nan, nan] when n is 0)."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, centre - half), min(1.0, centre + half)]


def proportion(k: float, n: int) -> dict:
    return {"value": k / n if n else float("nan"), "ci95": wilson(k, n), "n": n}


def bootstrap_ci(stat, n: int, reps: int = 1000, seed: int = 0) -> List[float]:
    """Percentile bootstrap 95% interval of `stat(indices)` over n samples."""
    if n == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(reps)], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return [float("nan"), float("nan")]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


# --- answers ----------------------------------------------------------------------------------------------------

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$.:']")


def normalize_answer(s: str) -> str:
    """VQA-v2-style normalization: 'Two.' → '2', 'The Circle!' → 'circle', 'colour' spelling kept as given."""
    s = _PUNCT.sub(" ", s.lower().replace("\n", " "))
    words = [_NUMBERS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_items(records: list, source: str = "data") -> List[dict]:
    """One item per assistant turn: {id, image, turns (up to and including the question), answer, type}."""
    from .prompting import RecordError, parse_turns

    items = []
    for i, rec in enumerate(records):
        rid = str(rec.get("id", i)) if isinstance(rec, dict) else str(i)
        try:
            turns, image = parse_turns(rec)
        except RecordError as e:
            raise BonsaiError(f"{source}: record {rid}: {e}") from None
        types = rec.get("types") if isinstance(rec.get("types"), list) else None
        k = 0
        for j, (role, text) in enumerate(turns):
            if role != "assistant":
                continue
            qtype = types[k] if types is not None and k < len(types) else rec.get("type", "all")
            items.append({"id": rid, "turn": k, "image": image, "turns": turns[:j], "answer": text, "type": qtype})
            k += 1
    return items


# --- the model side -----------------------------------------------------------------------------------------------


class Evaluator:
    """A loaded student + processor, with image features cached per image (several questions share one)."""

    def __init__(self, model, processor, image_root=None, system: Optional[str] = None):
        self.model, self.processor, self.system = model, processor, system
        self.root = Path(image_root) if image_root is not None else None
        self._feats: Dict[str, object] = {}
        model.eval()

    def check_images(self, images) -> None:
        """Fail before any work when an image is missing (one line naming the first and the count)."""
        names = sorted({i for i in images if i is not None})
        if names and self.root is None:
            raise BonsaiError(f"the records have images (e.g. {names[0]!r}) but no --image-root was given")
        missing = [n for n in names if not (self.root / n).is_file()]
        if missing:
            raise BonsaiError(f"{len(missing)} of {len(names)} images not found, e.g. {self.root / missing[0]} "
                              "(check --image-root)")

    def image_features(self, image: Optional[str]):
        import mlx.core as mx

        if image is None:
            return None
        if image not in self._feats:
            if self.root is None:
                raise BonsaiError(f"a record has image {image!r} but no --image-root was given")
            path = self.root / image
            if not path.is_file():
                raise BonsaiError(f"image {path} not found (check --image-root)")
            px = mx.array(self.processor.image_processor([path]))
            feats = self.model.get_image_features(px)
            mx.eval(feats)
            if len(self._feats) > 64:
                self._feats.clear()
            self._feats[image] = feats
        return self._feats[image]

    def prompt_embeddings(self, turns, image):
        import mlx.core as mx

        from .prompting import IM_START, chat_text

        text, _ = chat_text(turns, self.system, self.processor.image_seq_length)
        text += f"{IM_START}assistant\n"
        ids = self.processor.tokenizer._tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = mx.array(ids)
        emb = self.model.get_input_embeddings(ids[None], image_features=self.image_features(image))[0]  # [T, D]
        return ids, emb

    def answer(self, turns, image, max_tokens: int = 8) -> str:
        """Greedy answer via mlx-lm's generate_step (KV cache), stopping at an EOS token."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        ids, emb = self.prompt_embeddings(turns, image)
        eos = set(self.processor.tokenizer.eos_token_ids)
        out = []
        for tok, _ in generate_step(ids, self.model.language_model, max_tokens=max_tokens,
                                    sampler=lambda lp: mx.argmax(lp, axis=-1), input_embeddings=emb):
            t = int(tok)
            if t in eos:
                break
            out.append(t)
        return self.processor.tokenizer._tokenizer.decode(out)

    def next_token_logits(self, turns, image):
        from .language import lm_forward

        _, emb = self.prompt_embeddings(turns, image)
        # last position only: full-prompt logits would be 151936 × T floats for Qwen
        logits, _ = lm_forward(self.model.language_model, emb[None], last_only=True)  # [1, 1, V]
        return logits[0, -1]


def _progress(it, total: int, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="q", dynamic_ncols=True, disable=not show, leave=False)


def eval_vqa(ev: Evaluator, records: list, limit: Optional[int] = None, max_tokens: int = 8, progress: bool = True,
             source: str = "data") -> dict:
    items = vqa_items(records, source)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise BonsaiError(f"{source}: no questions (records need a gpt turn)")
    ev.check_images(it["image"] for it in items)
    per_type: Dict[str, List[int]] = defaultdict(list)
    preds = []
    for it in _progress(items, len(items), "eval vqa", progress):
        pred = ev.answer(it["turns"], it["image"], max_tokens)
        ok = int(normalize_answer(pred) == normalize_answer(it["answer"]))
        per_type[it["type"]].append(ok)
        preds.append({"id": it["id"], "turn": it["turn"], "type": it["type"], "answer": it["answer"],
                      "prediction": pred, "correct": bool(ok)})
    allv = [p["correct"] for p in preds]
    return {"task": "vqa", "accuracy": proportion(sum(allv), len(allv)),
            "per_type": {t: proportion(sum(v), len(v)) for t, v in sorted(per_type.items())},
            "predictions": preds}


def per_sample_ce(model, dataset, image_processor, pad_id: int, batch_size: int = 4) -> tuple:
    """(CE sums, supervised-token counts) per sample of a tokenized `SFTDataset`, in batches (right padding does not
    change a row's logits). The trainer's eval loss and `eval --task loss` both come from here."""
    import mlx.core as mx

    from .data import BatchIterator
    from .losses import masked_ce

    it = BatchIterator(dataset, batch_size, 0, image_processor, pad_id, drop_last=False)
    model.eval()
    sums, counts = [], []
    for idx in it.buckets:
        b = it.make_batch(idx)
        if b.input_ids.shape[0] == 0:
            continue
        ids = mx.array(b.input_ids)
        px = mx.array(b.pixel_values) if b.pixel_values is not None else None
        logits = model(ids, px)
        for r in range(ids.shape[0]):
            s, n = masked_ce(logits[r : r + 1], ids[r : r + 1], mx.array(b.labels_mask[r : r + 1]))
            sums.append(float(s))
            counts.append(float(n))
    return np.array(sums), np.array(counts)


def eval_loss(model, processor, records: list, image_root, limit: Optional[int] = None, batch_size: int = 4,
              max_seq_len: int = 2048, source: str = "data") -> dict:
    from .data import SFTDataset

    if limit is not None:
        records = records[:limit]
    tok = processor.tokenizer._tokenizer
    ds = SFTDataset(records, tok, image_root, processor.image_seq_length, max_seq_len, source=source)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    sums_a, counts_a = per_sample_ce(model, ds, processor.image_processor, pad, batch_size)
    if counts_a.sum() == 0:
        raise BonsaiError(f"{source}: no supervised tokens to evaluate\n{ds.report()}")
    loss = float(sums_a.sum() / counts_a.sum())
    ci = bootstrap_ci(lambda ix: sums_a[ix].sum() / max(counts_a[ix].sum(), 1.0), len(sums_a))
    return {"task": "loss", "loss": {"value": loss, "ci95": ci, "n": len(sums_a)},
            "perplexity": {"value": math.exp(min(loss, 50)), "ci95": [math.exp(min(c, 50)) for c in ci],
                           "n": len(sums_a)},
            "tokens": int(counts_a.sum()), "skipped": dict(ds.skipped)}


# --- POPE -----------------------------------------------------------------------------------------------------------


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
