"""Hidden-state distillation (phase `hsd`): the teacher cache on the MLX side, alignment projectors, targets.

The cache (teacher_cache/format.py; written by `python -m teacher_cache build`) is read with `safetensors.numpy` — no torch —
in the data loader's background thread. Targets are standardized per channel with the cache's mean/std (LLaMA
hidden states have massive outlier channels; raw MSE would be dominated by them):

    L_text = mean over aligned pairs (s, t) of ||A(h_s) - z(t)||² / D        (averaged over the text layer pairs)
    L_img  = mean over the student's image positions of ||A(h_i) - z(pool(t)_i)||² / D
    L_kd   = mean over aligned pairs of the logit loss between the student's and the teacher's next-token
             distributions there (train/kd.py: uld or mapped; caches built with --logits-topk)
    loss   = (1 - α) · CE + α · (L_text + λ_img · L_img) + β · L_kd
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from teacher_cache.format import CacheReader  # framework-free (NumPy + safetensors)

from ..errors import BonsaiError

PAD_MULTIPLE = 64  # pad the number of aligned pairs per batch: fewer distinct shapes → fewer recompiles


class TeacherCache(CacheReader):
    """The finished teacher cache as the trainer reads it: `teacher_cache.format.CacheReader` (the one reader of the
    format), plus the run checks and the standardization statistics."""

    def __init__(self, cache_dir):
        for f in ("manifest.json", "index.json", "stats.safetensors"):
            if not (Path(cache_dir) / f).exists():
                raise BonsaiError(f"--teacher-cache {cache_dir}: no {f} (build it with `python -m teacher_cache build` "
                                  "and check it with `python -m teacher_cache verify`)")
        super().__init__(cache_dir)
        self.stats = self.read_stats()

    @property
    def layers(self) -> List[int]:
        return list(self.manifest["layers"])

    @property
    def image_layers(self) -> List[int]:
        return list(self.manifest.get("image_layers") or [])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    def check(self, **expected) -> None:
        """Refuse a cache built for another run: one line naming the field that differs."""
        man = self.manifest
        got = {
            "student_tokenizer.sha256": man["student_tokenizer"]["sha256"],
            "dataset_sha256": man["dataset_sha256"],
            "prompt_template_version": man["prompt_template_version"],
            "student_image_tokens": man.get("student_image_tokens"),
        }
        for field, want in expected.items():
            if want is not None and got.get(field) != want:
                raise BonsaiError(f"teacher cache {self.dir} does not match this run: {field} is {got.get(field)!r} in "
                                  f"the manifest, {want!r} here; rebuild the cache for this student and data")


def parse_pairs(spec: Optional[str]) -> Optional[List[Tuple[int, int]]]:
    """'24:32,12:16' → [(24, 32), (12, 16)] (student hidden-state index : teacher hidden-state index)."""
    if spec is None or str(spec).strip() == "":
        return None
    out = []
    for part in str(spec).split(","):
        try:
            s, t = part.split(":")
            out.append((int(s), int(t)))
        except ValueError:
            raise BonsaiError(f"layer pair {part!r}: expected STUDENT:TEACHER, e.g. 24:32") from None
    return out


def resolve_pairs(cache: TeacherCache, student_layers: int, text_spec, image_spec, image_weight: float, log=print):
    """Default pairs: text = student last ↔ the cache's deepest text layer; image = the cache's image layer ↔ the
    student layer at the same relative depth (real models: 24↔32 and 6↔8)."""
    t_depth = int(cache.manifest.get("teacher_num_layers") or max(cache.layers))
    text = parse_pairs(text_spec) or [(student_layers, max(cache.layers))]
    for s, t in text:
        if t not in cache.layers:
            raise BonsaiError(f"--text-layers {s}:{t}: the cache has no teacher layer {t}; it has {cache.layers}")
        if not 0 <= s <= student_layers:
            raise BonsaiError(f"--text-layers {s}:{t}: the student has hidden states 0..{student_layers}")
    image = None
    pairs = parse_pairs(image_spec)
    if pairs:
        image = pairs[0]
        if image[1] not in cache.image_layers:
            raise BonsaiError(f"--image-layer {image[0]}:{image[1]}: the cache has no image states of teacher layer "
                              f"{image[1]}; it has {cache.image_layers or 'none'}")
    elif cache.image_layers:
        t = max(cache.image_layers)
        image = (round(t * student_layers / t_depth), t)
    if image is not None and cache.manifest.get("image_framing") != "resize":
        log(f"teacher cache framing is {cache.manifest.get('image_framing')!r}: its image grid does not cover the "
            "student's pixels, so L_img is off (text distillation still runs)")
        image = None
    if image is not None and image_weight == 0:
        image = None
    return text, image


class AlignProjectors(nn.Module):
    """One linear map student d → teacher d per distilled layer pair (trained, saved with checkpoints, not exported).

    Keys are "s{student}_t{teacher}": a key like "2_3" would be read back as the list index 23 by tree_unflatten
    (Python's int() accepts underscores)."""

    def __init__(self, student_dim: int, teacher_dim: int, text_pairs, image_pair):
        super().__init__()
        self.text = {f"s{s}_t{t}": nn.Linear(student_dim, teacher_dim) for s, t in text_pairs}
        self.image = {f"s{s}_t{t}": nn.Linear(student_dim, teacher_dim) for s, t in ([image_pair] if image_pair else [])}


def pair_loss_sum(proj: nn.Module, h: mx.array, target: mx.array, weight: mx.array) -> mx.array:
    """Σ_i w_i ||proj(h_i) - target_i||² / D  (h [P, d], target [P, D], weight [P])."""
    diff = proj(h).astype(mx.float32) - target
    return ((diff * diff).sum(-1) / target.shape[-1] * weight).sum()


class TargetBuilder:
    """Per-batch distillation targets (NumPy, in the loader thread): gather indices into the flattened [B*T] student
    states, standardized teacher targets, and weights (0 for padding)."""

    def __init__(self, cache: TeacherCache, text_pairs, image_pair, image_token_id: int, standardize: bool = True,
                 kd_loss: Optional[str] = None):
        self.cache, self.text_pairs, self.image_pair, self.image_token_id = cache, text_pairs, image_pair, image_token_id
        self.kd_loss = kd_loss  # None: no logit distillation targets
        if kd_loss == "mapped":
            from teacher_cache.format import read_vocab_map

            self.vocab_map = read_vocab_map(cache.dir)  # [teacher vocab] → student id or -1
        st = cache.stats
        self.norm = {t: (st[f"mean.L{t}"], st[f"std.L{t}"]) for _, t in text_pairs}
        if not standardize:  # raw teacher states (an ablation: outlier channels then dominate the MSE)
            self.norm = {t: (np.float32(0.0), np.float32(1.0)) for t in self.norm}
            self.img_norm = (np.float32(0.0), np.float32(1.0))
        elif image_pair:
            t = image_pair[1]
            self.img_norm = (st.get(f"image_mean.L{t}", st.get(f"mean.L{t}")), st.get(f"image_std.L{t}",
                                                                                      st.get(f"std.L{t}")))

    def __call__(self, samples, ids: np.ndarray) -> dict:
        B, T = ids.shape
        D = self.cache.hidden_size
        t_layers = sorted({t for _, t in self.text_pairs})
        i_layers = [self.image_pair[1]] if self.image_pair else []
        idx, targets = [], {t: [] for t in t_layers}
        img_idx, img_t = [], []
        kd_logp, kd_tids = [], []
        for r, s in enumerate(samples):
            e = self.cache.get(s.index, t_layers, [x for x in i_layers if s.image_path is not None])
            keep = e["positions"] < T  # truncation (--max-seq-len) drops pairs past the end
            idx.append(r * T + e["positions"][keep])
            if self.kd_loss:
                kd_logp.append(e["topk_logp"][keep])
                kd_tids.append(e["topk_ids"][keep])
            for t in t_layers:
                m, sd = self.norm[t]
                targets[t].append((e["text"][t][keep] - m) / sd)
            if i_layers and s.image_path is not None:
                pos = np.nonzero(ids[r] == self.image_token_id)[0]
                x = e["image"][i_layers[0]]
                if len(pos) != len(x):
                    raise BonsaiError(f"record {s.record_id}: {len(pos)} student image tokens, the cache has {len(x)} "
                                      "pooled image states")
                img_idx.append(r * T + pos)
                m, sd = self.img_norm
                img_t.append((x - m) / sd)
        n = int(sum(len(x) for x in idx))
        P = max(-(-n // PAD_MULTIPLE) * PAD_MULTIPLE, PAD_MULTIPLE)
        out = {"text_index": _pad(np.concatenate(idx) if idx else np.zeros(0, np.int64), P).astype(np.int32),
               "text_weight": _pad(np.ones(n, np.float32), P)}
        for j, (_, t) in enumerate(self.text_pairs):
            x = np.concatenate(targets[t]) if targets[t] else np.zeros((0, D), np.float32)
            out[f"text_target_{j}"] = _pad(x.astype(np.float32), P)
        if img_idx:
            out["image_index"] = np.concatenate(img_idx).astype(np.int32)
            out["image_target"] = np.concatenate(img_t).astype(np.float32)
        if self.kd_loss:
            k = int(self.cache.manifest["logits_topk"])
            logp = np.concatenate(kd_logp) if kd_logp else np.zeros((0, k), np.float32)
            out["kd_logp"] = _pad(logp.astype(np.float32), P)
            weight = np.ones(n, np.float32)
            if self.kd_loss == "mapped":
                tids = np.concatenate(kd_tids) if kd_tids else np.zeros((0, k), np.int64)
                sid = self.vocab_map[np.clip(tids, 0, len(self.vocab_map) - 1)]
                sid = np.where(tids < len(self.vocab_map), sid, -1)
                mask = (sid >= 0).astype(np.float32)
                out["kd_ids"] = _pad(np.maximum(sid, 0).astype(np.int32), P)
                out["kd_mask"] = _pad(mask, P)
                weight = (mask.sum(-1) > 0).astype(np.float32)  # a position with nothing mapped counts for nothing
            out["kd_weight"] = _pad(weight, P)
        return out


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) == n:
        return x
    pad = np.zeros((n - len(x),) + x.shape[1:], dtype=x.dtype)
    return np.concatenate([x, pad])


def counts(extra: Optional[dict]) -> Tuple[float, float, float]:
    """(aligned text pairs, image positions, logit-distillation positions) of a micro-batch."""
    if not extra:
        return 0.0, 0.0, 0.0
    kd = float(extra["kd_weight"].sum()) if "kd_weight" in extra else 0.0
    return float(extra["text_weight"].sum()), float(len(extra.get("image_index", ()))), kd


def kd_terms(logits: mx.array, extra: dict, kd_loss: str):
    """(Σ L_kd, Σ covered teacher mass) over a micro-batch's aligned pairs (train/kd.py), unnormalized."""
    from .kd import mapped_sum, uld_sum

    B, T, V = logits.shape
    rows = logits.reshape(B * T, V)[extra["text_index"]]  # [P, V]: the student's logits at the aligned tokens
    if kd_loss == "mapped":
        return mapped_sum(rows, extra["kd_logp"], extra["kd_ids"], extra["kd_mask"], extra["kd_weight"])
    return uld_sum(rows, extra["kd_logp"], extra["kd_weight"]), mx.array(0.0)


def distill_terms(model, hidden_states, extra: dict, text_pairs, image_pair):
    """(Σ text loss averaged over layer pairs, Σ image loss) for one micro-batch, unnormalized by counts."""
    B, T, d = hidden_states[0].shape
    align = model.align
    lt = mx.array(0.0)
    for j, (s, t) in enumerate(text_pairs):
        h = hidden_states[s].reshape(B * T, d)[extra["text_index"]]  # [P, d]
        lt = lt + pair_loss_sum(align.text[f"s{s}_t{t}"], h, extra[f"text_target_{j}"], extra["text_weight"])
    lt = lt / len(text_pairs)
    li = mx.array(0.0)
    if image_pair is not None and "image_index" in extra:
        s, t = image_pair
        h = hidden_states[s].reshape(B * T, d)[extra["image_index"]]
        w = mx.ones((h.shape[0],), dtype=mx.float32)
        li = pair_loss_sum(align.image[f"s{s}_t{t}"], h, extra["image_target"], w)
    return lt, li


def to_mx(extra: Optional[dict]) -> Optional[Dict[str, mx.array]]:
    return None if extra is None else {k: mx.array(v) for k, v in extra.items()}
