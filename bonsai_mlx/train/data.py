"""LLaVA-Instruct data: reading, validation with counted skips, length-bucketed batches, background image loading.

Framework-free (NumPy + Pillow): batches are NumPy arrays the trainer hands to MLX.

Skips: a record that cannot be trained on is skipped and counted by reason (see `prompting.RecordError` reasons, plus
`missing_image` and `corrupt_image`); `strict=True` turns the first one into an error. Samples come from
`prepare.py` (batched, cached). Images are checked for existence and a readable header up front, each distinct file
once, on a thread pool; an image whose pixels fail to decode later (a truncated JPEG) is dropped from its batch when
loaded and counted as `corrupt_image`.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
from PIL import Image

from ..errors import BonsaiError
from ..processing import ImageProcessor
from ..prompting import RecordError
from .prepare import PreparedSamples, prepare_cached, prepare_records


def read_records(path) -> list:
    """Records of a LLaVA-Instruct JSON file (a list of objects) or JSON-lines file; a parse error names the spot."""
    path = Path(path)
    if not path.exists():
        raise BonsaiError(f"data file {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BonsaiError(f"{path}: invalid JSON at line {n} column {e.colno}: {e.msg}") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BonsaiError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise BonsaiError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def iter_records(path, limit: Optional[int] = None) -> Iterator:
    """The records of `path` (as `read_records`) one at a time, at most `limit`: a JSON list is decoded object by
    object from its text, so 665k records never exist as Python objects at once (json.loads of the 1 GB mix peaks
    at ~9 GB). A parse error names the spot, as `read_records` does."""
    from itertools import islice

    path = Path(path)
    if not path.exists():
        raise BonsaiError(f"data file {path}: no such file")
    return islice(_iter_jsonl(path) if path.suffix == ".jsonl" else _iter_json_list(path), limit)


def _iter_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise BonsaiError(f"{path}: invalid JSON at line {n} column {e.colno}: {e.msg}") from None


def _iter_json_list(path: Path):
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    ws = " \t\n\r"
    i = len(text) - len(text.lstrip(ws))
    if not text.startswith("[", i):
        try:  # not a list: say what it is (or where it stops parsing)
            got = type(json.loads(text)).__name__
        except json.JSONDecodeError as e:
            raise BonsaiError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        raise BonsaiError(f"{path}: expected a JSON list of records, got {got}")
    i += 1
    first = True
    try:
        while True:
            while i < len(text) and text[i] in ws:
                i += 1
            if text.startswith("]", i):
                i += 1
                break
            if not first:
                if not text.startswith(",", i):
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
                i += 1
                while i < len(text) and text[i] in ws:
                    i += 1
            obj, i = dec.raw_decode(text, i)
            first = False
            yield obj
        rest = text[i:]
        if rest.strip(ws):
            raise json.JSONDecodeError("Extra data", text, i + len(rest) - len(rest.lstrip(ws)))
    except json.JSONDecodeError as e:
        raise BonsaiError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Sample:
    index: int  # position of the record in the data file
    record_id: str
    input_ids: np.ndarray  # [T] int32
    labels_mask: np.ndarray  # [T] bool
    image_path: Optional[Path]


class SampleList:
    """The usable samples as a sequence of `Sample`s, made on access from the compact `PreparedSamples` arrays."""

    def __init__(self, prepared: PreparedSamples, rows: np.ndarray, root: Optional[Path]):
        self.prepared, self.rows, self.root = prepared, rows, root

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:
        p, s = self.prepared, int(self.rows[i])
        image = p.image(s)
        return Sample(int(p.index[s]), p.record_ids[s], p.input_ids(s), p.labels_mask(s),
                      None if image is None else self.root / image)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        return np.asarray(self.prepared.lengths)[self.rows]

    def indices(self) -> np.ndarray:
        return np.asarray(self.prepared.index)[self.rows]


class SFTDataset:
    """Tokenized, validated samples of a LLaVA-Instruct file (prepared by `prepare.py`, or read from its cache)."""

    def __init__(self, records: Optional[list], tokenizer, image_root, image_seq_length: int, max_seq_len: int = 2048,
                 system: Optional[str] = None, strict: bool = False, check_images: bool = True, source: str = "data",
                 prepared: Optional[PreparedSamples] = None):
        self.source = source
        self.strict = strict
        if prepared is None:
            prepared = prepare_records(records, tokenizer, image_seq_length, max_seq_len, system, source)
        self.prepared = prepared
        self.skipped: Counter = Counter(prepared.skipped)
        self.first_skip: Dict[str, str] = dict(prepared.first_skip)
        self.failed: set = set()  # indices whose image failed to decode when loaded
        root = Path(image_root) if image_root is not None else None
        rows = np.arange(len(prepared))
        has_image = np.asarray(prepared.image_pos) >= 0
        if has_image.any() and root is None:
            first = int(np.flatnonzero(has_image)[0])
            raise BonsaiError(f"{source}: record {prepared.record_ids[first]} has an image but no --image-root was "
                              "given")
        if check_images and has_image.any():
            rows = self._check_images(rows, has_image, root)
        if strict and prepared.first_error is not None:  # (an earlier bad image has raised already)
            raise BonsaiError(f"{source}: {prepared.first_error[1]} (--strict; drop --strict to skip bad records)")
        self.samples = SampleList(prepared, rows, root)

    @classmethod
    def from_file(cls, path, tokenizer, image_root, image_seq_length: int, max_seq_len: int = 2048,
                  system: Optional[str] = None, strict: bool = False, limit: Optional[int] = None,
                  data_sha256: Optional[str] = None, cache_dir=None, log=print) -> "SFTDataset":
        """The data file's samples through the prepared-data cache (`prepare.prepare_cached`)."""
        sha = data_sha256 or file_sha256(path)

        def read():  # the first `limit` records (indices stay the file's, the teacher cache's), streamed
            return iter_records(path, limit)

        t = time.perf_counter()
        prepared, how = prepare_cached(path, sha, read, tokenizer, image_seq_length, max_seq_len, system, limit,
                                       strict, cache_dir=cache_dir, log=log,
                                       show_progress=Path(path).stat().st_size >= 32_000_000)  # ~20k records
        dt = time.perf_counter() - t
        if how == "hit" or dt >= 1.0:
            what = {"hit": "read from the prepared-data cache", "miss": "prepared (and cached)", "off": "prepared"}[how]
            log(f"{path}: {len(prepared)} samples {what} in {dt:.1f}s")
        return cls(None, tokenizer, image_root, image_seq_length, max_seq_len, system, strict, source=str(path),
                   prepared=prepared)

    def _check_images(self, rows: np.ndarray, has_image: np.ndarray, root: Path) -> np.ndarray:
        """Existence and a readable header for every image, in parallel threads (file opens wait on the disk, not
        the GIL: 150k cold files on one thread are minutes); bad ones are counted skips, in file order."""
        p = self.prepared
        todo = np.flatnonzero(has_image)
        paths = [root / p.image(int(s)) for s in todo]
        unique = list(dict.fromkeys(paths))  # records share pictures (LLaVA-Instruct-150k: ~158k records, ~81k images)
        with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
            found = dict(zip(unique, pool.map(_image_problem, unique, chunksize=256), strict=True))
        results = [found[x] for x in paths]
        bad = np.zeros(len(p), bool)
        first_error = p.first_error[0] if p.first_error is not None else None
        for s, err in zip(todo, results, strict=True):
            if err is not None:
                if self.strict and first_error is not None and int(p.index[s]) > first_error:
                    break  # a bad record before this one is the error to report
                self._skip(err.reason, p.record_ids[int(s)], str(err))
                bad[s] = True
        return rows[~bad[rows]]

    def _skip(self, reason: str, rid: str, msg: str) -> None:
        if self.strict:
            raise BonsaiError(f"{self.source}: record {rid}: {msg} (--strict; drop --strict to skip bad records)")
        self.skipped[reason] += 1
        self.first_skip.setdefault(reason, f"record {rid}: {msg}")

    def keep_only(self, keep, reason: str, msg: str) -> None:
        """Drop the samples whose record index fails `keep(index)`, counting each as a skip of `reason`."""
        rows, idx = self.samples.rows, self.samples.indices()
        ok = np.fromiter((bool(keep(int(i))) for i in idx), bool, len(idx))
        for k in np.flatnonzero(~ok):
            self._skip(reason, self.prepared.record_ids[int(rows[k])], msg)
        self.samples = SampleList(self.prepared, rows[ok], self.samples.root)

    def report(self) -> str:
        total = len(self.samples) + sum(self.skipped.values())
        lines = [f"{self.source}: {len(self.samples)} of {total} records usable"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n} × {reason} (e.g. {self.first_skip[reason]})")
        return "\n".join(lines)

    def __len__(self):
        return len(self.samples)


