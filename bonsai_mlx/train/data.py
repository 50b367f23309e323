"""LLaVA-Instruct data: reading, validation with counted skips, length-bucketed batches, background image loading.

Framework-free (NumPy + Pillow): batches are NumPy arrays the trainer hands to MLX.

Skips: a record that cannot be trained on is skipped and counted by reason (see `prompting.RecordError` reasons, plus
`missing_image` and `corrupt_image`); `strict=True` turns the first one into an error. Images are checked for
existence and a readable header up front (cheap for 150k files); an image whose pixels fail to decode later (a
truncated JPEG) is dropped from its batch when loaded and counted as `corrupt_image`.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
from PIL import Image

from ..errors import BonsaiError
from ..processing import ImageProcessor
from ..prompting import RecordError, encode_example


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


class SFTDataset:
    """Tokenized, validated samples of a LLaVA-Instruct file."""

    def __init__(self, records: list, tokenizer, image_root, image_seq_length: int, max_seq_len: int = 2048,
                 system: Optional[str] = None, strict: bool = False, check_images: bool = True, source: str = "data"):
        self.source = source
        self.skipped: Counter = Counter()
        self.first_skip: Dict[str, str] = {}
        self.strict = strict
        self.samples: List[Sample] = []
        self.failed: set = set()  # indices whose image failed to decode when loaded
        root = Path(image_root) if image_root is not None else None
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        for i, rec in enumerate(records):
            rid = str(rec.get("id", i)) if isinstance(rec, dict) else str(i)
            try:
                ex = encode_example(tokenizer, rec, image_seq_length, max_seq_len, system, image_token_id=image_id)
                path = None
                if ex.image is not None:
                    if root is None:
                        raise BonsaiError(f"{source}: record {rid} has an image but no --image-root was given")
                    path = root / ex.image
                    if check_images:
                        _check_image(path)
            except RecordError as e:
                self._skip(e.reason, rid, str(e))
                continue
            self.samples.append(Sample(i, rid, np.asarray(ex.input_ids, np.int32), np.asarray(ex.labels_mask, bool),
                                       path))

    def _skip(self, reason: str, rid: str, msg: str) -> None:
        if self.strict:
            raise BonsaiError(f"{self.source}: record {rid}: {msg} (--strict; drop --strict to skip bad records)")
        self.skipped[reason] += 1
        self.first_skip.setdefault(reason, f"record {rid}: {msg}")

    def keep_only(self, keep, reason: str, msg: str) -> None:
        """Drop the samples for which `keep(sample)` is false, counting each as a skip of `reason`."""
        kept = []
        for smp in self.samples:
            if keep(smp):
                kept.append(smp)
            else:
                self._skip(reason, smp.record_id, msg)
        self.samples = kept

    def report(self) -> str:
        total = len(self.samples) + sum(self.skipped.values())
        lines = [f"{self.source}: {len(self.samples)} of {total} records usable"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n} × {reason} (e.g. {self.first_skip[reason]})")
        return "\n".join(lines)

    def __len__(self):
        return len(self.samples)


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
        lengths = np.array([len(s.input_ids) for s in dataset.samples])
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
