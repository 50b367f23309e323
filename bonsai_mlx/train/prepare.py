"""Data preparation at scale: LLaVA-Instruct records → tokenized samples, in batches, stored compactly, cached.

`prompting.encode_example` is the definition (one record, plain Python); this module computes the same result for
many records at once (tested record for record):

- the chat texts go to the Rust tokenizer in chunks (`Tokenizer.encode_batch`, on every core), not one call each;
- the assistant-only label mask comes from the token offsets with arrays: the spans of a chunk laid end to end, one
  `searchsorted` for every token (a token is supervised iff the first span ending after its start begins before
  its end — exactly `encode_example`'s "overlaps a span");
- samples live in a few flat arrays (`PreparedSamples`): the ids with each image's run of `<image>` ids kept as one
  id (the run is put back when a batch is made: 195 fewer ids per image for the real student), the label mask as
  [start, end) runs, record ids and image paths as string tables — not one NumPy object per record;
- `prepare_cached` keys a prepared set by everything that changes it (the data file's and the tokenizer's sha256,
  the template version, the image-token count, the max length, the system prompt, --limit) and memory-maps it back:
  a resume or a second run does not parse the JSON at all.

The chunk encoding lives in `encode.py` (`encode_many` is re-exported here). Framework-free (NumPy): the teacher tool
prepares its student side with `encode_many`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..prompting import IMAGE_TOKEN, PROMPT_TEMPLATE_VERSION
from .encode import CHUNK, _fast_backend, encode_many, finish_chunk, pipelined_chunks  # noqa: F401 (encode_many: API)
from .fast_tokens import token_byte_lengths

PREPARE_VERSION = 1  # bumped whenever the stored layout or the encoding changes: older caches are not used


def progress(total: int, desc: str, unit: str):
    """A tqdm bar that also reports when stderr is not a terminal (then every 10 s, as lines)."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5 if tty else 10.0,
                disable=False, leave=tty, unit_scale=True, smoothing=0.1)


def record_id(rec, i: int) -> str:
    return str(rec.get("id", i)) if isinstance(rec, dict) else str(i)


