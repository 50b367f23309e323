"""The OpenAI chat-completions request, validated (pydantic, as FastAPI reads it), and turned into what the one
generation engine takes: our chat messages (an `{"type": "image"}` part where each image goes, as the chat template
renders them) and the images' bytes, in order.

Images: `data:` base64 URLs always; `http(s)://` only when the operator allows remote images; local paths (or
`file://`) only under the directory the operator names. A decompression bomb (more pixels than `max_pixels`) is
refused before it is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from ..errors import BonsaiError


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ImageURL(BaseModel):
    url: str
    detail: Optional[str] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, List[ContentPart], None] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields we read; unknown ones are ignored (as OpenAI-compatible servers do), wrong types are refused."""

    model_config = ConfigDict(extra="ignore")
    messages: List[Message] = Field(min_length=1)
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=1)
    # an extension of llama.cpp's server and vLLM: EOS does not end the answer (exactly max_tokens: benchmarks)
    ignore_eos: StrictBool = False


class ImagePolicy:
    """Where images may come from, and how large they may be."""

    def __init__(self, allow_remote: bool = False, image_dir: Optional[Path] = None, max_pixels: int = 40_000_000,
                 max_bytes: int = 20_000_000):
        self.allow_remote, self.image_dir = allow_remote, Path(image_dir).resolve() if image_dir else None
        self.max_pixels, self.max_bytes = max_pixels, max_bytes

    def read(self, url: str, param: str) -> bytes:
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            if ";base64" not in head or not data:
                raise APIError(400, "image data URLs must be base64 (data:image/png;base64,...)", param, "invalid_image")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise APIError(400, "the image data URL is not valid base64", param, "invalid_image") from None
        elif url.startswith(("http://", "https://")):
            if not self.allow_remote:
                raise APIError(400, "remote image URLs are disabled on this server (start it with "
                                    "--allow-remote-images); send the image as a data: URL", param, "invalid_image")
            raw = _fetch(url, self.max_bytes, param)
        else:
            raw = self._local(url[len("file://"):] if url.startswith("file://") else url, param)
        if len(raw) > self.max_bytes:
            raise APIError(413, f"the image is {len(raw)} bytes, over this server's {self.max_bytes}", param,
                           "image_too_large")
        return raw

    def _local(self, path: str, param: str) -> bytes:
        if self.image_dir is None:
            raise APIError(400, "local image paths are disabled on this server (start it with --image-dir DIR); send "
                                "the image as a data: URL", param, "invalid_image")
        p = (self.image_dir / path).resolve()
        if self.image_dir not in p.parents and p != self.image_dir:
            raise APIError(400, f"image path {path!r} is outside the server's image directory", param,
                           "invalid_image")
        try:
            return p.read_bytes()
        except OSError:
            raise APIError(400, f"image {path!r}: no such file in the server's image directory", param,
                           "invalid_image") from None

    def decode(self, raw: bytes, param: str):
        """A PIL image, checked for its size before its pixels are decoded."""
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(raw))
            if img.width * img.height > self.max_pixels:
                raise APIError(400, f"the image is {img.width}×{img.height} pixels, over this server's "
                                    f"{self.max_pixels}", param, "image_too_large")
            img.load()
        except APIError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise APIError(400, f"the image could not be decoded ({type(e).__name__})", param,
                           "invalid_image") from None
        return img


def _fetch(url: str, max_bytes: int, param: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.read(max_bytes + 1)
    except Exception as e:  # noqa: BLE001 (any network failure is the client's image problem)
        raise APIError(400, f"the image URL could not be fetched ({type(e).__name__})", param,
                       "invalid_image") from None


def to_engine_messages(req: ChatRequest, policy: ImagePolicy) -> tuple:
    """(our messages, system prompt or None, [image bytes]) in conversation order."""
    messages, images, system = [], [], None
    for i, m in enumerate(req.messages):
        if m.role in ("system", "developer"):
            text = m.content if isinstance(m.content, str) else "".join(p.text or "" for p in m.content or [])
            if i == 0:
                system = text
                continue
            messages.append({"role": "system", "content": text})
            continue
        if m.content is None or isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content or ""})
            continue
        parts = []
        for j, p in enumerate(m.content):
            param = f"messages[{i}].content[{j}]"
            if p.type == "text":
                parts.append({"type": "text", "text": p.text or ""})
            else:
                if m.role != "user":
                    raise APIError(400, "images are accepted in user messages only", param)
                if p.image_url is None:
                    raise APIError(400, "an image_url part needs image_url.url", param)
                url = p.image_url if isinstance(p.image_url, str) else p.image_url.url
                images.append(policy.read(url, param + ".image_url"))
                parts.append({"type": "image", "param": param + ".image_url"})
        messages.append({"role": m.role, "content": parts})
    if not messages or messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", "messages")
    return messages, system, images


def engine_error(e: BonsaiError) -> APIError:
    """The engine's one-line errors (a prompt over the context, …) as a 400."""
    msg = str(e)
    code = "context_length_exceeded" if "context" in msg else None
    return APIError(400, msg, "messages", code)
