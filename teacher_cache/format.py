"""The teacher-cache format (docs/architecture.md, README "Distill"): shards, stats, index, manifest. Framework-free (NumPy + safetensors), so
both the PyTorch builder and the MLX reader use it.

CACHE_DIR/
  shard-NNNNN.safetensors   text.L{k} [ΣK, D] (float16, or int8 + text_scale.L{k} [ΣK] float32 per row),
                            text_offsets [n+1] int64, text_positions [ΣK] int32 (positions in the student sequence),
                            image.L{k} [n, G², D] (optional; int8 + image_scale.L{k} [n, G²]), sample_index [n] int64
                            with --logits-topk k: logits_topk_logp [ΣK, k] float16 (the teacher's log_softmax, sorted
                            descending) and logits_topk_ids [ΣK, k] int32 (teacher token ids), rows as text.L{k}
  vocab_map.safetensors     with --logits-topk: teacher_to_student [teacher vocab] int32 (-1: no student token has
                            the same string; teacher_cache/vocab_map.py)
  stats.safetensors         mean.L{k} / std.L{k} [D] float32 (text), image_mean.L{k} / image_std.L{k} (image)
  manifest.json             everything a reader must check (see `Manifest` fields)
  index.json                {sample_index: [shard file, row]} — written last
  index.rank{r}.json        per-rank progress while building (resume reads it)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from safetensors.numpy import load_file, save_file

from bonsai_mlx.atomic import atomic_file, write_json  # framework-free
from bonsai_mlx.train.data import file_sha256 as sha256_file  # noqa: E402  (framework-free)


def quantize_rows(x: np.ndarray):
    """int8 with one float32 absmax scale per row of the last axis."""
    scale = np.abs(x).max(axis=-1, keepdims=True).astype(np.float32) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return q, scale[..., 0]


VOCAB_MAP_FILE = "vocab_map.safetensors"


def write_vocab_map(path: Path, vmap: np.ndarray) -> None:
    with atomic_file(path) as tmp:
        save_file({"teacher_to_student": np.ascontiguousarray(vmap, np.int32)}, str(tmp), metadata={"format": "np"})


def read_vocab_map(cache_dir) -> np.ndarray:
    return load_file(str(Path(cache_dir) / VOCAB_MAP_FILE))["teacher_to_student"]


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None]


def write_shard(path: Path, samples: List[dict], layers: List[int], image_layers: List[int], dtype: str) -> int:
    """Write one shard atomically (temp name, then rename). Each sample: {"index", "positions" [K],
    "text": {layer: [K, D] float32}, "image": {layer: [G², D]} (empty for a text-only record)}. Returns the bytes
    written. Image rows exist for the samples that have an image: `image_rows[i]` is sample i's row, -1 for none."""
    tensors: Dict[str, np.ndarray] = {}
    counts = [len(s["positions"]) for s in samples]
    tensors["text_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    tensors["text_positions"] = np.concatenate([np.asarray(s["positions"], np.int32) for s in samples]).astype(np.int32)
    tensors["sample_index"] = np.asarray([s["index"] for s in samples], np.int64)
    for k in layers:
        x = np.concatenate([s["text"][k] for s in samples], axis=0)
        _put(tensors, f"text.L{k}", f"text_scale.L{k}", x, dtype)
    if samples and "topk_logp" in samples[0]:  # the teacher's top-k log-probs at the same rows (float16 + int32)
        tensors["logits_topk_logp"] = np.concatenate([s["topk_logp"] for s in samples]).astype(np.float16)
        tensors["logits_topk_ids"] = np.concatenate([s["topk_ids"] for s in samples]).astype(np.int32)
    with_image = [s for s in samples if s.get("image")]
    if image_layers:
        rows = np.cumsum([bool(s.get("image")) for s in samples]) - 1
        tensors["image_rows"] = np.where([bool(s.get("image")) for s in samples], rows, -1).astype(np.int64)
    for k in image_layers if with_image else []:
        x = np.stack([s["image"][k] for s in with_image])
        _put(tensors, f"image.L{k}", f"image_scale.L{k}", x, dtype)
    with atomic_file(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"format": "np"})
    return path.stat().st_size


