"""The teacher-cache format (design.md): shards, stats, index, manifest. Framework-free (NumPy + safetensors), so
both the PyTorch builder and the MLX reader use it.

CACHE_DIR/
  shard-NNNNN.safetensors   text.L{k} [ΣK, D] (float16, or int8 + text_scale.L{k} [ΣK] float32 per row),
                            text_offsets [n+1] int64, text_positions [ΣK] int32 (positions in the student sequence),
                            image.L{k} [n, G², D] (optional; int8 + image_scale.L{k} [n, G²]), sample_index [n] int64
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
from bonsai_mlx.data import file_sha256 as sha256_file  # noqa: E402  (framework-free)


def quantize_rows(x: np.ndarray):
    """int8 with one float32 absmax scale per row of the last axis."""
    scale = np.abs(x).max(axis=-1, keepdims=True).astype(np.float32) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return q, scale[..., 0]


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None]


def write_shard(path: Path, samples: List[dict], layers: List[int], image_layers: List[int], dtype: str) -> int:
    """Write one shard atomically (temp name, then rename). Each sample: {"index", "positions" [K],
    "text": {layer: [K, D] float32}, "image": {layer: [G², D]}}. Returns the bytes written."""
    tensors: Dict[str, np.ndarray] = {}
    counts = [len(s["positions"]) for s in samples]
    tensors["text_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    tensors["text_positions"] = np.concatenate([np.asarray(s["positions"], np.int32) for s in samples]).astype(np.int32)
    tensors["sample_index"] = np.asarray([s["index"] for s in samples], np.int64)
    for k in layers:
        x = np.concatenate([s["text"][k] for s in samples], axis=0)
        _put(tensors, f"text.L{k}", f"text_scale.L{k}", x, dtype)
    for k in image_layers:
        x = np.stack([s["image"][k] for s in samples])
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
    """Random access to a finished cache by sample index, with NumPy. Shards are loaded one at a time (LRU of 1)."""

    def __init__(self, cache_dir):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        self.index = {int(k): tuple(v) for k, v in json.loads((self.dir / "index.json").read_text()).items()}
        self._shard_name: Optional[str] = None
        self._shard: Optional[dict] = None

    def __contains__(self, sample_index: int) -> bool:
        return int(sample_index) in self.index

    def _load(self, name: str) -> dict:
        if name != self._shard_name:
            self._shard, self._shard_name = load_file(str(self.dir / name)), name
        return self._shard

    def get(self, sample_index: int, dequantize: bool = True) -> dict:
        """{"positions" [K] int32, "text": {layer: [K, D]}, "image": {layer: [G², D]}} as float32."""
        name, row = self.index[int(sample_index)]
        sh = self._load(name)
        a, b = sh["text_offsets"][row], sh["text_offsets"][row + 1]
        out = {"positions": sh["text_positions"][a:b], "text": {}, "image": {}}
        for k in self.manifest["layers"]:
            x = sh[f"text.L{k}"][a:b]
            out["text"][k] = dequantize_rows(x, sh[f"text_scale.L{k}"][a:b]) if x.dtype == np.int8 else x.astype(
                np.float32)
        for k in self.manifest.get("image_layers", []):
            x = sh[f"image.L{k}"][row]
            out["image"][k] = dequantize_rows(x, sh[f"image_scale.L{k}"][row]) if x.dtype == np.int8 else x.astype(
                np.float32)
        return out

    def stats(self) -> Dict[str, np.ndarray]:
        return load_file(str(self.dir / "stats.safetensors"))


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
        for k in man.get("image_layers", []):
            x = t.get(f"image.L{k}")
            if x is None or x.shape != (n, grid[0] * grid[1], D) or x.dtype != want_dtype:
                problems.append(f"{sh['file']}: image.L{k} missing or misshapen")
        for row, si in enumerate(t["sample_index"].tolist()):
            if si in seen:
                problems.append(f"sample {si} appears twice")
            seen.add(si)
            if index.get(str(si)) != [sh["file"], row]:
                problems.append(f"index entry of sample {si} does not point at {sh['file']} row {row}")
    if len(seen) != man["num_samples"] or len(index) != man["num_samples"]:
        problems.append(f"manifest says {man['num_samples']} samples; shards hold {len(seen)}, index {len(index)}")
    if not (d / "stats.safetensors").exists():
        problems.append("stats.safetensors missing")
    else:
        st = load_file(str(d / "stats.safetensors"))
        for k in man["layers"]:
            if st.get(f"mean.L{k}") is None or st[f"mean.L{k}"].shape != (D,):
                problems.append(f"stats: mean.L{k} missing or not [{D}]")
    return problems