# --- compact storage ----------------------------------------------------------------------------------------------------
class StringTable:
    """Strings as one UTF-8 blob + offsets (665k record ids as two arrays, not 665k Python objects)."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_list(cls, items: Sequence[str]) -> "StringTable":
        enc = [s.encode("utf-8") for s in items]
        offsets = np.zeros(len(enc) + 1, np.int64)
        np.cumsum([len(e) for e in enc], out=offsets[1:])
        return cls(np.frombuffer(b"".join(enc), np.uint8).copy(), offsets)

    def __getitem__(self, i: int) -> str:
        return bytes(self.blob[self.offsets[i] : self.offsets[i + 1]]).decode("utf-8")

    def __len__(self) -> int:
        return len(self.offsets) - 1


@dataclass
class PreparedSamples:
    """Every usable record of a data file, tokenized (see the module docstring for the layout)."""

    ids: np.ndarray  # [N] int32, each image's <image> run as one id
    starts: np.ndarray  # [S+1] int64 offsets into ids
    index: np.ndarray  # [S] int64 record position in the data file
    image_pos: np.ndarray  # [S] int32 position of the image run in the sample (-1: text-only)
    mask_runs: np.ndarray  # [M, 2] int32 supervised [start, end) in the *expanded* sample
    run_starts: np.ndarray  # [S+1] int64 offsets into mask_runs
    lengths: np.ndarray  # [S] int32 expanded length
    record_ids: StringTable
    images: StringTable  # "" for text-only
    image_seq_length: int
    image_token_id: int
    skipped: Counter = field(default_factory=Counter)
    first_skip: Dict[str, str] = field(default_factory=dict)
    first_error: Optional[tuple] = None  # (record index, "record ID: why") of the first bad record (not cached)

    def __len__(self) -> int:
        return len(self.index)

    def input_ids(self, s: int) -> np.ndarray:
        ids = self.ids[self.starts[s] : self.starts[s + 1]]
        p = int(self.image_pos[s])
        if p < 0:
            return np.asarray(ids, np.int32)
        run = np.full(self.image_seq_length - 1, self.image_token_id, np.int32)
        return np.concatenate([ids[: p + 1], run, ids[p + 1 :]]).astype(np.int32)

    def labels_mask(self, s: int) -> np.ndarray:
        m = np.zeros(int(self.lengths[s]), bool)
        for a, b in self.mask_runs[self.run_starts[s] : self.run_starts[s + 1]]:
            m[a:b] = True
        return m

    def image(self, s: int) -> Optional[str]:
        return self.images[s] or None if self.image_pos[s] >= 0 else None

    def nbytes(self) -> int:
        arrs = (self.ids, self.starts, self.index, self.image_pos, self.mask_runs, self.run_starts, self.lengths,
                self.record_ids.blob, self.record_ids.offsets, self.images.blob, self.images.offsets)
        return int(sum(a.nbytes for a in arrs))

    # -- files
    _ARRAYS = ("ids", "starts", "index", "image_pos", "mask_runs", "run_starts", "lengths")

    def save(self, d: Path) -> None:
        for name in self._ARRAYS:
            np.save(d / f"{name}.npy", getattr(self, name))
        for name in ("record_ids", "images"):
            t = getattr(self, name)
            np.save(d / f"{name}.blob.npy", t.blob)
            np.save(d / f"{name}.offsets.npy", t.offsets)

    @classmethod
    def load(cls, d: Path, meta: dict) -> "PreparedSamples":
        arr = {n: np.load(d / f"{n}.npy", mmap_mode="r") for n in cls._ARRAYS}
        tables = {n: StringTable(np.load(d / f"{n}.blob.npy", mmap_mode="r"),
                                 np.load(d / f"{n}.offsets.npy", mmap_mode="r")) for n in ("record_ids", "images")}
        return cls(**arr, **tables, image_seq_length=int(meta["image_seq_length"]),
                   image_token_id=int(meta["image_token_id"]), skipped=Counter(meta["skipped"]),
                   first_skip=dict(meta["first_skip"]))


def prepare_records(records: Iterable, tokenizer, image_seq_length: int, max_seq_len: Optional[int] = None,
                    system: Optional[str] = None, source: str = "data",
                    show_progress: Optional[bool] = None) -> PreparedSamples:
    """Encode every record (in chunks, with a records/s bar from 10 chunks on) into a `PreparedSamples`; bad records
    are counted by reason (the first of each kept as an example; the very first in `first_error`, for --strict).

    `records` may be a stream (`data.iter_records`): only one chunk of parsed records is alive at a time."""
    img_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    skipped: Counter = Counter()
    first: Dict[str, str] = {}
    parts = {k: [] for k in ("ids", "lens", "index", "image_pos", "runs", "nruns")}
    rids: List[str] = []
    imgs: List[str] = []
    total = len(records) if hasattr(records, "__len__") else None
    if show_progress is None:
        show_progress = total is None or total >= 10 * CHUNK
    bar = progress(total, f"prepare {Path(source).name}", "rec") if show_progress else None
    first_error = None
    byte_lens = token_byte_lengths(_fast_backend(tokenizer))
    c = 0
    for chunk, tokenized in pipelined_chunks(records, tokenizer, system, byte_lens):
        enc = finish_chunk(tokenized, tokenizer, image_seq_length, max_seq_len, img_id)
        for j, e in enc.errors.items():
            rid = record_id(chunk[j], c + j)
            if first_error is None:
                first_error = (c + j, f"record {rid}: {e}")
            skipped[e.reason] += 1
            first.setdefault(e.reason, f"record {rid}: {e}")
        lens = np.diff(enc.starts)  # collapsed
        rec_of = np.repeat(np.arange(len(enc.ok)), lens)
        parts["ids"].append(enc.ids)
        n_extra = np.where(enc.image_pos >= 0, image_seq_length - 1, 0)
        parts["lens"].append(lens + n_extra)  # expanded
        parts["index"].append(np.asarray(enc.ok, np.int64) + c)
        parts["image_pos"].append(enc.image_pos.astype(np.int32))
        # the mask as [start, end) runs over the expanded sample (a run never holds the image id: it is in a user
        # turn; a run never crosses records: a record's first token is a header, never supervised)
        m = np.concatenate([[False], enc.mask, [False]]).astype(np.int8)
        edges = np.diff(m)
        run_a, run_b = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # global, collapsed
        run_rec = rec_of[run_a] if len(run_a) else np.zeros(0, np.int64)
        la, lb = run_a - enc.starts[run_rec], run_b - enc.starts[run_rec]
        after = (enc.image_pos[run_rec] >= 0) & (la > enc.image_pos[run_rec])
        shift = np.where(after, n_extra[run_rec], 0)
        parts["runs"].append(np.stack([la + shift, lb + shift], 1).astype(np.int32) if len(run_a)
                             else np.zeros((0, 2), np.int32))
        parts["nruns"].append(np.bincount(run_rec, minlength=len(enc.ok)))
        for k, j in enumerate(enc.ok):
            rids.append(record_id(chunk[j], c + j))
            imgs.append(enc.images[k] or "")
        if bar is not None:
            bar.update(len(chunk))
        c += len(chunk)
    if bar is not None:
        bar.close()
    cat = lambda k, dt: np.concatenate(parts[k]).astype(dt) if parts[k] else np.zeros(0, dt)  # noqa: E731
    ids, lens = cat("ids", np.int32), cat("lens", np.int64)
    image_pos = cat("image_pos", np.int32)
    stored = lens - np.where(image_pos >= 0, image_seq_length - 1, 0)
    starts = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(stored, out=starts[1:])
    runs = np.concatenate(parts["runs"]) if parts["runs"] else np.zeros((0, 2), np.int32)
    run_starts = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(cat("nruns", np.int64), out=run_starts[1:])
    return PreparedSamples(ids=ids, starts=starts, index=cat("index", np.int64), image_pos=image_pos,
                           mask_runs=runs, run_starts=run_starts, lengths=lens.astype(np.int32),
                           record_ids=StringTable.from_list(rids), images=StringTable.from_list(imgs),
                           image_seq_length=image_seq_length, image_token_id=int(img_id), skipped=skipped,
                           first_skip=first, first_error=first_error)


# --- the cache ----------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """$BONSAI_MLX_CACHE/prepared, else ~/.cache/bonsai-mlx/prepared (as HF_HOME / ~/.cache/huggingface)."""
    root = os.environ.get("BONSAI_MLX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bonsai-mlx")
    return Path(root) / "prepared"


def tokenizer_sha256(tokenizer) -> Optional[str]:
    """sha256 of the tokenizer's full serialization (vocabulary, merges, added tokens, normalizer, pre-tokenizer);
    None for a slow tokenizer (its preparation is not cached)."""
    backend = _fast_backend(tokenizer)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def cache_key(data_sha256: str, tokenizer, image_seq_length: int, max_seq_len: Optional[int],
              system: Optional[str], limit: Optional[int]) -> Optional[dict]:
    tok = tokenizer_sha256(tokenizer)
    if tok is None:
        return None
    return {"prepare_version": PREPARE_VERSION, "data_sha256": data_sha256, "tokenizer_sha256": tok,
            "prompt_template_version": PROMPT_TEMPLATE_VERSION, "image_seq_length": int(image_seq_length),
            "image_token_id": int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)), "max_seq_len": max_seq_len,
            "system": system, "limit": limit}


def prepare_cached(path, data_sha256: str, read, tokenizer, image_seq_length: int, max_seq_len: Optional[int],
                   system: Optional[str], limit: Optional[int], strict: bool, cache_dir=None, log=print,
                   show_progress: Optional[bool] = None):
    """The prepared samples of data file `path`: from the cache when one was made with the same key, else prepared
    (`read()` gives the records) and stored. Returns (samples, "hit" | "miss" | "off").

    `strict` runs are prepared every time (they must stop at the first bad record) and not cached."""
    from ..atomic import atomic_dir, write_json

    key = cache_key(data_sha256, tokenizer, image_seq_length, max_seq_len, system, limit)
    if key is None or strict:
        return prepare_records(read(), tokenizer, image_seq_length, max_seq_len, system, str(path), show_progress), \
            "off"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = d / digest
    meta_file = entry / "meta.json"
    if meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("key") == key:
                return PreparedSamples.load(entry, meta), "hit"
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is rebuilt below
    samples = prepare_records(read(), tokenizer, image_seq_length, max_seq_len, system, str(path), show_progress)
    try:
        with atomic_dir(entry) as tmp:
            samples.save(tmp)
            write_json(tmp / "meta.json", {"key": key, "source": str(path), "samples": len(samples),
                                           "image_seq_length": image_seq_length,
                                           "image_token_id": samples.image_token_id,
                                           "skipped": dict(samples.skipped), "first_skip": samples.first_skip})
    except OSError as e:  # a read-only or full cache directory costs the next run time, not this one
        log(f"could not cache the prepared data in {d} ({e}); set BONSAI_MLX_CACHE to a writable folder")
    return samples, "miss"
