"""The one generation engine: image + prompt (or chat messages) → streamed answer, on top of mlx-lm's generation
loop. `bonsai-mlx generate`, `eval` (vqa answers, POPE's next-token decision) and the Python API all run through it:
the same prompt builder (`Processor.chat_ids`, the chat template), the same prefill, the same decode path.

The student builds the prompt's input embeddings (vision tower → projector → scatter into the `<image>` positions),
runs the prompt through the LM in one pass (`prefill`) and hands the filled KV cache to mlx-lm's `generate_step` for
decoding (its KV cache, samplers, async evaluation) and to its streaming detokenizer.

Why not mlx-lm's `stream_generate` from the start: its prefill runs all prompt tokens but the last, then the last one
as a separate one-token forward — a second pass over all the weights (a decode step: 143 ms for Qwen2.5-0.5B in
float32 on a 2-core CPU, `python bench/cpu_compile.py`). Here the whole prompt goes through at once and only the
last position goes through the LM head (as transformers' `logits_to_keep=1`), so full-prompt logits (151936 floats
per token for Qwen) are never computed.

API in the style of mlx-lm:

    model, processor = bonsai_mlx.load("bonsai")
    text = bonsai_mlx.generate(model, processor, "What is in the picture?", image="photo.jpg")
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

import mlx.core as mx
from mlx_lm.generate import GenerationResponse, generate_step, generation_stream, wired_limit
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .cpu.decode import decoding
from .errors import BonsaiError
from .language import lm_forward
from .model import LlavaModel
from .processing import Processor
from .prompting import user_message

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    prompt_tokens: int
    ttft_s: float
    vision_s: float
    prefill_tps: float
    decode_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None
    logprobs: List[mx.array] = field(default_factory=list, repr=False)

    def stats(self) -> dict:
        d = asdict(self)
        for k in ("logprobs",):
            d.pop(k)
        return d

    def to_json(self) -> dict:
        """The object `generate --json` prints (and each line of folder mode)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "token_ids": self.token_ids,
            "text": self.text,
            "ttft_s": round(self.ttft_s, 4),
            "vision_s": round(self.vision_s, 4),
            "prefill_tps": round(self.prefill_tps, 2),
            "decode_tps": round(self.decode_tps, 2),
            "peak_memory_gb": round(self.peak_memory_gb, 4),
            "finish_reason": self.finish_reason,
        }

    def stats_line(self) -> str:
        """The timing line `generate` prints to stderr."""
        return (f"ttft {self.ttft_s:.3f}s | vision {self.vision_s:.3f}s | prefill {self.prefill_tps:.1f} tok/s "
                f"({self.prompt_tokens} tokens) | decode {self.decode_tps:.1f} tok/s ({len(self.token_ids)} tokens) | "
                f"peak memory {self.peak_memory_gb:.2f} GB")