def _put(tensors, name, scale_name, x, dtype):
    if dtype == "float16":
        tensors[name] = x.astype(np.float16)
    elif dtype == "int8":
        tensors[name], tensors[scale_name] = quantize_rows(x.astype(np.float32))
    else:
        raise ValueError(f"unsupported cache dtype {dtype}")


def read_manifest(cache_dir) -> dict:
    f = Path(cache_dir) / "manifest.json"
    if not f.exists():
        raise FileNotFoundError(f"{cache_dir}: no manifest.json (not a finished teacher cache)")
    return json.loads(f.read_text())


def write_json_atomic(path: Path, obj) -> None:
    write_json(path, obj)


class CacheReader:
    """Random access to a teacher cache by sample index, with NumPy — the one reader of the format (the student's
    trainer, `verify`, the build's statistics and the tests all use it).

    Shards are memory-mapped and sliced (`safetensors.safe_open`): a sample costs its own bytes, not its (up to 2 GB)
    shard's. `index` defaults to the finished cache's index.json; the build passes its merged index before writing it.
    """

    def __init__(self, cache_dir, index: Optional[dict] = None, manifest: Optional[dict] = None):
        self.dir = Path(cache_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.dir)
        if index is None:
            index = json.loads((self.dir / "index.json").read_text())
        self.index = {int(k): tuple(v) for k, v in index.items()}
        self._handles: Dict[str, object] = {}

    def __contains__(self, sample_index: int) -> bool:
        return int(sample_index) in self.index

    def _open(self, name: str):
        if name not in self._handles:
            from safetensors import safe_open

            self._handles[name] = safe_open(str(self.dir / name), framework="numpy")
        return self._handles[name]

    def get(self, sample_index: int, text_layers: Optional[List[int]] = None,
            image_layers: Optional[List[int]] = None) -> dict:
        """{"positions" [K] int64, "text": {layer: [K, D]}, "image": {layer: [G², D]}} as float32 (and
        "topk_logp" [K, k], "topk_ids" [K, k] when the cache has the teacher's logits) (int8 storage
        dequantized with its per-row scales), for the given layers (default: all the manifest lists). A sample
        without an image row (a text-only record) has no "image" entries."""
        text_layers = self.manifest["layers"] if text_layers is None else text_layers
        image_layers = self.manifest.get("image_layers", []) if image_layers is None else image_layers
        name, row = self.index[int(sample_index)]
        f = self._open(name)
        keys = set(f.keys())
        a, b = (int(x) for x in f.get_slice("text_offsets")[row : row + 2])
        out = {"positions": f.get_slice("text_positions")[a:b].astype(np.int64), "text": {}, "image": {}}
        for k in text_layers:
            out["text"][k] = _rows(f, keys, f"text.L{k}", f"text_scale.L{k}", slice(a, b))
        if "logits_topk_logp" in keys:  # [K, k] log-probs (float32) and teacher ids, sorted by probability
            out["topk_logp"] = f.get_slice("logits_topk_logp")[a:b].astype(np.float32)
            out["topk_ids"] = f.get_slice("logits_topk_ids")[a:b].astype(np.int64)
        # format 2 maps samples to image rows (-1: a text-only record); format 1 had one row per sample
        img_row = int(f.get_slice("image_rows")[row]) if "image_rows" in keys else row
        for k in image_layers if img_row >= 0 else []:
            out["image"][k] = _rows(f, keys, f"image.L{k}", f"image_scale.L{k}", slice(img_row, img_row + 1))[0]
        return out

    def read_stats(self) -> Dict[str, np.ndarray]:
        return load_file(str(self.dir / "stats.safetensors"))


def _rows(f, keys, name: str, scale_name: str, sl: slice) -> np.ndarray:
    x = f.get_slice(name)[sl]
    if scale_name in keys:  # int8 storage with a per-row scale
        return dequantize_rows(x, f.get_slice(scale_name)[sl])
    return x.astype(np.float32)


