"""Two shortcuts to the tokenizer's exact result, for preparing 150k-665k records (each measured on 2 cores):

- offsets without asking the tokenizer: a byte-level BPE token (GPT-2's, Qwen's) stands for exactly as many bytes
  as its vocabulary string has characters, so on ASCII text a record's offsets are the running sum of its tokens'
  lengths. Turning `Encoding.offsets` into arrays is one Python tuple per token (77 M for LLaVA-Instruct-150k);
  the lengths are one NumPy gather. Every record is checked (its lengths must add up to its text); one that does
  not, or is not ASCII, takes the tokenizer's own offsets.
- no NFC pass over text that is NFC already: Qwen's normalizer is NFC, which on normalized text changes nothing —
  neither the text nor the offsets — but still costs ~8% of `encode_batch` (per-character alignments). A copy of
  the tokenizer without it is used for the chunks whose every text `unicodedata.is_normalized("NFC", …)`.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Optional, Sequence

import numpy as np


def _has(node, kind: str, **fields) -> bool:
    """Whether a tokenizer.json component (or one inside a Sequence) is `kind` with these field values."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == "Sequence":
        return any(_has(n, kind, **fields) for n in node.get("pretokenizers") or node.get("processors") or [])
    return node.get("type") == kind and all(node.get(k) == v for k, v in fields.items())


def token_byte_lengths(backend) -> Optional[np.ndarray]:
    """Per token id, the UTF-8 bytes it stands for; None unless that is exactly what the tokenizer's offsets count:
    a byte-level BPE (no byte fallback, no subword prefixes), added tokens that strip no whitespace, no
    post-processor that trims offsets (`ByteLevel(trim_offsets=True)`)."""
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model, post = spec.get("model") or {}, spec.get("post_processor")
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or \
            model.get("end_of_word_suffix") or not _has(spec.get("pre_tokenizer"), "ByteLevel"):
        return None
    if _has(post, "ByteLevel", trim_offsets=True) or (post is not None and not (
            _has(post, "ByteLevel") or _has(post, "TemplateProcessing"))):
        return None
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    lens = np.zeros(max(vocab.values()) + 1, np.int64)
    for tok, i in vocab.items():
        lens[i] = len(tok)  # one character of the byte-level alphabet per byte
    for t in added:  # added tokens match their text, not the byte alphabet
        lens[t["id"]] = len(t["content"].encode("utf-8"))
    return lens


def offsets_from_lengths(byte_lens: np.ndarray, ids: np.ndarray, lens: np.ndarray, texts, encs) -> np.ndarray:
    """[N, 2] char offsets of the tokens of `texts` (`ids` record after record, `lens` per record): from the byte
    lengths for the ASCII records whose lengths add up to their text, from `encs[r].offsets` for the others."""
    tl = byte_lens[ids]  # [N]
    cum = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(tl, out=cum[1:])  # bytes before each token, records laid end to end
    starts = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=starts[1:])
    rec_base = cum[starts]  # [R+1] bytes before each record
    tot = np.diff(rec_base)  # [R] each record's bytes by the table
    offs = np.empty((len(ids), 2), np.int64)
    offs[:, 0] = cum[:-1] - np.repeat(rec_base[:-1], lens)
    offs[:, 1] = offs[:, 0] + tl
    for r, text in enumerate(texts):
        if not (text.isascii() and tot[r] == len(text)):
            lo, hi = starts[r], starts[r + 1]
            offs[lo:hi] = np.asarray(encs[r].offsets, np.int64).reshape(-1, 2)
    return offs


def without_nfc(backend):
    """A copy of `backend` with no normalizer when its normalizer is exactly NFC (else None)."""
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    norm = spec.get("normalizer") or {}
    if norm.get("type") == "Sequence":
        parts = norm.get("normalizers") or []
        norm = parts[0] if len(parts) == 1 else {}
    if norm.get("type") != "NFC":
        return None
    from tokenizers import Tokenizer

    raw = Tokenizer.from_str(backend.to_str())
    raw.normalizer = None
    return raw


def pick_backend(backend, raw, texts: Sequence[str]):
    """`raw` (the NFC-free copy) when every text is NFC already (then it tokenizes identically), else `backend`."""
    if raw is not None and all(unicodedata.is_normalized("NFC", t) for t in texts):
        return raw
    return backend
