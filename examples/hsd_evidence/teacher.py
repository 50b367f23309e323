"""Train a small LLaVA-1.5-style teacher on the shapes data, in PyTorch, and save it in the llava-hf layout.

    python examples/hsd_evidence/teacher.py --data DATA_DIR --out TEACHER_DIR [--steps 1500]

The teacher differs from the bonsai student where the real pair differs: a CLIP vision tower (feature layer -2,
CLS dropped: LLaVA-1.5's "default" strategy) instead of SigLIP, a Llama LM instead of Qwen2, a Llama-2-style
SentencePiece BPE tokenizer (`teacher_cache.testing.train_llama_tokenizer`, `<image>` and `<pad>` added) instead of
Qwen's byte-level BPE, and LLaVA-1.5's Vicuna-v1 prompt (`teacher_cache.prompt.vicuna_text`, the very function the
teacher tool uses). It is saved with `save_pretrained` + a `CLIPImageProcessor`, so `python -m teacher_cache build`
loads it exactly as it loads `llava-hf/llava-1.5-7b-hf`.

Training, in the recipe the pico student needed (README "Offline demo"): weights ~ normal(0, 0.1) (transformers'
0.02 stalls at these widths), the CLIP tower first pretrained as a multi-label classifier of the training split's
COCO annotations (which colour+shape categories are in the image), then the whole model trained on the assistant
tokens (labels -100 elsewhere, LLaVA's rule). 48 px images in 16 px patches: one patch per cell of the scenes' 3×3
grid, as for the student. Writes `teacher_eval.json` (held-out accuracy per type, 95% Wilson intervals).

PyTorch + transformers only; never imports mlx.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from bonsai_mlx.evaluate.stats import normalize_answer, proportion
from bonsai_mlx.processing import load_image
from bonsai_mlx.prompting import parse_turns
from teacher_cache.prompt import VICUNA_SYSTEM, vicuna_text
from teacher_cache.records import frame_image
from teacher_cache.testing import train_llama_tokenizer

IMAGE_SIZE, PATCH = 48, 16
GRID_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 9: the 3×3 scene grid


def build_model(tokenizer, width: int, layers: int, seed: int, std: float = 0.1) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    v = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3, num_attention_heads=4,
                         image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=width)
    t = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=-(-len(tokenizer) // 64) * 64, max_position_embeddings=512,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=v, text_config=t, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=GRID_TOKENS, projector_hidden_act="gelu", pad_token_id=tokenizer.pad_token_id)
    model = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # normal(0, std) weights, zero biases, unit norms (as bonsai_mlx.pico.hf_init)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
    return model


class Images:
    """Pixel values as the teacher tool frames them ("resize": stretched to 48×48, no crop), cached per file."""

    def __init__(self, root: Path, proc: CLIPImageProcessor):
        self.root, self.proc, self.cache = root, proc, {}

    def __call__(self, rel: str) -> torch.Tensor:
        if rel not in self.cache:
            img = frame_image(load_image(self.root / rel), "resize", IMAGE_SIZE, self.proc.image_mean)
            self.cache[rel] = self.proc(images=img, return_tensors="pt", do_resize=False,
                                        do_center_crop=False)["pixel_values"][0]
        return self.cache[rel]


def encode(tokenizer, record) -> tuple:
    """(input ids, labels): labels on the assistant tokens and their `</s>`, -100 elsewhere."""
    turns, _ = parse_turns(record)
    text, spans = vicuna_text(turns, GRID_TOKENS)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, labels = list(enc["input_ids"]), []
    for tid, (a, b) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(s < b <= e + len("</s>") and a < e + len("</s>") for s, e in spans)
        labels.append(tid if inside else -100)
    return ids, labels


def collate(batch, pad_id: int):
    T = max(len(i) for i, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    lab = torch.full((len(batch), T), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for r, (i, y) in enumerate(batch):
        ids[r, : len(i)], lab[r, : len(y)], mask[r, : len(i)] = torch.tensor(i), torch.tensor(y), 1
    return ids, lab, mask


def lr_at(step: int, total: int, peak: float, warmup: float = 0.05) -> float:
    w = max(int(total * warmup), 1)
    if step < w:
        return peak * (step + 1) / w
    return peak * 0.5 * (1 + math.cos(math.pi * (step - w) / max(total - w, 1)))


def pretrain_vision(model, images: Images, instances: Path, steps: int, seed: int, batch: int = 32) -> dict:
    """Multi-label BCE of the training split's categories from the max over patch features (layer -2, no CLS)."""
    coco = json.loads(instances.read_text())
    cats = {c["id"]: k for k, c in enumerate(coco["categories"])}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    target = {i: torch.zeros(len(cats)) for i in files}
    for a in coco["annotations"]:
        target[a["image_id"]][cats[a["category_id"]]] = 1.0
    ids = sorted(files)
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(cats))
    opt = torch.optim.Adam(list(tower.parameters()) + list(head.parameters()), lr=1e-3)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        pick = rng.choice(len(ids), size=min(batch, len(ids)), replace=False)
        x = torch.stack([images(files[ids[i]]) for i in pick])
        y = torch.stack([target[ids[i]] for i in pick])
        feats = tower(x, output_hidden_states=True).hidden_states[-2][:, 1:]  # [N, 9, D]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(feats).amax(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"steps": steps, "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}