def verify(cache_dir) -> List[str]:
    """Problems found (empty when the cache is sound): checksums, shapes, dtypes and the index vs the manifest."""
    d = Path(cache_dir)
    problems = []
    try:
        man = read_manifest(d)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        return [str(e)]
    if not (d / "index.json").exists():
        return [f"{d}: no index.json (the build did not finish)"]
    index = json.loads((d / "index.json").read_text())
    D = man["hidden_size"]
    seen = set()
    want_dtype = {"float16": np.float16, "int8": np.int8}[man["dtype"]]
    grid = man.get("image_pool_grid")
    for sh in man["shards"]:
        f = d / sh["file"]
        if not f.exists():
            problems.append(f"{sh['file']}: missing")
            continue
        if sha256_file(f) != sh["sha256"]:
            problems.append(f"{sh['file']}: sha256 differs from the manifest")
            continue
        t = load_file(str(f))
        n = len(t["sample_index"])
        off = t["text_offsets"]
        if n != sh["num_samples"] or off.shape != (n + 1,) or off[0] != 0 or np.any(np.diff(off) < 0):
            problems.append(f"{sh['file']}: bad sample count or offsets")
            continue
        K = int(off[-1])
        if t["text_positions"].shape != (K,) or t["text_positions"].dtype != np.int32:
            problems.append(f"{sh['file']}: text_positions shape/dtype")
        for k in man["layers"]:
            x = t.get(f"text.L{k}")
            if x is None or x.shape != (K, D) or x.dtype != want_dtype:
                problems.append(f"{sh['file']}: text.L{k} missing or not [{K}, {D}] {man['dtype']}")
        if man.get("logits_topk"):
            k_ = man["logits_topk"]
            lp, li = t.get("logits_topk_logp"), t.get("logits_topk_ids")
            if lp is None or lp.shape != (K, k_) or lp.dtype != np.float16 or li is None or li.shape != (K, k_) \
                    or li.dtype != np.int32:
                problems.append(f"{sh['file']}: logits_topk_logp / logits_topk_ids missing or not [{K}, {k_}] "
                                "float16 / int32")
        if man.get("image_layers"):
            rows = t.get("image_rows", np.arange(n))
            n_img = int((rows >= 0).sum())
            if rows.shape != (n,) or not np.array_equal(rows[rows >= 0], np.arange(n_img)):
                problems.append(f"{sh['file']}: image_rows not [{n}] counting up over the samples with an image")
            for k in man["image_layers"] if n_img else []:
                x = t.get(f"image.L{k}")
                if x is None or x.shape != (n_img, grid[0] * grid[1], D) or x.dtype != want_dtype:
                    problems.append(f"{sh['file']}: image.L{k} missing or misshapen")
        for row, si in enumerate(t["sample_index"].tolist()):
            if si in seen:
                problems.append(f"sample {si} appears twice")
            seen.add(si)
            if index.get(str(si)) != [sh["file"], row]:
                problems.append(f"index entry of sample {si} does not point at {sh['file']} row {row}")
    if len(seen) != man["num_samples"] or len(index) != man["num_samples"]:
        problems.append(f"manifest says {man['num_samples']} samples; shards hold {len(seen)}, index {len(index)}")
    if man.get("logits_topk"):
        vm = man.get("vocab_map") or {}
        if not (d / VOCAB_MAP_FILE).exists():
            problems.append(f"{VOCAB_MAP_FILE} missing")
        elif read_vocab_map(d).shape != (vm.get("teacher_vocab_size"),):
            problems.append(f"{VOCAB_MAP_FILE}: not [{vm.get('teacher_vocab_size')}] as the manifest says")
    if not (d / "stats.safetensors").exists():
        problems.append("stats.safetensors missing")
    else:
        st = load_file(str(d / "stats.safetensors"))
        for k in man["layers"]:
            if st.get(f"mean.L{k}") is None or st[f"mean.L{k}"].shape != (D,):
                problems.append(f"stats: mean.L{k} missing or not [{D}]")
    return problems
