"""A seeded synthetic visual-QA set: coloured shapes on a plain background.

Written in the LLaVA-Instruct format (JSON list of `{"id", "image", "conversations"}`) with PNG images, a train and a
held-out split on disjoint images, and a COCO-style `instances_<split>.json` of the same images (one category per
colour+shape, e.g. "red circle") for the POPE probe (`bonsai-mlx pope-build`).

Scenes: 1–3 objects with pairwise different colours and shapes, each in its own column and row of a 3×3 grid (with
jitter), so "left of" and "above" are always well defined and every object is named uniquely by its colour or shape.

Question types (answers are one lower-case word):
- colour      "What colour is the circle?"                              → red | green | blue | yellow
- shape       "What shape is the red object?"                           → circle | square | triangle
- count       "How many shapes are there?"                              → 1 | 2 | 3
- left_right  "Is the red circle to the left or to the right of the blue square?" → left | right
- existence   "Is there a green triangle in the image?"                 → yes | no (negatives are near misses: a present
  object's colour with another shape or its shape with another colour)
- above_below (not in the default mix) "Is the red circle above or below the blue square?" → above | below

With `answers="sentence"` every answer is instead a short sentence built from the same facts ("the circle is red",
"the red circle is to the left of the blue square", "no, there is no green triangle"), so that many answer tokens
follow each other (the logit-distillation evidence, examples/hsd_evidence/run.py --answers sentence).

Train records are multi-turn: one record per image with every applicable type in random order (the design note's
prototype found that several questions per image learn far faster than one). Held-out records have one question
each (`"type"` names it) with equal shares per type, counts 1/2/3 in equal shares and the binary answers exactly
balanced; per-turn types of train records are in `"types"`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from PIL import Image, ImageDraw

from .atomic import atomic_file, write_json

COLOURS: Dict[str, tuple] = {
    "red": (220, 40, 40),
    "green": (30, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
QUESTION_TYPES = ("colour", "shape", "count", "left_right", "existence")
ALL_TYPES = QUESTION_TYPES + ("above_below",)
# Chance accuracy of a model that knows the answer set but not the image (uniform over the answers it can give).
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "count": 1 / 3, "left_right": 0.5, "existence": 0.5,
          "above_below": 0.5}
GRID = 3


@dataclass
class Obj:
    colour: str
    shape: str
    cx: float  # centre, pixels
    cy: float
    size: float  # side / diameter, pixels
    col: int  # grid column (0 = left)
    row: int  # grid row (0 = top)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def bbox(self) -> List[float]:  # COCO [x, y, w, h]
        h = self.size / 2
        return [round(self.cx - h, 2), round(self.cy - h, 2), round(self.size, 2), round(self.size, 2)]


def make_scene(rng: random.Random, n: int, size: int) -> List[Obj]:
    colours = rng.sample(list(COLOURS), n)
    shapes = rng.sample(list(SHAPES), n)
    cols = rng.sample(range(GRID), n)
    rows = rng.sample(range(GRID), n)
    cell = size / GRID
    objs = []
    for c, s, col, row in zip(colours, shapes, cols, rows, strict=True):
        side = cell * rng.uniform(0.65, 0.9)
        slack = (cell - side) / 2
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        objs.append(Obj(c, s, cx, cy, side, col, row))
    return objs


def render(objs: Sequence[Obj], size: int, rng: random.Random) -> Image.Image:
    grey = rng.randint(225, 255)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    d = ImageDraw.Draw(img)
    for o in objs:
        h = o.size / 2
        box = [o.cx - h, o.cy - h, o.cx + h, o.cy + h]
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            d.ellipse(box, fill=fill)
        elif o.shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(o.cx, o.cy - h), (o.cx + h, o.cy + h), (o.cx - h, o.cy + h)], fill=fill)
    return img


def ask(qtype: str, objs: Sequence[Obj], rng: random.Random, subject: Optional[Obj] = None,
        want: Optional[bool] = None) -> Optional[tuple]:
    """(question, answer) of the given type about the scene, or None when the scene cannot pose it. `subject`: the
    object a colour/shape question is about (default: a random one); `want`: for the binary types, force the first
    answer (yes / left / above) or the second (default: a fair coin)."""
    if qtype == "colour":
        o = subject or rng.choice(objs)
        return f"What colour is the {o.shape}?", o.colour
    if qtype == "shape":
        o = subject or rng.choice(objs)
        return f"What shape is the {o.colour} object?", o.shape
    if qtype == "count":
        return "How many shapes are there?", str(len(objs))
    if qtype in ("left_right", "above_below"):
        if len(objs) < 2:
            return None
        a, b = rng.sample(list(objs), 2)
        first = (a.col < b.col) if qtype == "left_right" else (a.row < b.row)
        if want is not None and first != want:
            a, b = b, a
        if qtype == "left_right":
            return (f"Is the {a.name} to the left or to the right of the {b.name}?",
                    "left" if a.col < b.col else "right")
        return f"Is the {a.name} above or below the {b.name}?", "above" if a.row < b.row else "below"
    if qtype == "existence":
        present = {o.name for o in objs}
        if (rng.random() < 0.5) if want is None else want:
            return f"Is there a {rng.choice(objs).name} in the image?", "yes"
        # near miss: keep one attribute of a present object, change the other
        o = rng.choice(objs)
        options = [f"{c} {o.shape}" for c in COLOURS if c != o.colour] + [f"{o.colour} {s}" for s in SHAPES if s != o.shape]
        options = [x for x in options if x not in present]
        return f"Is there a {rng.choice(options)} in the image?", "no"
    raise ValueError(f"unknown question type {qtype!r}; known: {ALL_TYPES}")


def sentence(qtype: str, question: str, answer: str) -> str:
    """The one-word `answer` to `question` (of `ask`) as a short sentence stating the same fact."""
    import re

    if qtype == "colour":  # What colour is the circle?
        return f"the {question.split()[-1].rstrip('?')} is {answer}"
    if qtype == "shape":  # What shape is the red object?
        return f"the {question.split()[4]} object is a {answer}"
    if qtype == "count":
        return "there is 1 shape" if answer == "1" else f"there are {answer} shapes"
    if qtype in ("left_right", "above_below"):  # Is the red circle to the left or to the right of the blue square?
        a, b = re.match(r"Is the (\w+ \w+) .* the (\w+ \w+)\?$", question).groups()
        rel = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[answer]
        return f"the {a} is {rel} the {b}"
    if qtype == "existence":  # Is there a green triangle in the image?
        name = question[len("Is there a "):-len(" in the image?")]
        return f"yes, there is a {name}" if answer == "yes" else f"no, there is no {name}"
    raise ValueError(f"unknown question type {qtype!r}")


def _save_png(img: Image.Image, path: Path) -> None:
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")


def _write_json(obj, path: Path) -> None:
    write_json(path, obj)


def generate_split(out: Path, split: str, n_images: int, rng: random.Random, size: int, types: Sequence[str],
                   multi_turn: bool, answers: str = "word") -> dict:
    """Write `split/*.png`, return {"records": [...], "coco": {...}}.

    multi_turn: one record per image with every applicable type (train). Otherwise one question per image, the types
    taking turns so each gets an equal share (held-out); scenes for left/right and above/below get ≥ 2 objects.
    """
    (out / split).mkdir(parents=True, exist_ok=True)
    records, images, anns = [], [], []
    cats = {f"{c} {s}": i + 1 for i, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES)}
    for k in range(n_images):
        qtype = None if multi_turn else types[k % len(types)]
        lo = 2 if qtype in ("left_right", "above_below") else 1
        n = rng.randint(lo, 3) if qtype != "count" else [1, 2, 3][(k // len(types)) % 3]  # counts 1-3 in equal shares
        objs = make_scene(rng, n, size)
        name = f"{split}/{k:06d}.png"
        _save_png(render(objs, size, rng), out / name)
        image_id = k + 1
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        for o in objs:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cats[o.name], "bbox": o.bbox(),
                         "area": round(o.size * o.size, 2), "iscrowd": 0})
        rid = f"shapes_{split}_{k:06d}"
        if multi_turn:
            order = list(types)
            rng.shuffle(order)
            # colour and shape questions about different objects where there are two, so that one answer does not
            # give away the other ("the circle is red" → "the red object is a circle")
            subjects = rng.sample(list(objs), min(2, len(objs)))
            subj = {"colour": subjects[0], "shape": subjects[-1]}
            qa = [(t, ask(t, objs, rng, subj.get(t))) for t in order]
            qa = [(t, x) for t, x in qa if x is not None]
            if answers == "sentence":
                qa = [(t, (q, sentence(t, q, a))) for t, (q, a) in qa]
            conv = []
            for i, (_, (q, a)) in enumerate(qa):
                conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
            records.append({"id": rid, "image": name, "conversations": conv, "types": [t for t, _ in qa]})
        else:
            # binary answers alternate within each type, so yes/no and left/right are exactly balanced
            q, a = ask(qtype, objs, rng, want=(k // len(types)) % 2 == 0)
            if answers == "sentence":
                a = sentence(qtype, q, a)
            records.append({"id": rid, "image": name, "type": qtype,
                            "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": i, "name": n, "supercategory": "shape"} for n, i in cats.items()]}
    return {"records": records, "coco": coco}


def build_shapes(out, n_train: int = 2000, n_eval: int = 250, seed: int = 0, size: int = 64,
                 types: Sequence[str] = QUESTION_TYPES, answers: str = "word") -> dict:
    """Generate the data set into `out` (train.json, eval.json, instances_{train,eval}.json, train/, eval/);
    returns the paths. The same seed gives byte-identical files."""
    if answers not in ("word", "sentence"):
        raise ValueError(f"answers must be 'word' or 'sentence', got {answers!r}")
    bad = [t for t in types if t not in ALL_TYPES]
    if bad:
        raise ValueError(f"unknown question types {bad}; known: {list(ALL_TYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, multi in (("train", n_train, True), ("eval", n_eval, False)):
        # each split has its own stream, so the held-out images do not depend on the train size
        rng = random.Random(f"{seed}-{split}")
        res = generate_split(out, split, n, rng, size, list(types), multi, answers)
        _write_json(res["records"], out / f"{split}.json")
        _write_json(res["coco"], out / f"instances_{split}.json")
        paths[split] = out / f"{split}.json"
        paths[f"instances_{split}"] = out / f"instances_{split}.json"
    meta = {"seed": seed, "n_train": n_train, "n_eval": n_eval, "size": size, "types": list(types), "answers": answers,
            "chance": {t: CHANCE[t] for t in types}}
    _write_json(meta, out / "shapes.json")
    paths["root"] = out
    return paths
