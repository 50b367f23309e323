"""Generate the synthetic shapes visual-QA set (LLaVA-Instruct JSON + PNGs + COCO-style annotations).

    python examples/shapes/make_shapes.py --out shapes --train 3000 --eval 250 --seed 0

Writes OUT/train.json (multi-turn: every question type per image), OUT/eval.json (one question per record, equal
shares of colour / shape / count / left_right / existence), OUT/instances_{train,eval}.json (COCO format, one
category per colour+shape, for `bonsai-mlx pope-build`), OUT/train/*.png, OUT/eval/*.png and OUT/shapes.json (the
settings and each type's chance level). The generator lives in `bonsai_mlx.shapes` so that `bonsai-mlx demo` can use
it from an installed package.
"""

import argparse

from bonsai_mlx.shapes import ALL_TYPES, QUESTION_TYPES, build_shapes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--train", type=int, default=3000, help="training images (one multi-turn record each)")
    ap.add_argument("--eval", type=int, default=250, help="held-out questions (one image each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="rendered image side in pixels")
    ap.add_argument("--types", default=",".join(QUESTION_TYPES),
                    help=f"comma-separated question types out of {', '.join(ALL_TYPES)}")
    a = ap.parse_args()
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    bad = [t for t in types if t not in ALL_TYPES]
    if bad:
        ap.error(f"unknown question types {bad}; choose from {', '.join(ALL_TYPES)}")
    paths = build_shapes(a.out, n_train=a.train, n_eval=a.eval, seed=a.seed, size=a.size, types=types)
    print(f"wrote {paths['train']}, {paths['eval']}, {paths['instances_eval']} (+ images) under {paths['root']}")


if __name__ == "__main__":
    main()
