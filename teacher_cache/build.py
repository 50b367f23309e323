"""`python -m teacher_cache build`: run the LLaVA-1.5 teacher over LLaVA-Instruct records and shard its hidden states,
aligned to the student's tokens. PyTorch + transformers only.

Per record: the student side is encoded with the very code the student trainer uses (`bonsai_mlx.prompting`), the
teacher side with LLaVA-1.5's Vicuna-v1 template; tokens are paired by the chunk-end rule (`align.py`). The teacher
runs batched (right padding, `inference_mode`, `output_hidden_states`); the chosen layers' states at the paired
positions are stored, and optionally the image-token states average-pooled to the student's grid.

Determinism and resume: a rank's records are cut into fixed batches from the start, shards end on batch boundaries
and are committed (temp name → rename, then the rank's index file), so a killed build resumes at the first
uncommitted batch and writes byte-identical shards. Under `torchrun`, rank r takes records r::N and writes shards
r, r+N, r+2N, …; rank 0 merges the indices, computes the stats and writes the manifest, then index.json last.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from bonsai_mlx.atomic import atomic_file
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.hub import resolve
from bonsai_mlx.processing import load_image
from bonsai_mlx.prompting import RecordError
from bonsai_mlx.train.data import file_sha256, read_records

from . import FORMAT_VERSION, PROMPT_TEMPLATE_VERSION
from .format import VOCAB_MAP_FILE, CacheReader, sha256_file, write_json_atomic, write_shard, write_vocab_map
from .records import frame_image, prepare_many, student_side
from .vocab_map import build_map


@dataclass
class BuildConfig:
    teacher: str
    student_tokenizer: str
    data: str
    out: str
    layers: List[int]
    image_root: Optional[str] = None
    image_states: bool = False
    image_layers: Optional[List[int]] = None
    limit: Optional[int] = None
    batch_size: int = 4
    dtype: str = "float16"
    device: str = "cpu"
    torch_dtype: str = "float32"
    image_framing: str = "resize"
    shard_bytes: int = 1_900_000_000
    stats_tokens: int = 200_000
    student_image_tokens: Optional[int] = None
    logits_topk: int = 0  # > 0: also the teacher's top-k next-token log-probs and ids at every aligned pair


# --- the build -------------------------------------------------------------------------------------------------------------
@dataclass
class RankState:
    shards: List[dict] = field(default_factory=list)  # {"file", "num_samples", "bytes"}
    samples: Dict[str, list] = field(default_factory=dict)  # sample index → [file, row]
    failed: Dict[str, str] = field(default_factory=dict)  # sample index → reason
    pairs: int = 0
    response_tokens: int = 0


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def build(cfg: BuildConfig, log=print, model=None) -> Path:
    """Run the build. `model`: an already loaded teacher (benchmarks); default: load `cfg.teacher`'s weights."""
    import torch
    from tqdm import tqdm
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    rank, world = _dist()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    records = read_records(cfg.data)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    tdir = resolve(cfg.teacher, what="teacher")
    tcfg = json.loads((tdir / "config.json").read_text())
    if tcfg.get("model_type") != "llava":
        raise BonsaiError(f"{tdir}: expected a llava-hf teacher (model_type 'llava'), got {tcfg.get('model_type')!r}")
    student = student_side(cfg.student_tokenizer, cfg.student_image_tokens)
    teacher_tok = AutoTokenizer.from_pretrained(str(tdir))
    image_proc = AutoImageProcessor.from_pretrained(str(tdir))
    from transformers import LlavaConfig

    full_cfg = LlavaConfig.from_pretrained(str(tdir))
    hidden = int(full_cfg.text_config.hidden_size)
    n_layers = int(full_cfg.text_config.num_hidden_layers)
    for k in cfg.layers + (cfg.image_layers or []):
        if not 0 <= k <= n_layers:
            raise BonsaiError(f"--layers {k}: the teacher has hidden states 0..{n_layers}")
    image_token_id = int(full_cfg.image_token_id)
    vision = full_cfg.vision_config
    t_grid = vision.image_size // vision.patch_size
    t_img_tokens = int(getattr(full_cfg, "image_seq_length", t_grid * t_grid))
    if t_img_tokens != t_grid * t_grid:
        raise BonsaiError(f"teacher image_seq_length {t_img_tokens} != ({vision.image_size}/{vision.patch_size})²")
    image_layers = (cfg.image_layers or list(cfg.layers)) if cfg.image_states else []
    if cfg.logits_topk < 0:
        raise BonsaiError(f"--logits-topk {cfg.logits_topk}: must be >= 0")
    t_vocab = int(full_cfg.text_config.vocab_size)
    if cfg.logits_topk > t_vocab:
        raise BonsaiError(f"--logits-topk {cfg.logits_topk}: the teacher's vocabulary has {t_vocab} tokens")
    crop = image_proc.crop_size if getattr(image_proc, "crop_size", None) else image_proc.size
    crop_side = int(crop.get("height", crop.get("shortest_edge", vision.image_size)))

    identity = {
        "format_version": FORMAT_VERSION,
        "teacher": {"repo": cfg.teacher, "revision": _revision(tdir)},
        "layers": list(cfg.layers),
        "image_layers": image_layers,
        "hidden_size": hidden,
        "teacher_num_layers": n_layers,
        "dtype": cfg.dtype,
        "student_tokenizer": {"repo": student.repo, "sha256": student.tokenizer_sha256},
        "student_image_tokens": student.image_tokens,
        "dataset_sha256": file_sha256(cfg.data),
        "limit": cfg.limit,
        "prompt_template_version": PROMPT_TEMPLATE_VERSION,
        "image_framing": cfg.image_framing,
        "image_pool_grid": list(student.grid) if image_layers else None,
        "teacher_image_grid": [t_grid, t_grid],
        "batch_size": cfg.batch_size,
        "world_size": world,
    }
    if cfg.logits_topk:  # the teacher's next-token distribution at each pair, and the vocabulary map for `mapped`
        vmap = build_map(teacher_tok, student.tokenizer, t_vocab)
        identity["logits_topk"] = int(cfg.logits_topk)
        identity["vocab_map"] = {"file": VOCAB_MAP_FILE, "teacher_vocab_size": int(len(vmap)),
                                 "mapped_tokens": int((vmap >= 0).sum())}
    id_file = out / "build_identity.json"
    if id_file.exists():
        old = json.loads(id_file.read_text())
        diff = [k for k in identity if old.get(k) != identity[k]]
        if diff:
            raise BonsaiError(f"{out} holds a build with other settings ({', '.join(diff)}); use a new --out")
    elif rank == 0:
        write_json_atomic(id_file, identity)
    if cfg.logits_topk and rank == 0:
        write_vocab_map(out / VOCAB_MAP_FILE, vmap)

    # resume
    rank_file = out / f"index.rank{rank}.json"
    st = RankState(**json.loads(rank_file.read_text())) if rank_file.exists() else RankState()
    for stray in out.glob(".shard-*.tmp-*"):
        stray.unlink(missing_ok=True)
    done = set(st.samples) | set(st.failed)
    mine = [i for i in range(len(records)) if i % world == rank]
    batches = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    todo = [b for b in batches if not all(str(i) in done for i in b)]
    if done:
        log(f"rank {rank}: resuming, {len(st.samples)} samples already in {len(st.shards)} shards")

    device = torch.device(cfg.device)
    if model is None:
        model = LlavaForConditionalGeneration.from_pretrained(str(tdir), dtype=getattr(torch, cfg.torch_dtype))
    model.to(device).eval()
    pad_id = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else 0
    mean = getattr(image_proc, "image_mean", [0.5, 0.5, 0.5])
    bytes_per = 1 if cfg.dtype == "int8" else 2

    pending: List[dict] = []
    pending_failed: Dict[str, str] = {}
    pending_bytes = 0
    bar = tqdm(total=len(mine), initial=len(mine) - sum(len(b) for b in todo), desc=f"teacher r{rank}",
               unit="sample", position=rank, disable=None)
    t0 = time.perf_counter()

    def prepare_batch(batch):
        """CPU work of one batch (tokenize, align, decode and frame images), run ahead in a thread."""
        prepared, pixels, failed = [], [], {}
        many = prepare_many(batch, [records[i] for i in batch], student, teacher_tok, t_img_tokens, image_token_id)
        for i, p in zip(batch, many, strict=True):
            try:
                if isinstance(p, RecordError):
                    raise p
                if p.image is not None:
                    if cfg.image_root is None:
                        raise RecordError("missing_image", "record has an image but no --image-root was given")
                    path = Path(cfg.image_root) / p.image
                    if not path.is_file():
                        raise RecordError("missing_image", f"image {path} not found")
                    try:
                        img = frame_image(load_image(path), cfg.image_framing, crop_side, mean)
                    except BonsaiError as e:
                        raise RecordError("corrupt_image", str(e)) from None
                    kw = {"do_resize": False, "do_center_crop": False} if cfg.image_framing == "resize" else {}
                    pixels.append(image_proc(images=img, return_tensors="pt", **kw)["pixel_values"][0])
                prepared.append(p)
            except RecordError as e:
                failed[str(i)] = e.reason
        return batch, prepared, pixels, failed

    # Keep the GPU busy: the next batches are prepared while this one runs (the profile on an H100 showed the
    # serial loop spending most of its time on the host).
    from concurrent.futures import ThreadPoolExecutor

    # Several batches ahead on several threads: the tokenizers, Pillow's decode/resize and the image processor's
    # NumPy release the GIL (on one H100 two threads fed 19 samples/s; the teacher itself does more).
    ahead = max(2, min(8, (os.cpu_count() or 2) // 2))
    pool = ThreadPoolExecutor(max_workers=ahead)
    futures = [pool.submit(prepare_batch, b) for b in todo[:ahead]]
    store = torch.float16 if cfg.dtype == "float16" else torch.float32  # cast on the device: half the copy
    for n_done in range(len(todo)):
        batch, prepared, pixels, failed = futures.pop(0).result()
        if n_done + ahead < len(todo):
            futures.append(pool.submit(prepare_batch, todo[n_done + ahead]))
        pending_failed.update(failed)
        if prepared:
            T = max(len(p.teacher_ids) for p in prepared)
            ids = torch.full((len(prepared), T), pad_id, dtype=torch.long)
            att = torch.zeros((len(prepared), T), dtype=torch.long)
            for r, p in enumerate(prepared):
                ids[r, : len(p.teacher_ids)] = torch.tensor(p.teacher_ids)
                att[r, : len(p.teacher_ids)] = 1
            with torch.inference_mode():
                outputs = model(input_ids=ids.to(device), attention_mask=att.to(device),
                                pixel_values=torch.stack(pixels).to(device, model.dtype) if pixels else None,
                                output_hidden_states=True)
            hs = outputs.hidden_states
            for r, p in enumerate(prepared):
                tpos = torch.tensor(p.teacher_positions, dtype=torch.long, device=device)
                text = {k: hs[k][r, tpos].to(store).cpu().numpy() for k in cfg.layers}
                topk = {}
                if cfg.logits_topk:  # log_softmax over the whole vocabulary in float32, then the k largest (sorted)
                    lp = torch.log_softmax(outputs.logits[r, tpos].float(), dim=-1)
                    vals, idx = lp.topk(cfg.logits_topk, dim=-1)
                    topk = {"topk_logp": vals.to(torch.float16).cpu().numpy(),
                            "topk_ids": idx.to(torch.int32).cpu().numpy()}
                image = {}
                if image_layers and p.image is not None:  # a text-only record keeps its text states, no image row
                    img_pos = torch.nonzero(ids[r] == image_token_id)[:, 0].to(device)
                    for k in image_layers:
                        g = hs[k][r, img_pos].float().reshape(t_grid, t_grid, -1).permute(2, 0, 1)  # [D, g, g]
                        pooled = torch.nn.functional.adaptive_avg_pool2d(g, student.grid)  # [D, G, G]
                        image[k] = pooled.flatten(1).T.to(store).cpu().numpy()  # [G², D]
                pending.append({"index": p.index, "positions": p.student_positions, "text": text, "image": image,
                                "pairs": len(p.student_positions), "response_tokens": p.response_tokens, **topk})
                pending_bytes += (len(p.student_positions) * ((hidden * bytes_per + 4) * len(cfg.layers)
                                                              + cfg.logits_topk * 6)
                                  + len(image) * student.grid[0] * student.grid[1] * hidden * bytes_per)
        bar.update(len(batch))
        bar.set_postfix(samples_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):.2f}")
        if pending_bytes >= cfg.shard_bytes:
            _flush(out, st, pending, pending_failed, rank, world, cfg, image_layers, rank_file)
            pending, pending_failed, pending_bytes = [], {}, 0
    _flush(out, st, pending, pending_failed, rank, world, cfg, image_layers, rank_file)
    pool.shutdown()
    bar.close()
    log(f"rank {rank}: {len(st.samples)} samples, {len(st.failed)} failed, coverage "
        f"{st.pairs / max(st.response_tokens, 1):.3f}")

    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        finalize(out, identity, world, cfg.stats_tokens, log)
    if world > 1:
        torch.distributed.barrier()
    return out


def _flush(out: Path, st: RankState, pending, pending_failed, rank, world, cfg, image_layers, rank_file) -> None:
    if not pending and not pending_failed:
        return
    if pending:
        name = f"shard-{len(st.shards) * world + rank:05d}.safetensors"
        size = write_shard(out / name, pending, cfg.layers, image_layers, cfg.dtype)
        st.shards.append({"file": name, "num_samples": len(pending), "bytes": size})
        for row, s in enumerate(pending):
            st.samples[str(s["index"])] = [name, row]
            st.pairs += s["pairs"]
            st.response_tokens += s["response_tokens"]
    st.failed.update(pending_failed)
    write_json_atomic(rank_file, asdict(st))  # the commit point
    kill = int(os.environ.get("TEACHER_CACHE_KILL_AFTER_SHARDS", "0"))  # test hook: die like a preempted job
    if kill and len(st.shards) >= kill:
        os.kill(os.getpid(), signal.SIGKILL)


def finalize(out: Path, identity: dict, world: int, stats_tokens: int, log=print) -> None:
    """Merge the ranks' indices, compute per-channel stats, write the manifest, then index.json (last)."""
    from collections import Counter

    from safetensors.numpy import save_file

    states = [RankState(**json.loads((out / f"index.rank{r}.json").read_text())) for r in range(world)
              if (out / f"index.rank{r}.json").exists()]
    index, shards, failed = {}, [], {}
    pairs = resp = 0
    for s in states:
        index.update(s.samples)
        shards.extend(s.shards)
        failed.update(s.failed)
        pairs += s.pairs
        resp += s.response_tokens
    shards.sort(key=lambda x: x["file"])
    # Stats over the first `stats_tokens` aligned tokens in sample order (the same for any number of ranks).
    order = sorted(index, key=int)
    acc: Dict[str, list] = {}
    n_text = 0
    reader = CacheReader(out, index=index, manifest=identity)
    for si in order:
        if n_text >= stats_tokens:
            break
        sample = reader.get(si)
        for prefix, states in (("", sample["text"]), ("image.", sample["image"])):
            for k, x in states.items():
                x = x.astype(np.float64)
                m = acc.setdefault(f"{prefix}L{k}", [0, np.zeros(x.shape[1]), np.zeros(x.shape[1])])
                m[0] += len(x)
                m[1] += x.sum(0)
                m[2] += (x * x).sum(0)
        n_text += len(sample["positions"])
    stats = {}
    for key, (n, s1, s2) in acc.items():
        mean = s1 / max(n, 1)
        std = np.sqrt(np.maximum(s2 / max(n, 1) - mean * mean, 0.0))
        prefix = "image_" if key.startswith("image.") else ""
        k = key.split("L")[-1]
        stats[f"{prefix}mean.L{k}"] = mean.astype(np.float32)
        stats[f"{prefix}std.L{k}"] = np.maximum(std, 1e-6).astype(np.float32)
    with atomic_file(out / "stats.safetensors") as tmp:
        save_file(stats, str(tmp), metadata={"format": "np", "tokens": str(n_text)})

    manifest = {
        **{k: v for k, v in identity.items() if k not in ("batch_size", "world_size")},
        "num_samples": len(index),
        "stats_tokens": n_text,
        "coverage": pairs / max(resp, 1),
        "aligned_pairs": pairs,
        "student_response_tokens": resp,
        "failed": dict(Counter(failed.values())),
        "shards": [{**s, "sha256": sha256_file(out / s["file"])} for s in shards],
    }
    write_json_atomic(out / "manifest.json", manifest)
    write_json_atomic(out / "index.json", {k: index[k] for k in order})
    log(f"cache {out}: {len(index)} samples in {len(shards)} shards, coverage {manifest['coverage']:.3f}, "
        f"failed {manifest['failed']}")


def _revision(tdir: Path) -> Optional[str]:
    # a hub snapshot directory is named by its commit hash: …/snapshots/<sha>
    return tdir.name if tdir.parent.name == "snapshots" else None