def train_lm(model, tokenizer, records, images: Images, steps: int, batch: int, lr: float, seed: int, log) -> list:
    encoded = [encode(tokenizer, r) for r in records]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list = []
    curve, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        if len(order) < batch:
            order = list(range(len(records)))
            rng.shuffle(order)
        pick, order = order[:batch], order[batch:]
        ids, lab, mask = collate([encoded[i] for i in pick], tokenizer.pad_token_id)
        px = torch.stack([images(records[i]["image"]) for i in pick])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            log(f"  step {step + 1}/{steps}  loss {np.mean(curve[-100:]):.4f}  {el / (step + 1):.3f} s/step  "
                f"ETA {el / (step + 1) * (steps - step - 1):.0f} s")
    model.eval()
    return curve


@torch.inference_mode()
def evaluate(model, tokenizer, records, images: Images, batch: int = 50, max_new_tokens: int = 8) -> dict:
    """Greedy answers to single-question held-out records, scored as `bonsai-mlx eval --task vqa` scores them."""
    tokenizer.padding_side = "left"
    per_type: dict = {}
    preds = []
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        prompts = [VICUNA_SYSTEM + " USER: " + r["conversations"][0]["value"].replace("<image>", "<image>" * GRID_TOKENS)
                   + " ASSISTANT:" for r in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        px = torch.stack([images(r["image"]) for r in chunk])
        out = model.generate(**enc, pixel_values=px, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for r, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:], strict=True):
            pred = tokenizer.decode(seq, skip_special_tokens=True).strip()
            truth = r["conversations"][1]["value"]
            ok = normalize_answer(pred) == normalize_answer(truth)
            per_type.setdefault(r.get("type", "all"), []).append(ok)
            preds.append({"id": r["id"], "type": r.get("type"), "prediction": pred, "answer": truth, "correct": ok})
    tokenizer.padding_side = "right"
    every = [x for v in per_type.values() for x in v]
    return {"accuracy": proportion(sum(every), len(every)),
            "per_type": {t: proportion(sum(v), len(v)) for t, v in sorted(per_type.items())},
            "predictions": preds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="shapes folder (train.json, eval.json, instances_train.json)")
    ap.add_argument("--out", required=True, type=Path, help="teacher directory to write (llava-hf layout)")
    ap.add_argument("--steps", type=int, default=1500, help="LM training steps [1500]")
    ap.add_argument("--vision-steps", type=int, default=300, help="vision-tower pretraining steps [300]")
    ap.add_argument("--width", type=int, default=128, help="hidden size of both towers [128]")
    ap.add_argument("--layers", type=int, default=4, help="Llama layers [4]")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on one) [1]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=8, help="longest held-out answer generated [8]")
    ap.add_argument("--word-pieces", action="store_true",
                    help="a tokenizer whose merges stay inside words, as Llama's (teacher_cache.testing)")
    a = ap.parse_args(argv)
    for f in ("train.json", "eval.json", "instances_train.json"):
        if not (a.data / f).exists():
            ap.error(f"--data {a.data}: no {f} (make it with examples/shapes/make_shapes.py)")
    if a.steps < 1:
        ap.error("--steps must be at least 1")
    torch.set_num_threads(a.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    train = json.loads((a.data / "train.json").read_text())
    held_out = json.loads((a.data / "eval.json").read_text())
    corpus = [t["value"].replace("<image>\n", "") for r in train for t in r["conversations"]]
    tokenizer = train_llama_tokenizer(corpus, word_pieces=a.word_pieces)
    model = build_model(tokenizer, a.width, a.layers, a.seed)
    proc = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    images = Images(a.data, proc)
    log(f"teacher: CLIP {IMAGE_SIZE}px/{PATCH}px + {a.layers}-layer Llama, width {a.width}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vocab {len(tokenizer)}")
    vis = pretrain_vision(model, images, a.data / "instances_train.json", a.vision_steps, a.seed)
    log(f"vision pretraining: {a.vision_steps} steps, multi-label loss {vis['loss_first']:.3f} → {vis['loss_last']:.3f}")
    curve = train_lm(model, tokenizer, train, images, a.steps, a.batch_size, a.lr, a.seed, log)
    result = evaluate(model, tokenizer, held_out, images, max_new_tokens=a.max_new_tokens)
    acc = result["accuracy"]
    log(f"teacher held-out accuracy {acc['value']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}]; " + ", ".join(
        f"{t} {m['value']:.2f}" for t, m in result["per_type"].items()))
    tmp = a.out.with_name(a.out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))  # safetensors
    tokenizer.save_pretrained(str(tmp))
    proc.save_pretrained(str(tmp))
    result.update(vision_pretrain=vis, steps=a.steps, final_loss=float(np.mean(curve[-50:])),
                  elapsed_s=time.perf_counter() - t0, config=vars(a) | {"data": str(a.data), "out": str(a.out)})
    (tmp / "teacher_eval.json").write_text(json.dumps(result, indent=1) + "\n")
    if a.out.exists():
        import shutil

        shutil.rmtree(a.out)
    os.replace(tmp, a.out)
    log(f"teacher → {a.out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