def _image_problem(path: Path) -> Optional[RecordError]:
    try:
        _check_image(path)
    except RecordError as e:
        return e
    return None


def _check_image(path: Path) -> None:
    if not path.is_file():
        raise RecordError("missing_image", f"image {path} not found")
    try:
        with Image.open(path) as im:  # reads the header only
            if im.width < 1 or im.height < 1:
                raise ValueError("empty image")
    except Exception as e:  # Pillow raises many types for bad files
        raise RecordError("corrupt_image", f"image {path} unreadable ({type(e).__name__})") from None


@dataclass
class Batch:
    input_ids: np.ndarray  # [B, T] int32, right-padded
    labels_mask: np.ndarray  # [B, T] bool: position t is supervised (predicted from t-1)
    pixel_values: Optional[np.ndarray]  # [N, H, W, 3] float32, images in row order
    sample_indices: List[int]
    dropped: List[str]  # record ids dropped from this batch (image failed to decode)
    extra: Optional[dict] = None  # phase-specific arrays (HSD targets)

    @property
    def num_targets(self) -> int:
        return int(self.labels_mask[:, 1:].sum())


class BatchIterator:
    """Length-bucketed batches in a seeded order (mlx-lm's scheme: sort by length, cut into batches, shuffle the
    batches per epoch). The order depends only on (seed, epoch), so (epoch, cursor) is the whole resumable state.

    `rank`/`world`: each process takes a disjoint slice of every global batch.
    """

    def __init__(self, dataset: SFTDataset, batch_size: int, seed: int, image_processor: ImageProcessor,
                 pad_id: int, pad_multiple: int = 16, prefetch: int = 2, rank: int = 0, world: int = 1,
                 drop_last: bool = True, extras=None):
        if len(dataset) == 0:
            raise BonsaiError(f"{dataset.source}: no usable records\n{dataset.report()}")
        self.ds, self.batch_size, self.seed = dataset, batch_size, seed
        self.proc, self.pad_id, self.pad_multiple, self.prefetch = image_processor, pad_id, pad_multiple, prefetch
        self.rank, self.world = rank, world
        self.extras = extras  # optional (samples, input_ids) → dict of arrays, computed in the loader thread
        lengths = dataset.samples.lengths()
        order = np.argsort(lengths, kind="stable")
        # Training drops the last partial batch (as mlx-lm) unless the data set is smaller than one batch.
        n = len(order) // batch_size * batch_size if drop_last and len(order) >= batch_size else len(order)
        self.buckets = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        self.epoch, self.cursor = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.buckets)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.buckets))

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state(self, st: dict) -> None:
        self.epoch, self.cursor = int(st["epoch"]), int(st["cursor"])

    def _indices(self):
        """Endless (epoch, cursor, sample indices) from the current position."""
        epoch, cursor = self.epoch, self.cursor
        while True:
            order = self.epoch_order(epoch)
            while cursor < len(order):
                idx = self.buckets[order[cursor]]
                per = -(-len(idx) // self.world)
                yield epoch, cursor, idx[self.rank * per : (self.rank + 1) * per]
                cursor += 1
            epoch, cursor = epoch + 1, 0

    def make_batch(self, indices) -> Batch:
        samples, pixels, dropped = [], [], []
        for i in indices:
            s = self.ds.samples[int(i)]
            if s.image_path is not None:
                if s.index in self.ds.failed:
                    dropped.append(s.record_id)
                    continue
                try:
                    pixels.append(self.proc.preprocess_one(s.image_path))
                except BonsaiError as e:
                    self.ds.failed.add(s.index)  # counted once, dropped in every later epoch too
                    self.ds._skip("corrupt_image", s.record_id, str(e))
                    dropped.append(s.record_id)
                    continue
            samples.append(s)
        T = max((len(s.input_ids) for s in samples), default=1)
        T = -(-T // self.pad_multiple) * self.pad_multiple  # fewer distinct shapes → fewer recompiles
        ids = np.full((len(samples), T), self.pad_id, np.int32)
        mask = np.zeros((len(samples), T), bool)
        for r, s in enumerate(samples):
            ids[r, : len(s.input_ids)] = s.input_ids
            mask[r, : len(s.labels_mask)] = s.labels_mask
        px = np.stack(pixels).astype(np.float32) if pixels else None
        extra = self.extras(samples, ids) if self.extras is not None and samples else None
        return Batch(ids, mask, px, [s.index for s in samples], dropped, extra)

    def __iter__(self) -> Iterator[Batch]:
        """Batches from the current position; images are decoded in a background thread, `prefetch` batches ahead.
        `self.epoch`/`self.cursor` advance as batches are *consumed*, so the state is exact at any point."""
        q: queue.Queue = queue.Queue(maxsize=max(self.prefetch, 1))
        stop = threading.Event()

        def worker():
            try:
                for epoch, cursor, idx in self._indices():
                    if stop.is_set():
                        return
                    item = (epoch, cursor, self.make_batch(idx))
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except BaseException as e:  # surface loader errors (e.g. --strict) in the training thread
                q.put(e)

        t = threading.Thread(target=worker, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                epoch, cursor, batch = item
                self.epoch, self.cursor = epoch, cursor + 1
                if self.cursor >= len(self.buckets):
                    self.epoch, self.cursor = epoch + 1, 0
                yield batch
        finally:
            stop.set()
