"""The language model's weights in 2 MB pages (Linux transparent huge pages), for decode's weight stream.

A decode step reads every weight of the LM once. MLX allocates each weight by itself in 4 KB pages, and the CPU's
stream prefetcher stops at each 4 KB boundary (and every page is a TLB miss): a 300 MB AVX-512 read loop on this
2-core EPYC runs ~13 GB/s on one core in 4 KB pages and ~22 GB/s in 2 MB pages (~25 → ~31 on both cores).
`doctor`'s read bandwidth, a NumPy sum, already sees the fast figure: NumPy advises huge pages for large arrays.
`place_weights` copies the LM's linear and embedding weights (packed values, scales, biases) into arenas that
csrc/pages.h advises MADV_HUGEPAGE, layer by layer, each original freed before the next is copied (the load's peak
grows by one layer, not by the model); the arenas are MLX allocations, so MLX's memory counters include them.
Where the kernel has no transparent huge pages ("never", or not Linux) nothing is copied.

With `pack=True`, where this CPU has the packed-tile kernel (AVX-512 VNNI), 4-bit layers are also repacked into
csrc/packed.h's 16-row tiles on the way. A packed layer holds `packed_weight`, `packed_scales`, `packed_biases` (and
`packed_n`, its output rows) instead of `weight`, `scales`, `biases`: code that expects MLX's layout fails loudly
rather than reading tiles as rows. Only inference packs (`io.load`); training, export and anything that reads the
weights back load unpacked. quantized.py and block.py run packed layers.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import qmm

PAGES_ENV = "BONSAI_HUGEPAGES"  # off: no 2 MB pages (weights stay where MLX put them, unless packed)
PACK_ENV = "BONSAI_PACK"  # off: 4-bit weights keep MLX's layout
ARENA_BYTES = 1 << 30  # one MLX allocation holds at most 2 GB (an int32 shape); a float32 LM needs two of these
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_LAYERS = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)
_KEYS = ("weight", "scales", "biases")


def thp_mode() -> str:
    """The kernel's transparent-huge-page setting ("always", "madvise", "never"), or "unavailable"."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def _off(env: str) -> bool:
    return os.environ.get(env, "").strip().lower() in ("off", "0", "none", "false")


def huge_pages() -> str:
    """'' where weights can go to 2 MB pages, else why not."""
    if _off(PAGES_ENV):
        return f"{PAGES_ENV}=off"
    if not qmm.available():
        return "no compiled extension"
    mode = thp_mode()
    return "" if mode in ("always", "madvise") else f"transparent huge pages: {mode}"


def tiles() -> str:
    """'' where 4-bit weights can be packed into tiles, else why not."""
    if _off(PACK_ENV):
        return f"{PACK_ENV}=off"
    if not qmm.available():
        return "no compiled extension"
    return "" if qmm.extension().packed_kernel() else "no packed-tile kernel for this CPU (AVX-512 VNNI)"


def packable(m: nn.Module) -> bool:
    """A 4-bit affine quantized layer whose rows the packed kernel takes (K a multiple of 32)."""
    return (isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and "weight" in m and m.bits == 4
            and getattr(m, "mode", "affine") == "affine" and (m["weight"].shape[-1] * 8) % 32 == 0)


def place_weights(lm: nn.Module, pack: bool = False) -> dict:
    """Move the weights of `lm`'s linear and embedding layers into 2 MB-page arenas, 4-bit ones repacked into tiles
    with `pack` where `tiles()` allows; returns {"bytes": moved, "packed": layers packed, "huge_pages": bool}.
    Without 2 MB pages (`huge_pages()` says why) only layers being packed move. Idempotent: a layer whose weight is
    the one placed before is left alone."""
    pages, pack = not huge_pages(), pack and not tiles()
    if not (pages or pack):
        return {"bytes": 0, "packed": 0, "huge_pages": False}
    ext = qmm.extension()
    layers = [m for _, m in lm.named_modules()
              if isinstance(m, _LAYERS) and "weight" in m and getattr(m, "_paged", None) != id(m["weight"])
              and (pages or packable(m))]
    keys = [[k for k in _KEYS if k in m and isinstance(m[k], mx.array)] for m in layers]
    tiles_ = [pack and packable(m) for m in layers]
    need = [ext.PageArena.packed_bytes(m["weight"].shape[0], m["weight"].shape[1] * 8, m.group_size) if t
            else sum(m[k].nbytes + 64 for k in ks) for m, ks, t in zip(layers, keys, tiles_, strict=True)]
    limit = mx.set_cache_limit(0)  # each freed original goes back to the system, not to MLX's buffer cache
    moved, packed, arena, left = 0, 0, None, 0
    try:
        for i, (m, ks, n, t) in enumerate(zip(layers, keys, need, tiles_, strict=True)):
            if arena is None or n > left:
                total = max(n, min(ARENA_BYTES, sum(need[i:])))
                arena, left = ext.PageArena(total, pages), total
            if t:
                n_out = m["weight"].shape[0]
                pw, ps, pb = arena.place_packed(m["weight"], m["scales"].astype(mx.float32),
                                                m["biases"].astype(mx.float32), m.group_size)
                for k in _KEYS:
                    m.pop(k)  # the originals are freed here
                m.packed_weight, m.packed_scales, m.packed_biases = pw, ps, pb
                m.packed_n = n_out  # plain attributes, not parameters
                packed += 1
            else:
                m.update({k: arena.place(m[k]) for k in ks})  # the originals are freed here
                m._paged = id(m["weight"])  # what is already placed
            left -= n
            moved += n
    finally:
        mx.set_cache_limit(limit)
    return {"bytes": moved, "packed": packed, "huge_pages": pages}
