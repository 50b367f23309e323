"""The shapes data generator, the POPE builder and metrics, answer normalization and the confidence intervals."""

import hashlib
import json
import math
from collections import Counter, defaultdict

import pytest
from PIL import Image

from bonsai_mlx.evaluate.pope import build_pope, pope_metrics
from bonsai_mlx.evaluate.stats import normalize_answer, wilson
from bonsai_mlx.evaluate.vqa import vqa_items
from bonsai_mlx.shapes import CHANCE, COLOURS, QUESTION_TYPES, SHAPES, build_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    build_shapes(out, n_train=60, n_eval=150, seed=3)
    return out


def _load(p):
    return json.loads(p.read_text())


def test_generator_is_seeded_and_splits_are_disjoint(shapes, tmp_path):
    again = tmp_path / "again"
    build_shapes(again, n_train=60, n_eval=150, seed=3)
    for name in ("train.json", "eval.json", "instances_eval.json", "train/000007.png", "eval/000011.png"):
        assert (shapes / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    build_shapes(other, n_train=60, n_eval=150, seed=4)
    assert (other / "train.json").read_bytes() != (shapes / "train.json").read_bytes()
    digest = lambda p: hashlib.sha256(Image.open(p).tobytes()).hexdigest()  # noqa: E731
    train = {digest(p) for p in (shapes / "train").glob("*.png")}
    held = {digest(p) for p in (shapes / "eval").glob("*.png")}
    assert len(train) == 60 and len(held) == 150 and not train & held


def test_held_out_has_equal_shares_and_consistent_answers(shapes):
    records = _load(shapes / "eval.json")
    coco = _load(shapes / "instances_eval.json")
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    assert len(cats) == len(COLOURS) * len(SHAPES)
    by_file = {im["file_name"]: im["id"] for im in coco["images"]}
    objs = defaultdict(list)
    for a in coco["annotations"]:
        objs[a["image_id"]].append((cats[a["category_id"]], a["bbox"]))
    types = Counter(r["type"] for r in records)
    assert set(types) == set(QUESTION_TYPES) and len(set(types.values())) == 1
    counts = Counter(r["conversations"][1]["value"] for r in records if r["type"] == "count")
    assert counts == {"1": 10, "2": 10, "3": 10}
    answers = defaultdict(Counter)
    for r in records:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert q.startswith("<image>\n")
        present = objs[by_file[r["image"]]]
        names = [n for n, _ in present]
        answers[r["type"]][a] += 1
        if r["type"] == "count":
            assert int(a) == len(present)
        elif r["type"] == "existence":
            asked = q.split("Is there a ")[1].split(" in the image")[0]
            assert (asked in names) == (a == "yes")
            if a == "no":  # near miss: shares colour or shape with something present
                c, s = asked.split()
                assert any(c == n.split()[0] or s == n.split()[1] for n in names)
        elif r["type"] == "left_right":
            a_name, b_name = q.split("Is the ")[1].split(" to the left or to the right of the ")
            b_name = b_name.rstrip("?")
            xa = next(b[0] + b[2] / 2 for n, b in present if n == a_name)
            xb = next(b[0] + b[2] / 2 for n, b in present if n == b_name)
            assert (xa < xb) == (a == "left")
        elif r["type"] == "colour":
            shape = q.split("What colour is the ")[1].rstrip("?")
            assert f"{a} {shape}" in names
        elif r["type"] == "shape":
            colour = q.split("What shape is the ")[1].split(" object")[0]
            assert f"{colour} {a}" in names
    # the binary answers are exactly balanced
    assert answers["existence"] == {"yes": 15, "no": 15} and answers["left_right"] == {"left": 15, "right": 15}


def test_train_records_are_multi_turn_and_parse(shapes):
    records = _load(shapes / "train.json")
    items = vqa_items(records)
    assert len(items) == sum(len(r["conversations"]) // 2 for r in records)
    for r in records:
        assert len(r["types"]) == len(r["conversations"]) // 2 >= 4
        assert len(set(r["types"])) == len(r["types"])
    assert {it["type"] for it in items} == set(QUESTION_TYPES)
    assert sum(CHANCE[t] for t in QUESTION_TYPES) / 5 < 0.5


def test_normalize_answer_and_wilson():
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("The Circle!") == "circle"
    assert normalize_answer(" yes\n") == "yes"
    assert normalize_answer("a red square") == "red square"
    # Wilson 95% interval of 8/10 (textbook value: 0.490, 0.943)
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert all(math.isnan(x) for x in wilson(0, 0))  # no samples, no interval


def test_pope_metrics_on_hand_built_predictions():
    labels = [True, True, True, True, False, False, False, False]
    preds = [True, True, True, False, True, False, False, False]
    m = pope_metrics(preds, labels)
    # tp 3, fn 1, fp 1, tn 3
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 3)
    assert m["accuracy"]["value"] == pytest.approx(6 / 8)
    assert m["precision"]["value"] == pytest.approx(3 / 4)
    assert m["recall"]["value"] == pytest.approx(3 / 4)
    assert m["f1"]["value"] == pytest.approx(0.75)
    assert m["yes_ratio"]["value"] == pytest.approx(4 / 8)
    assert m["accuracy"]["n"] == 8 and m["precision"]["n"] == 4 and m["recall"]["n"] == 4
    lo, hi = m["accuracy"]["ci95"]
    assert lo < 0.75 < hi and (lo, hi) == tuple(wilson(6, 8))
    lo, hi = m["f1"]["ci95"]
    assert 0 <= lo <= 0.75 <= hi <= 1
    # an always-yes model: recall 1, precision 0.5, yes-ratio 1
    m = pope_metrics([True] * 8, labels)
    assert m["recall"]["value"] == 1 and m["precision"]["value"] == 0.5 and m["yes_ratio"]["value"] == 1
    assert m["f1"]["value"] == pytest.approx(2 / 3)


def test_pope_builder_splits(shapes, tmp_path):
    ann = shapes / "instances_eval.json"
    coco = _load(ann)
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    present = defaultdict(set)
    for a in coco["annotations"]:
        present[files[a["image_id"]]].add(cats[a["category_id"]])
    freq = Counter(n for s in present.values() for n in s)
    paths = build_pope(ann, tmp_path / "pope.jsonl", images_dir=shapes, num_images=40, per_image=2, seed=1)
    assert set(paths) == {"random", "popular", "adversarial"}
    questions = {}
    for split, p in paths.items():
        assert p.name == f"pope_{split}.jsonl"
        qs = [json.loads(line) for line in p.read_text().splitlines()]
        questions[split] = qs
        per_image = defaultdict(Counter)
        for q in qs:
            per_image[q["image"]][q["label"]] += 1
            obj = q["text"].split("Is there a ")[1].split(" in the image?")[0]
            assert obj == q["object"]
            assert (obj in present[q["image"]]) == (q["label"] == "yes"), (split, q)
        assert len(per_image) == 40
        for img, c in per_image.items():  # balanced per image: as many no as yes, up to per_image each
            assert c["yes"] == c["no"] == min(2, len(present[img]))
        if split == "popular":  # negatives are the most frequent absent categories
            for q in qs:
                if q["label"] == "no":
                    absent = sorted((n for n in freq if n not in present[q["image"]]), key=lambda n: (-freq[n], n))
                    assert q["object"] in absent[:2]
    # the three splits ask the same yes questions about the same images
    yes = {s: sorted((q["image"], q["object"]) for q in qs if q["label"] == "yes") for s, qs in questions.items()}
    assert yes["random"] == yes["popular"] == yes["adversarial"]
    # adversarial negatives co-occur with the present objects at least as often as random ones on average
    co = defaultdict(Counter)
    for s in present.values():
        for a in s:
            for b in s:
                if a != b:
                    co[a][b] += 1

    def mean_co(split):
        vals = [sum(co[o][q["object"]] for o in present[q["image"]]) for q in questions[split] if q["label"] == "no"]
        return sum(vals) / len(vals)

    assert mean_co("adversarial") >= mean_co("random")


def test_pope_builder_bad_input(tmp_path):
    from bonsai_mlx.errors import BonsaiError

    with pytest.raises(BonsaiError, match="no such file"):
        build_pope(tmp_path / "missing.json", tmp_path / "p.jsonl")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(BonsaiError, match="not a COCO instances file"):
        build_pope(bad, tmp_path / "p.jsonl")
