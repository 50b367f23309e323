"""The HTTP layer: an OpenAI-compatible API on FastAPI + uvicorn (a kept async stack: request validation with the
field named, server-sent events, graceful shutdown on SIGTERM), in front of `engine.Engine`.

Routes: `POST /v1/chat/completions` (streamed or not), `GET /v1/models`, `GET /health`, and the chat page at `/`.
Every error is OpenAI's JSON shape with its status; none of them stops the server. (No `from __future__ import
annotations` here: FastAPI reads the handlers' annotations at run time.)
"""

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import BonsaiError
from .engine import Engine, Job, QueueFull, digest
from .schema import APIError, ChatRequest, ImagePolicy, engine_error, to_engine_messages

PAGE = Path(__file__).with_name("page.html")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, APIError(413, f"the request body is over {self.limit} bytes",
                                                    code="request_too_large"))
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_error(send, APIError(413, f"the request body is over {self.limit} bytes",
                                             code="request_too_large"))


class _TooLarge(Exception):
    pass


async def _send_error(send, e: APIError) -> None:
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(engine: Engine, model_name: str, api_key: Optional[str] = None, policy: Optional[ImagePolicy] = None,
               max_body: int = 32_000_000, default_max_tokens: int = 512):
    policy = policy or ImagePolicy()
    app = FastAPI(title="bonsai-mlx", docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(APIError(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", loc or None))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return error(APIError(e.status_code, str(e.detail), type_="invalid_request_error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key",
                           type_="authentication_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.pending}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "bonsai-mlx"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_key(request)
        messages, system, raws = to_engine_messages(req, policy)
        params = [p["param"] for m in messages if isinstance(m["content"], list) for p in m["content"]
                  if p["type"] == "image"]
        for m in messages:  # the engine's parts carry no parameter names
            if isinstance(m["content"], list):
                m["content"] = [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})}
                                for p in m["content"]]
        images = []
        for raw, param in zip(raws, params, strict=True):
            images.append((digest(raw), await run_in_threadpool(policy.decode, raw, param)))
        try:
            n_prompt = await run_in_threadpool(engine.prompt_tokens, messages, system)
        except BonsaiError as e:
            raise engine_error(e) from None
        room = engine.processor.context_length - n_prompt
        max_tokens = min(req.max_completion_tokens or req.max_tokens or default_max_tokens, room)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(messages, system, images, max_tokens, req.temperature, req.top_p, req.seed, stop,
                  ignore_eos=req.ignore_eos,
                  emit=lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)))
        try:
            engine.submit(job)
        except QueueFull:
            raise APIError(503, "the server is busy; retry shortly", code="server_busy", type_="server_error",
                           headers={"Retry-After": "1"}) from None
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def usage(done):
            p, c = done["prompt_tokens"] or n_prompt, done["completion_tokens"] or 0
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not req.stream:
            try:
                text = []
                while True:
                    kind, payload = await events.get()
                    if kind == "delta":
                        text.append(payload)
                    elif kind == "error":
                        raise _as_api_error(payload)
                    else:
                        break
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "finish_reason": payload["finish_reason"]}], "usage": usage(payload)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta, finish=None, **extra):
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def sse():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, payload = await events.get()
                    if kind == "delta":
                        yield chunk({"content": payload})
                    elif kind == "error":
                        yield f"data: {json.dumps(_as_api_error(payload).body())}\n\n"
                        break
                    else:
                        yield chunk({}, payload["finish_reason"])
                        if include_usage:
                            body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": model_name, "choices": [], "usage": usage(payload)}
                            yield f"data: {json.dumps(body)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:  # a client that went away frees the worker at its next token
                job.cancelled.set()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return BodyLimit(app, max_body)


def _as_api_error(e) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, BonsaiError):
        return engine_error(e)
    return APIError(500, f"generation failed ({type(e).__name__})", type_="server_error")
