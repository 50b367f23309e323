"""Many LLaVA-Instruct records encoded at once — the arrays behind `prepare.py` (and the teacher tool's student side,
`encode_many`): `prompting.encode_example`'s result for a chunk of records with one tokenizer call and array label
masks (see prepare.py's docstring for the why; tested record for record).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..errors import BonsaiError
from ..prompting import IM_END, IMAGE_TOKEN, Example, RecordError, chat_text, parse_turns
from .fast_tokens import offsets_from_lengths, pick_backend, token_byte_lengths, without_nfc

CHUNK = 2048  # records per tokenizer call


# --- many records at once ----------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """One chunk's records, encoded, each image's run of `<image>` ids as one id ("collapsed"): flat token arrays
    and per-record results (errors by position in the chunk)."""

    ids: np.ndarray  # [N] int32, the kept tokens of the ok records, record after record (collapsed)
    mask: np.ndarray  # [N] bool
    starts: np.ndarray  # [R+1] offsets of each ok record into ids (after truncation)
    image_pos: np.ndarray  # [R] position of the image id in the collapsed record (-1: text-only)
    ok: List[int]  # positions (in the chunk) of the records that encoded
    errors: Dict[int, RecordError]  # position → why not
    images: List[Optional[str]]  # per ok record
    truncated: List[bool]
    turns: List[list] = field(default_factory=list)
    offsets: Optional[np.ndarray] = None  # [N, 2] char offsets in the one-<image> text (with want_offsets)


def _fast_backend(tokenizer):
    return getattr(tokenizer, "backend_tokenizer", None)


def encode_chunk(tokenizer, records: Sequence, image_seq_length: int, max_seq_len: Optional[int] = None,
                 system: Optional[str] = None, image_token_id: Optional[int] = None,
                 want_offsets: bool = False, byte_lens: Optional[np.ndarray] = None) -> Encoded:
    """`encode_example` for every record of `records` with one tokenizer call and array label masks.

    The texts are tokenized with a single `<image>` each: `<image>` is a special token, so the text around it is
    split off and tokenized on its own whatever the run length — the run is put back by position (saves the
    tokenizer 195 of every ~500 tokens of the real student's samples)."""
    return finish_chunk(tokenize_chunk(tokenizer, records, system, byte_lens), tokenizer, image_seq_length, max_seq_len,
                        image_token_id, want_offsets)


def tokenize_chunk(tokenizer, records: Sequence, system: Optional[str] = None,
                   byte_lens: Optional[np.ndarray] = None) -> tuple:
    """Stage 1 of `encode_chunk`: parse the records, build the one-<image> chat texts, tokenize them.

    `byte_lens` (`fast_tokens.token_byte_lengths`): offsets from token lengths where that is exact."""
    parsed = chat_texts(records, system)
    return parsed + token_arrays(tokenizer, parsed[1], byte_lens)


def chat_texts(records: Sequence, system: Optional[str] = None) -> tuple:
    """(errors by position, texts, spans, images, positions, turns) of the records that parse."""
    errors: Dict[int, RecordError] = {}
    texts, spans, images, pos, turns_ok = [], [], [], [], []
    for j, rec in enumerate(records):
        try:
            turns, image = parse_turns(rec)
        except RecordError as e:
            errors[j] = e
            continue
        text, sp = chat_text(turns, system, 1)
        texts.append(text)
        spans.append(sp)
        images.append(image)
        pos.append(j)
        turns_ok.append(turns)
    return errors, texts, spans, images, pos, turns_ok


def token_arrays(tokenizer, texts: List[str], byte_lens: Optional[np.ndarray] = None, encs=None) -> tuple:
    """(lengths, ids, [N, 2] offsets) of `texts`; `encs`: their `encode_batch` result when already made."""
    backend = _fast_backend(tokenizer)
    if backend is not None:
        if encs is None:
            encs = backend.encode_batch(texts, add_special_tokens=False)
        lens = np.fromiter((len(e.ids) for e in encs), np.int64, len(encs))
        ids = np.fromiter(chain.from_iterable(e.ids for e in encs), np.int32, int(lens.sum()))
        if byte_lens is not None:
            offs = offsets_from_lengths(byte_lens, ids, lens, texts, encs)
        else:
            offs = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encs)), np.int64,
                               2 * int(lens.sum())).reshape(-1, 2)
    else:  # a slow (Python) tokenizer: one call per text, same result
        outs = [tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
        lens = np.array([len(o["input_ids"]) for o in outs], np.int64)
        ids = np.array([i for o in outs for i in o["input_ids"]], np.int32)
        offs = np.array([a for o in outs for a in o["offset_mapping"]], np.int64).reshape(-1, 2)
    return lens, ids, offs


def pipelined_chunks(records: Iterable, tokenizer, system: Optional[str], byte_lens: Optional[np.ndarray]):
    """(chunk, tokenized) for consecutive chunks of `records`, the Rust tokenizer one chunk ahead on a thread.

    Why: `encode_batch` releases the GIL and keeps both cores busy, but the Python around it (JSON, chat texts,
    arrays: ~30% of the time) runs on one core; started one chunk ahead, the tokenizer uses the other core meanwhile.
    """
    from concurrent.futures import ThreadPoolExecutor

    backend = _fast_backend(tokenizer)
    raw = without_nfc(backend)
    it = iter(records)

    def start(pool):
        chunk = list(islice(it, CHUNK))
        if not chunk:
            return None
        parsed = chat_texts(chunk, system)
        fut = pool.submit(pick_backend(backend, raw, parsed[1]).encode_batch, parsed[1], add_special_tokens=False) \
            if backend is not None else None
        return chunk, parsed, fut

    with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool:
        nxt = start(pool)
        while nxt is not None:
            chunk, parsed, fut = nxt
            nxt = start(pool)  # parsed while `chunk` tokenizes; its own tokenization queues behind
            yield chunk, parsed + token_arrays(tokenizer, parsed[1], byte_lens, fut.result() if fut else None)


def finish_chunk(tokenized: tuple, tokenizer, image_seq_length: int, max_seq_len: Optional[int] = None,
                 image_token_id: Optional[int] = None, want_offsets: bool = False) -> Encoded:
    """Stage 2 of `encode_chunk`: label masks, image runs, truncation and refusals, with arrays."""
    errors, texts, spans, images, pos, turns_ok, lens, ids, offs = tokenized
    img_id = image_token_id if image_token_id is not None else tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_extra = image_seq_length - 1  # ids the run adds beyond its one stored id
    n_rec = len(texts)
    starts = np.zeros(n_rec + 1, np.int64)
    np.cumsum(lens, out=starts[1:])
    rec_of = np.repeat(np.arange(n_rec), lens)  # [N] record of each token
    local = np.arange(len(ids)) - starts[rec_of]  # [N] position inside its record
    # chars laid end to end: a token's and a span's global coordinates
    base = np.zeros(n_rec + 1, np.int64)
    np.cumsum([len(t) for t in texts], out=base[1:])
    a, b = offs[:, 0] + base[rec_of], offs[:, 1] + base[rec_of]
    span_rec = np.repeat(np.arange(n_rec), [len(s) for s in spans])
    sp = np.array([x for s in spans for x in s], np.int64).reshape(-1, 2)
    s_glob = sp[:, 0] + base[span_rec]
    e_glob = sp[:, 1] + len(IM_END) + base[span_rec]  # the closing <|im_end|> is supervised too
    j = np.searchsorted(e_glob, a, side="right")  # the first span ending after the token's start
    mask = (j < len(e_glob)) & (s_glob[np.minimum(j, max(len(e_glob) - 1, 0))] < b) if len(e_glob) else \
        np.zeros(len(ids), bool)

    is_img = ids == img_id
    n_img = np.bincount(rec_of[is_img], minlength=n_rec)
    img_pos = np.full(n_rec, -1, np.int64)
    np.maximum.at(img_pos, rec_of[is_img], local[is_img])
    has_img = np.array([im is not None for im in images], bool)
    full_len = lens + np.where(has_img, n_extra, 0)  # the expanded length
    keep_len = lens.copy()  # collapsed tokens kept
    truncated = np.zeros(n_rec, bool)
    bad: Dict[int, RecordError] = {}
    for r in range(n_rec):
        if has_img[r] and n_img[r] != 1:
            raise BonsaiError(f"<image> tokenized into {n_img[r] * image_seq_length} image ids, expected "
                              f"{image_seq_length}: the tokenizer needs <image> as a special token (bonsai-mlx init "
                              "adds it)")
        if max_seq_len is not None and full_len[r] > max_seq_len:
            if has_img[r] and img_pos[r] + n_extra >= max_seq_len:
                bad[r] = RecordError("image_does_not_fit",
                                     f"image tokens end at {img_pos[r] + n_extra + 1} > --max-seq-len {max_seq_len}")
                continue
            keep_len[r] = max_seq_len - (n_extra if has_img[r] else 0)
            truncated[r] = True
    keep_tok = local < keep_len[rec_of]
    sup = mask & keep_tok & (local > 0)  # position 0 is never a target
    n_sup = np.bincount(rec_of[sup], minlength=n_rec)
    for r in range(n_rec):
        if r not in bad and n_sup[r] == 0:
            bad[r] = RecordError("no_supervised_tokens", "no assistant token left after truncation")
    for r, e in bad.items():
        errors[pos[r]] = e
    ok_rec = np.array([r not in bad for r in range(n_rec)], bool)
    keep_tok &= ok_rec[rec_of]
    kept = [r for r in range(n_rec) if ok_rec[r]]
    new_starts = np.zeros(len(kept) + 1, np.int64)
    np.cumsum(keep_len[kept], out=new_starts[1:])
    return Encoded(ids=ids[keep_tok], mask=mask[keep_tok], starts=new_starts,
                   image_pos=np.where(has_img, img_pos, -1)[kept] if kept else np.zeros(0, np.int64),
                   ok=[pos[r] for r in kept], errors=dict(sorted(errors.items())), images=[images[r] for r in kept],
                   truncated=[bool(truncated[r]) for r in kept], turns=[turns_ok[r] for r in kept],
                   offsets=offs[keep_tok] if want_offsets else None)


def encode_many(tokenizer, records: Sequence, image_seq_length: int, max_seq_len: Optional[int] = None,
                system: Optional[str] = None, image_token_id: Optional[int] = None) -> list:
    """Per record, the `Example` `encode_example` gives (or the `RecordError` it raises), in batches."""
    img_id = image_token_id if image_token_id is not None else tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_extra, w = image_seq_length - 1, len(IMAGE_TOKEN)
    out: list = [None] * len(records)
    byte_lens = token_byte_lengths(_fast_backend(tokenizer))
    for c in range(0, len(records), CHUNK):
        enc = encode_chunk(tokenizer, records[c : c + CHUNK], image_seq_length, max_seq_len, system, img_id,
                           want_offsets=True, byte_lens=byte_lens)
        for j, e in enc.errors.items():
            out[c + j] = e
        for k, j in enumerate(enc.ok):
            lo, hi = int(enc.starts[k]), int(enc.starts[k + 1])
            ids, mask, offs = enc.ids[lo:hi].tolist(), enc.mask[lo:hi].tolist(), enc.offsets[lo:hi].tolist()
            p = int(enc.image_pos[k])
            if p >= 0:  # put the run back: ids, (unsupervised) mask, offsets of each <image> and those after it
                o = offs[p][0]
                ids[p : p + 1] = [img_id] * image_seq_length
                mask[p : p + 1] = [False] * image_seq_length
                offs = offs[:p] + [[o + w * i, o + w * (i + 1)] for i in range(image_seq_length)] + \
                    [[x + w * n_extra, y + w * n_extra] for x, y in offs[p + 1 :]]
            text, spans = chat_text(enc.turns[k], system, image_seq_length)
            out[c + j] = Example(input_ids=ids, labels_mask=mask, offsets=[tuple(x) for x in offs], text=text,
                                 spans=spans, image=enc.images[k], num_image_tokens=image_seq_length if p >= 0 else 0,
                                 truncated=enc.truncated[k])
    return out
