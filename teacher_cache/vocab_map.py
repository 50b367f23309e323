"""The teacher → student vocabulary map for the `mapped` logit-distillation loss (docs/architecture.md, "Distill").

A teacher token maps to the student token whose decoded string is the same, after the two tokenizers' ways of
writing a space are normalized: SentencePiece's `▁` (Llama) and byte-level BPE's `Ġ` (GPT-2 / Qwen: every byte
written as a printable character) both become " ". Tokens that are not text of their own map to nothing (-1):
special and added tokens, SentencePiece byte-fallback pieces (`<0x0A>`), byte-level tokens that are not whole
UTF-8 characters, and any string two tokens of one vocabulary share (the map must be one-to-one so a renormalized KL
over the mapped support is a distribution on both sides). Framework-free (the tokenizers' own vocabularies).
"""

from __future__ import annotations

import json
import re
from typing import Dict, List, Optional

import numpy as np

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _byte_decoder() -> Dict[str, int]:
    """GPT-2's byte → printable character table (transformers' own), inverted."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_level(tok) -> bool:
    """Whether the fast tokenizer's decoder is byte-level (GPT-2 / Qwen) rather than SentencePiece-style."""
    spec = json.loads(tok.backend_tokenizer.to_str()).get("decoder") or {}
    stack = [spec]
    while stack:
        d = stack.pop()
        if d.get("type") == "ByteLevel":
            return True
        stack.extend(d.get("decoders") or [])
    return False


def token_strings(tok) -> List[Optional[str]]:
    """Each token id's text with spaces normalized (None where the token is not text of its own; see above)."""
    vocab = tok.get_vocab()  # piece → id, added tokens included
    n = max(vocab.values()) + 1
    out: List[Optional[str]] = [None] * n
    added = set(getattr(tok, "added_tokens_encoder", {}).values()) | set(tok.all_special_ids)
    byte_level = _is_byte_level(tok)
    dec = _byte_decoder() if byte_level else None
    for piece, i in vocab.items():
        if i in added:
            continue
        if byte_level:
            try:
                s = bytes(dec[c] for c in piece).decode("utf-8")
            except (KeyError, UnicodeDecodeError):  # part of a multi-byte character
                continue
        else:
            if _BYTE_PIECE.match(piece):
                continue
            s = piece.replace("▁", " ")
        if s:
            out[i] = s
    return out


def _unique(strings: List[Optional[str]]) -> Dict[str, int]:
    """string → id for the strings exactly one id has."""
    first: Dict[str, int] = {}
    dup = set()
    for i, s in enumerate(strings):
        if s is None:
            continue
        if s in first:
            dup.add(s)
        else:
            first[s] = i
    return {s: i for s, i in first.items() if s not in dup}


def build_map(teacher_tok, student_tok, teacher_vocab_size: Optional[int] = None) -> np.ndarray:
    """[teacher vocabulary] int32: the student id with the same normalized string, or -1. `teacher_vocab_size`:
    the teacher LM head's rows (may exceed the tokenizer's ids; the extra rows map to nothing)."""
    t = _unique(token_strings(teacher_tok))
    s = _unique(token_strings(student_tok))
    n = max(teacher_vocab_size or 0, len(teacher_tok.get_vocab()), max(t.values(), default=-1) + 1)
    out = np.full(n, -1, np.int32)
    for string, ti in t.items():
        si = s.get(string)
        if si is not None:
            out[ti] = si
    return out


__all__ = ["build_map", "token_strings"]
