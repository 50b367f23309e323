"""Data preparation at the real sizes: a synthetic LLaVA-Instruct file (any number of records) and the time to the
first training step, cold and with the prepared-data cache, plus the RAM the prepared samples take.

The file has LLaVA-Instruct-150k's shape (1-5 turns, `<image>` before or after the first question, short questions
and long answers, ~1.5 KB per record; `--text-only` adds ShareGPT-like records without an image, as the 665k mix
has) over `--images` JPEGs reused; the words are drawn from a Zipf vocabulary and the student's tokenizer is trained
on them (~1.2 tokens per word, as Qwen's on English). The student is a pico with SigLIP's 224 px / 16 px grid (196
image tokens, as the real student), so the token counts are the real ones.

    python bench/data_prep.py                              # 150k records: cold and cached first step, RSS
    python bench/data_prep.py --records 665000 --text-only 40000 --skip-train   # the 665k mix: RAM of the prepared set

Each figure is one fresh process (`bonsai-mlx train --max-steps 2`, timed to its first metrics line); "cold" is an
empty cache folder (the OS page cache is dropped when this runs as root and the kernel allows it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QUESTIONS = ("What is", "Describe", "Why does", "How many", "Where is", "What can you say about", "Explain")


def words(n_vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    p = 1.0 / np.arange(1, 27) ** 0.9
    lens = np.clip(rng.poisson(4.2, n_vocab) + 1, 1, 14)
    return np.array(["".join(rng.choice(letters, k, p=p / p.sum())) for k in lens])


def make_file(path: Path, n: int, n_text_only: int, images: list, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocab = words(8000, seed)
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    zipf /= zipf.sum()
    # one big draw of word ids, cut into the texts (fast enough for 665k records)
    n_turns = rng.integers(1, 6, n)
    q_len = rng.integers(6, 16, int(n_turns.sum()))
    a_len = rng.integers(15, 110, int(n_turns.sum()))
    pool = vocab[rng.choice(len(vocab), int(q_len.sum() + a_len.sum()), p=zipf)]
    pos, t = 0, 0
    text_only = set(rng.choice(n, min(n_text_only, n), replace=False).tolist()) if n_text_only else set()
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            conv = []
            for k in range(int(n_turns[i])):
                q = " ".join(pool[pos : pos + q_len[t]]) + "?"
                pos += q_len[t]
                a = " ".join(pool[pos : pos + a_len[t]]).capitalize() + "."
                pos += a_len[t]
                t += 1
                q = f"{QUESTIONS[(i + k) % len(QUESTIONS)]} {q}"
                if k == 0 and i not in text_only:
                    q = f"<image>\n{q}" if i % 2 else f"{q}\n<image>"
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            rec = {"id": f"{i:012d}", "conversations": conv}
            if i not in text_only:
                rec["image"] = images[i % len(images)]
            f.write(("," if i else "") + json.dumps(rec))
        f.write("]")


def make_images(root: Path, n: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"coco/train2017/{i:012d}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize((640, 480)).save(root / name,
                                                                                                 quality=85)
        names.append(name)
    return names


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def first_step(student: Path, data: Path, images: Path, cache: Path, out: Path) -> dict:
    """Seconds from process start to the first metrics line of `train --max-steps 2`, and the process's peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, BONSAI_MLX_CACHE=str(cache), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "bonsai_mlx", "train", "--model", str(student), "--data", str(data), "--image-root",
           str(images), "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--quantize", "none",
           "--max-seq-len", "2048"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    metrics = out / "metrics.jsonl"
    while p.poll() is None:
        if first is None and metrics.exists() and metrics.stat().st_size > 0:
            first = time.perf_counter() - t0
        time.sleep(0.05)
    err = p.stderr.read()
    if p.returncode != 0:
        raise SystemExit(f"train failed:\n{err[-3000:]}")
    if first is None:
        first = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # GB (peak over the children so far)
    return {"first_step_s": first, "peak_rss_gb_so_far": rss, "log": [ln for ln in err.splitlines()
                                                                      if "prepared" in ln or "usable" in ln]}


