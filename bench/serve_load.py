"""`bonsai-mlx serve` under load, on loopback, in one run: aggregate decode tok/s with 1, 2, 4 and 8 concurrent
streams, p50/p95 time to first token, a re-sent image conversation's second-turn TTFT against its first, and a
bounded load run (N clients × M requests: every request answered or refused with 503, none lost; the server's RSS
before and after).

    python bench/serve_load.py [--tokens 64] [--quantize 4] [--clients 8] [--requests 3]

The server is `bonsai-mlx serve` in its own process (as deployed); the clients are threads here, reading the
server-sent events with the standard library's HTTP client (light: the `openai` client's per-chunk parsing, in the server's process, had cost the
server CPU time in proportion to the streams). Each answer is exactly --tokens tokens (`ignore_eos`, the llama.cpp /
vLLM extension), greedy, one new 224×224 image per stream (nothing is already in the prompt cache).

Aggregate decode tok/s is counted over the window in which all n streams are decoding (from the last stream's first
token to the first stream's last): the tokens all streams received in it over its length. The figure with the
prefills included (each stream's tokens after its first, over the time from the first stream's first token to the
last stream's end: requests are prefilled one at a time, so this mixes in n - 1 prefills) is printed beside it.

Real-size random-weight student (SigLIP-B/16-224 + Qwen2.5-0.5B shapes), saved as float32 and quantized on load.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PROMPT = "Look at the picture carefully and describe every object you can see."


def rss_gb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quantize", type=int, default=4, choices=[0, 4, 8])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3)
    args = ap.parse_args()

    import bonsai_mlx  # noqa: F401

    # isort: split
    import mlx.core as mx
    import numpy as np
    from common import real_size_student
    from PIL import Image

    from bonsai_mlx.io import save_model

    tmp = Path(tempfile.mkdtemp(prefix="bonsai-serve-bench-"))
    model, side = real_size_student(mx.float32)
    save_model(model, tmp / "student", extra_files_from=side)
    del model

    def url_of(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    images = [url_of(i) for i in range(16)]  # the load run's, the warm-up's and the conversation's
    fresh = iter(range(100, 200))  # a new image for every stream below
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "bonsai_mlx", "serve", "--model", str(tmp / "student"), "--port", str(port),
           "--max-concurrency", "8", "--max-queue", "8"] + (["--quantize", str(args.quantize)] if args.quantize else [])
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def post(payload):  # the response, open (read it, or iterate its lines for a stream)
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        return urllib.request.urlopen(req, timeout=600)

    try:
        t0 = time.monotonic()
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() - t0 > 600:
                raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:]}")
            time.sleep(0.5)

        def body(messages, max_tokens, stream):
            return {"model": "x", "messages": messages, "max_tokens": max_tokens, "stream": stream,
                    "ignore_eos": True}

        def stream(messages, out, max_tokens=args.tokens):
            t0 = time.perf_counter()
            times = []  # arrival of each content chunk (one per token: the random student's tokens all print)
            with post(body(messages, max_tokens, True)) as r:
                for raw in r:
                    line = raw.decode()
                    if line.startswith("data: {"):
                        c = json.loads(line[6:])
                        if c["choices"] and c["choices"][0]["delta"].get("content"):
                            times.append(time.perf_counter())
            out.append({"t0": t0, "first": times[0], "end": times[-1], "times": times})

        def user(text, img):
            return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                                 {"type": "text", "text": text}]}

        stream([user(PROMPT, images[15])], [], 4)  # warm-up
        print(f"real-size random student, {'float32' if not args.quantize else f'{args.quantize}-bit'}; "
              f"{args.tokens} tokens per answer; `bonsai-mlx serve` (pid {server.pid}) on {url}", flush=True)
        base = None
        for n in (1, 2, 4, 8):
            out: list = []
            threads = [threading.Thread(target=stream, args=([user(PROMPT, url_of(next(fresh)))], out))
                       for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            t_first = min(r["first"] for r in out)
            t_end = max(r["end"] for r in out)
            w0, w1 = max(r["first"] for r in out), min(r["end"] for r in out)  # all n decoding
            in_window = sum(sum(1 for t in r["times"] if w0 < t <= w1) for r in out)
            tps = in_window / (w1 - w0) if w1 > w0 else float("nan")
            all_in = sum(len(r["times"]) - 1 for r in out) / (t_end - t_first)
            ttft = sorted(r["first"] - r["t0"] for r in out)
            base = base or tps
            p95 = ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))]
            print(f"  {n} stream(s): aggregate decode {tps:.2f} tok/s (×{tps / base:.2f} of one stream; goal at 4: "
                  f">= 2.5; {in_window} tokens in {w1 - w0:.2f} s with all {n} decoding); with the prefills "
                  f"{all_in:.2f} tok/s; TTFT p50 {statistics.median(ttft):.2f} s, p95 {p95:.2f} s", flush=True)

        # a chat that re-sends its history and image: the second turn's TTFT against the first's
        turn1: list = []
        conv = [user(PROMPT, images[14])]
        stream(conv, turn1, 16)
        conv += [{"role": "assistant", "content": "a picture"}, {"role": "user", "content": "And the colours?"}]
        turn2: list = []
        stream(conv, turn2, 16)
        a, b = turn1[0]["first"] - turn1[0]["t0"], turn2[0]["first"] - turn2[0]["t0"]
        print(f"  re-sent image conversation: first turn TTFT {a:.2f} s, second {b:.2f} s (×{b / a:.2f}; goal <= "
              f"0.25; its KV cache and the image's features reused)", flush=True)

        # bounded load: clients × requests, all answered or refused with 503, memory back at idle
        idle = rss_gb(server.pid)
        counts = {"ok": 0, "503": 0, "other": 0}
        lock = threading.Lock()

        def client_loop(c):
            for r in range(args.requests):
                try:
                    with post(body([user(PROMPT, images[(c + r) % 14])], 16, False)) as resp:
                        json.loads(resp.read())["choices"][0]["message"]["content"]
                    k = "ok"
                except urllib.error.HTTPError as e:
                    k = "503" if e.code == 503 else "other"
                except OSError:
                    k = "other"
                with lock:
                    counts[k] += 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = args.clients * args.requests
        time.sleep(1.0)
        after = rss_gb(server.pid)
        print(f"  load: {args.clients} clients × {args.requests} requests in {time.perf_counter() - t0:.1f} s: "
              f"{counts['ok']} answered, {counts['503']} refused (503), {counts['other']} other, "
              f"{total - sum(counts.values())} lost; server RSS idle {idle:.2f} GB → after {after:.2f} GB",
              flush=True)
    finally:
        server.terminate()  # SIGTERM: in-flight requests finish, then it exits
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)  # the real-size student (~2 GB)


if __name__ == "__main__":
    main()