def check_sampling(max_tokens: int, temp: float, top_p: float, top_k: int) -> None:
    if max_tokens < 1:
        raise BonsaiError(f"--max-tokens must be at least 1, got {max_tokens}")
    if temp < 0:
        raise BonsaiError(f"--temp must be >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise BonsaiError(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise BonsaiError(f"--top-k must be >= 0 (0 disables it), got {top_k}")


def prepare_inputs(model: LlavaModel, processor: Processor, prompt: Optional[str] = None, image=None,
                   system: Optional[str] = None, messages: Optional[List[dict]] = None, image_features=None):
    """(prompt ids [T], input embeddings [T, D], vision seconds) for a one-turn `prompt` or chat `messages` (an image
    part where the image goes), with `image` (a path, URL or PIL image) or its precomputed `image_features`
    [1, P, D] (callers that ask several questions about one image compute them once)."""
    has_image = image is not None or image_features is not None
    if messages is None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise BonsaiError("the prompt is empty")
        messages = [user_message(prompt, with_image=has_image)]
    ids = processor.chat_ids(messages, system=system)
    if len(ids) >= processor.context_length:
        raise BonsaiError(
            f"the prompt is {len(ids)} tokens, the model's context is {processor.context_length}; shorten the prompt"
        )
    t0 = time.perf_counter()
    feats = image_features
    if feats is None and image is not None:
        pixels = mx.array(processor.image_processor([image]))  # [1, H, W, 3]
        feats = model.get_image_features(pixels)  # [1, P, D]
        mx.eval(feats)
    vision_s = time.perf_counter() - t0
    ids_arr = mx.array(ids)
    embeds = model.get_input_embeddings(ids_arr[None], image_features=feats)[0]  # [T, D]
    return ids_arr, embeds, vision_s


# prompts longer than this are prefilled in chunks (mlx-lm's default `prefill_step_size`): bounded activation memory
PREFILL_STEP = 2048


def prefill(model: LlavaModel, embeds: mx.array, cache: list, step: int = PREFILL_STEP) -> mx.array:
    """Run the prompt's input embeddings [T, D] through the LM into `cache`; returns the last position's logits [1, V].

    Chunks of `step` tokens (all but the last only fill the cache); the LM head sees only the final position."""
    lm = model.language_model
    T = embeds.shape[0]
    start = 0
    while T - start > step:
        lm_forward(lm, embeds[None, start : start + step], cache, compute_logits=False)
        mx.eval([c.state for c in cache])
        start += step
    logits, _ = lm_forward(lm, embeds[None, start:], cache, last_only=True)  # [1, 1, V]
    return logits[:, -1, :]


def next_token_logits(model: LlavaModel, embeds: mx.array) -> mx.array:
    """The logits [V] after the prompt (embeddings [T, D]): the first step of `generate_tokens`, without sampling."""
    return prefill(model, embeds, make_prompt_cache(model.language_model))[0]


def generate_tokens(model: LlavaModel, embeds: mx.array, sampler, max_tokens: int) -> Iterator[tuple]:
    """Yield (token id, logprobs [V]) for up to `max_tokens` tokens: one-pass prefill, then mlx-lm's `generate_step`
    decoding from the filled cache (the first sampled token is its one-token "prompt")."""
    lm = model.language_model
    cache = make_prompt_cache(lm)
    with mx.stream(generation_stream):
        logits = prefill(model, embeds, cache)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # as mlx-lm's _step
        y = sampler(logprobs)  # [1]
    mx.eval(y, logprobs)
    yield y.item(), logprobs[0]
    if max_tokens > 1:
        yield from generate_step(y, _Decoder(lm), max_tokens=max_tokens - 1, sampler=sampler, prompt_cache=cache)


class _Decoder:
    """The LM as mlx-lm's `generate_step` calls it, each step inside `cpu.decode.decoding()` (one-row float32 products
    by cblas_sgemv on the CPU)."""

    def __init__(self, lm):
        self.lm = lm

    def __call__(self, *args, **kwargs):
        with decoding():
            return self.lm(*args, **kwargs)


def stream_generate(
    model: LlavaModel,
    processor: Processor,
    prompt: Optional[str] = None,
    image=None,
    system: Optional[str] = None,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    messages: Optional[List[dict]] = None,
    image_features=None,
) -> Iterator[tuple]:
    """Yield (text segment, mlx-lm GenerationResponse) as tokens come; the last item is (None, GenerationResult).

    Stops at an EOS token (finish_reason "stop"; the EOS is not part of the answer) or after `max_tokens` tokens
    ("length"), with mlx-lm's `stream_generate` semantics."""
    check_sampling(max_tokens, temp, top_p, top_k)
    if seed is not None:
        mx.random.seed(seed)
    mx.reset_peak_memory()
    t_start = time.perf_counter()
    ids, embeds, vision_s = prepare_inputs(model, processor, prompt, image, system, messages, image_features)
    mx.eval(embeds)
    setup_s = time.perf_counter() - t_start
    max_tokens = min(max_tokens, processor.context_length - len(ids))
    sampler = make_sampler(temp=temp, top_p=top_p if top_p < 1 else 0.0, top_k=top_k)
    tokenizer = processor.tokenizer
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    tokens, logprobs, text = [], [], []
    ttft = t_first = t_last = None
    n = 0
    finish = "length"
    with wired_limit(model, [generation_stream]):
        for n, (token, lp) in enumerate(generate_tokens(model, embeds, sampler, max_tokens), start=1):
            now = t_last = time.perf_counter()
            if ttft is None:
                ttft, t_first = now - t_start, now
            if token in tokenizer.eos_token_ids:
                finish = "stop"
                break
            tokens.append(token)
            logprobs.append(lp)
            detokenizer.add_token(token)
            if n == max_tokens:
                break
            resp = _response(detokenizer.last_segment, token, lp, len(ids), None, n, now - t_first)
            text.append(resp.text)
            yield resp.text, resp
        detokenizer.finalize()
        resp = _response(detokenizer.last_segment, token, lp, len(ids), finish, n, time.perf_counter() - t_first)
        text.append(resp.text)
        yield resp.text, resp
    prefill_s = (ttft or 0.0) - setup_s
    # decode speed: the tokens after the first over the time from the first to the last (the first's cost is the TTFT)
    decode_s = t_last - t_first
    result = GenerationResult(
        text="".join(text),
        token_ids=tokens,
        prompt_tokens=len(ids),
        ttft_s=ttft or 0.0,
        vision_s=vision_s,
        prefill_tps=len(ids) / prefill_s if prefill_s > 0 else float("nan"),
        decode_tps=(n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan"),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
        logprobs=logprobs,
    )
    yield None, result


def _response(text, token, lp, prompt_tokens, finish, n, elapsed) -> GenerationResponse:
    return GenerationResponse(
        text=text, token=token, logprobs=lp, from_draft=False, prompt_tokens=prompt_tokens, prompt_tps=float("nan"),
        generation_tokens=n, generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else float("nan"),
        peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish,
    )


def generate(model: LlavaModel, processor: Processor, prompt: Optional[str] = None, image=None, verbose: bool = False,
             **kwargs):
    """Generate a full answer; returns a GenerationResult (`.text`, `.token_ids`, timing stats)."""
    result = None
    for segment, item in stream_generate(model, processor, prompt, image=image, **kwargs):
        if segment is None:
            result = item
        elif verbose:
            print(segment, end="", flush=True)
    if verbose:
        print()
    return result


def list_images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def generate_folder(model: LlavaModel, processor: Processor, prompt: str, images: List[Path], **kwargs):
    """Yield one JSON-able dict per image (`{"image", **result}`, or `{"image", "error"}` for an image that fails):
    a bad image never stops the rest."""
    for img in images:
        try:
            yield {"image": str(img), **generate(model, processor, prompt, image=str(img), **kwargs).to_json()}
        except BonsaiError as e:
            yield {"image": str(img), "error": str(e)}


def check_image_arg(image: Optional[str]) -> Optional[List[Path]]:
    """`--image`: None, a URL or a file (returns None), or a directory (returns its images); one-line errors."""
    if image is None or image.startswith(("http://", "https://")):
        return None
    p = Path(image)
    if p.is_dir():
        found = list_images(p)
        if not found:
            raise BonsaiError(f"--image {image}: the directory holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return found
    if not p.exists():
        raise BonsaiError(f"--image {image}: no such file")
    return None


class _CallableModule(type(sys.modules[__name__])):
    """`bonsai_mlx.generate` names both this module and the function (as in mlx-lm). Once the submodule is imported,
    Python binds the package attribute to the module, so the module forwards calls to the function."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