RAM_SCRIPT = r"""
import sys, json, os
from pathlib import Path
def rss():
    for ln in open('/proc/self/status'):
        if ln.startswith('VmRSS'):
            return int(ln.split()[1]) / 1e6
from transformers import AutoTokenizer
from bonsai_mlx.train.data import SFTDataset
student, data, images, cache = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(student)
n_img = json.loads((Path(student) / 'config.json').read_text())['image_seq_length']
r0 = rss()
logs = []
ds = SFTDataset.from_file(data, tok, images, n_img, 2048, cache_dir=Path(cache) / 'prepared', log=logs.append)
r1 = rss()
p = ds.prepared
total = int(p.lengths.sum())
s = int(sum(int(np.asarray(a).sum() % 7) for a in (p.ids, p.starts, p.mask_runs, p.lengths)))  # touch every page
r2 = rss()
print(json.dumps({"hit": any("cache" in m for m in logs), "samples": len(ds), "tokens": total, "stored_ids": len(p.ids), "nbytes_gb": p.nbytes() / 1e9,
                  "rss_load_gb": r1 - r0, "rss_touched_gb": r2 - r0, "rss_total_gb": r2}))
""".replace("import sys, json, os", "import sys, json, os\nimport numpy as np")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=150_000)
    ap.add_argument("--text-only", type=int, default=0, help="of which without an image (the 665k mix: ~40k)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--skip-train", action="store_true", help="only the prepared set's RAM (prepared in-process)")
    ap.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bonsai-data-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        img_root = work / "images"
        names = make_images(img_root, args.images)
        data = work / f"synthetic_{args.records}.json"
        make_file(data, args.records, args.text_only, names)
        print(f"data: {data.name}: {args.records} records ({args.text_only} text-only), "
              f"{data.stat().st_size / 1e6:.0f} MB, {args.images} JPEGs ({time.perf_counter() - t:.0f} s to make)")
        from bonsai_mlx.pico import build_pico

        with open(data, encoding="utf-8") as f:
            sample = json.loads(f.read(2_000_000).rsplit("},{", 1)[0] + "}]")
        corpus = [t["value"] for r in sample for t in r["conversations"]]
        student = build_pico(work / "student", corpus=corpus, image_size=224, patch_size=16, vocab_size=8000)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        if not args.skip_train:
            dropped = drop_page_cache()
            cold = first_step(student, data, img_root, cache, work / "run")
            warm = first_step(student, data, img_root, cache, work / "run")
            print(f"first step, cold (empty cache{', page cache dropped' if dropped else ', warm page cache'}): "
                  f"{cold['first_step_s']:.1f} s   (goal <= 60 s, moonshot 20 s)")
            print(f"first step, with the prepared-data cache: {warm['first_step_s']:.1f} s   (goal <= 10 s)")
            print(f"peak RSS of the training processes: {cold['peak_rss_gb_so_far']:.2f} GB")
            for ln in cold["log"] + warm["log"]:
                print("  " + ln)
        else:
            env = dict(os.environ, BONSAI_MLX_CACHE=str(cache))
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", RAM_SCRIPT, str(student), str(data), str(img_root), str(cache)],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            print(f"prepared cold in {time.perf_counter() - t:.1f} s (one process; peak RSS "
                  f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6:.2f} GB, the JSON parse included)")
        r = subprocess.run([sys.executable, "-c", RAM_SCRIPT, str(student), str(data), str(img_root), str(cache)],
                           check=True, capture_output=True, text=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"prepared set from the cache ({'hit' if m['hit'] else 'MISS'}): {m['samples']} samples, {m['tokens'] / 1e6:.1f} M tokens "
              f"({m['stored_ids'] / 1e6:.1f} M stored ids): arrays {m['nbytes_gb']:.3f} GB; RSS +{m['rss_load_gb']:.3f} "
              f"GB when loaded (memory-mapped), +{m['rss_touched_gb']:.3f} GB with every page read (goal <= 1 GB)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
