"""`bonsai-mlx serve` (bonsai_mlx/serve/) on loopback, talked to with the official `openai` client: greedy answers
equal `generate`'s (streamed and not, one image and multi-turn), every error case is its status + OpenAI-shaped JSON
and the next request still succeeds, a full queue is 503 with Retry-After, a client that leaves mid-stream frees the
worker."""

import base64
import io
import json
import socket
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import openai  # the official client (dev extra): a hard requirement, never a skip
import pytest
from conftest import build_llava
from PIL import Image

from bonsai_mlx.cpu import block
from bonsai_mlx.generate import generate, stream_generate
from bonsai_mlx.io import load
from bonsai_mlx.serve import Server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(img: Image.Image, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("serve")
    d, _ = build_llava(root / "student", tokenizer, seed=7, noise=0.3)
    model, proc = load(d)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    img.save(root / "x.png")
    server = Server((model, proc), port=free_port(), api_key="sekrit", max_queue=1, max_concurrency=1, max_body=300_000,
                    max_pixels=100_000, model_name="tiny").start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sekrit", max_retries=0, timeout=60)
    yield server, client, model, proc, img, root
    server.stop()


def ask(prompt, image=None):
    content = ([{"type": "image_url", "image_url": {"url": data_url(image)}}] if image is not None else []) + \
        [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def test_greedy_answers_equal_generate_streamed_or_not(served):
    server, client, model, proc, img, root = served
    for prompt in ("What is in the picture?", "Describe it in detail."):
        ref = generate(model, proc, prompt, image=img, max_tokens=16)
        r = client.chat.completions.create(model="tiny", messages=ask(prompt, img), max_tokens=16)
        assert r.choices[0].message.content == ref.text
        assert r.choices[0].finish_reason == ref.finish_reason
        assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == len(ref.token_ids)
        chunks = list(client.chat.completions.create(model="tiny", messages=ask(prompt, img), max_tokens=16,
                                                     stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == ref.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
        assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    # ignore_eos (llama.cpp's / vLLM's extension): EOS does not end the answer, so exactly max_tokens tokens
    from bonsai_mlx.serve.engine import Job, _Live

    eos = next(iter(proc.tokenizer.eos_token_ids))
    assert _Live(Job([], None, [], 5), proc, 3).add(eos, None) is True  # EOS ends a normal answer
    assert _Live(Job([], None, [], 5, ignore_eos=True), proc, 3).add(eos, None) is False
    r = client.chat.completions.create(model="tiny", messages=ask("Hi?", img), max_tokens=40,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = json.loads(urllib.request.urlopen(server.url + "/health", timeout=10).read())
    assert health["status"] == "ok"


def test_multi_turn_with_an_image_equals_the_engine_and_reuses_its_features(served):
    """The second turn re-sends the history and the image: its answer is the engine's on the whole conversation, the
    image is not encoded again, and the KV cache of the first turn's prompt (and answer) is reused."""
    server, client, model, proc, img, root = served
    first = generate(model, proc, "What is in the picture?", image=img, max_tokens=8).text
    turns = ask("What is in the picture?", img) + [{"role": "assistant", "content": first},
                                                   {"role": "user", "content": "And what colour is it?"}]
    ours = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
            {"role": "assistant", "content": first}, {"role": "user", "content": "And what colour is it?"}]
    ref = [seg for seg, item in stream_generate(model, proc, messages=ours, image=img, max_tokens=12)
           if seg is not None]
    r1 = client.chat.completions.create(model="tiny", messages=ask("What is in the picture?", img), max_tokens=8)
    assert r1.choices[0].message.content == first
    hits = server.engine.feature_hits
    r = client.chat.completions.create(model="tiny", messages=turns, max_tokens=12)
    assert r.choices[0].message.content == "".join(ref)
    assert server.engine.feature_hits > hits  # the image's features came from the cache (encoded by earlier turns)
    # the prompt cache: at least the first turn's prompt came from its KV cache, and not the whole second prompt
    n1 = len(proc.chat_ids(ours[:1]))
    assert n1 <= server.engine.reused[-1] < r.usage.prompt_tokens, (n1, server.engine.reused[-1])
    # another image at the same place reuses only what precedes the image
    other = Image.fromarray(np.random.default_rng(9).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    client.chat.completions.create(model="tiny", messages=ask("What is in the picture?", other), max_tokens=2)
    first_image = proc.chat_ids(ours[:1]).index(model.config.image_token_index)
    assert server.engine.reused[-1] <= first_image


class RawError(Exception):
    def __init__(self, status, body):
        self.status, self.body = status, body


def raw_post(url, body, headers=None):
    """A request without the client (which always sends a key)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        return json.loads(urllib.request.urlopen(req, timeout=30).read())
    except urllib.error.HTTPError as e:
        raise RawError(e.code, json.loads(e.read())) from None


def error_of(fn):
    with pytest.raises((openai.APIStatusError, RawError)) as e:
        fn()
    if isinstance(e.value, RawError):
        status, body = e.value.status, e.value.body
    else:
        status, body = e.value.status_code, e.value.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return status, body["error"]


def test_every_bad_request_gets_its_status_and_the_server_keeps_serving(served):
    server, client, model, proc, img, root = served
    create = client.chat.completions.create
    ok = lambda: create(model="tiny", messages=ask("Hi?", img), max_tokens=3)  # noqa: E731
    bad_b64 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}},
                                            {"type": "text", "text": "?"}]}]
    garbage = [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()}}]}]
    huge = Image.new("RGB", (400, 400))  # 160k pixels > the server's 100k
    long_prompt = [{"role": "user", "content": "word " * 2000}]
    cases = {
        "bad base64": (lambda: create(model="tiny", messages=bad_b64), 400, "invalid_image"),
        "undecodable": (lambda: create(model="tiny", messages=garbage), 400, "invalid_image"),
        "too many pixels": (lambda: create(model="tiny", messages=ask("?", huge)), 400, "image_too_large"),
        "over the context": (lambda: create(model="tiny", messages=long_prompt), 400, "context_length_exceeded"),
        "wrong type": (lambda: create(model="tiny", messages=ask("?"), extra_body={"temperature": "hot"}), 400, None),
        "a flag as a string": (lambda: create(model="tiny", messages=ask("?"), extra_body={"ignore_eos": "yes"}), 400,
                               None),
        "remote url": (lambda: create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]), 400, "invalid_image"),
        "local path": (lambda: create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(root / "x.png")}}]}]), 400, "invalid_image"),
        "no key": (lambda: raw_post(server.url + "/v1/chat/completions", {"messages": ask("?")}), 401,
                   "invalid_api_key"),
        "wrong key": (lambda: openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
                      .chat.completions.create(model="tiny", messages=ask("?")), 401, "invalid_api_key"),
        "body too large": (lambda: create(model="tiny", messages=ask("?", Image.fromarray(
            np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)))), 413, "request_too_large"),
        "assistant last": (lambda: create(model="tiny", messages=[{"role": "assistant", "content": "x"}]), 400, None),
    }
    for name, (fn, status, code) in cases.items():
        got, err = error_of(fn)
        assert got == status, (name, got, err)
        if code is not None:
            assert err["code"] == code, (name, err)
        assert ok().choices[0].message.content is not None, name  # and the next request still succeeds


def test_a_full_queue_is_503_with_retry_after_and_nothing_is_lost(served):
    server, client, model, proc, img, root = served
    results = []

    def one():
        try:
            r = client.chat.completions.with_raw_response.create(model="tiny", messages=ask("Tell me more.", img),
                                                                  max_tokens=60)
            results.append((200, r.parse().choices[0].finish_reason, None))
        except openai.APIStatusError as e:
            results.append((e.status_code, None, e.response.headers.get("retry-after")))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 6  # every request answered
    statuses = sorted(s for s, _, _ in results)
    assert 200 in statuses and 503 in statuses, statuses  # one decodes, one waits (max_queue=1), the rest refused
    assert all(ra == "1" for s, _, ra in results if s == 503)
    assert set(statuses) <= {200, 503}


def test_a_client_that_leaves_mid_stream_frees_the_worker(served):
    server, client, model, proc, img, root = served
    stream = client.chat.completions.create(model="tiny", messages=ask("Go on and on.", img), max_tokens=400,
                                            stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    r = client.chat.completions.create(model="tiny", messages=ask("Hi?", img), max_tokens=3)
    assert r.choices[0].message.content is not None
    assert server.engine.cancelled and server.engine.cancelled[-1] < 400  # it stopped early, at its next token


def test_sigterm_finishes_the_request_in_flight_then_exits(tmp_path, tokenizer):
    import os
    import signal
    import subprocess
    import sys
    import time

    d, _ = build_llava(tmp_path / "student", tokenizer, seed=7, noise=0.3)
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-m", "bonsai_mlx", "serve", "--model", str(d), "--port", str(port)],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="x", messages=ask("Go on."), max_tokens=200, stream=True)
        chunks = iter(stream)
        next(chunks)
        p.send_signal(signal.SIGTERM)  # mid-answer
        rest = list(chunks)
        assert rest and rest[-1].choices[0].finish_reason in ("stop", "length")  # the answer was finished, not cut
        # uvicorn finishes in-flight requests, then re-raises the signal it caught (its documented behaviour)
        assert p.wait(60) in (0, -signal.SIGTERM)
        err = p.stderr.read()
        assert "Traceback" not in err, err
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("quantize", [None, 4])
def test_concurrent_streams_share_the_batch_and_each_gives_its_tokens_alone(tmp_path, tokenizer, quantize,
                                                                             monkeypatch):
    """4 streamed requests at once, decoded together (continuous batching: on the CPU with 4-bit weights one op per
    block for all rows, cpu/block.py; with float weights row by row), each give exactly the greedy tokens they give
    alone — which are `generate`'s."""
    d, _ = build_llava(tmp_path / "student", tokenizer, seed=7, noise=0.3)
    model, proc = load(d, quantize=quantize)
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)) for i in range(4)]
    prompts = ["What is in the picture?", "Describe it.", "Colour?", "Tell me a long story about it."]
    alone = [generate(model, proc, p, image=im, max_tokens=24).text for p, im in zip(prompts, imgs, strict=True)]
    rows_in_one_op = []
    real = block._fused_inputs

    def counting(blk, x, caches):
        r = real(blk, x, caches)
        if r is not None:
            rows_in_one_op.append(len(caches))
        return r

    monkeypatch.setattr(block, "_fused_inputs", counting)
    with Server((model, proc), port=free_port(), max_concurrency=4) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        got = [None] * 4
        barrier = threading.Barrier(4)

        def one(i):
            barrier.wait()
            s = client.chat.completions.create(model="x", messages=ask(prompts[i], imgs[i]), max_tokens=24,
                                               stream=True)
            got[i] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == alone
        assert server.engine.max_batch >= 2  # they really were decoded together
    if quantize and sys.platform == "linux":  # the CPU's one-op block took several rows at once
        assert max(rows_in_one_op) >= 2, rows_in_one_op
