"""`bonsai-mlx serve`: the OpenAI-compatible server and chat page (`bonsai_mlx/serve/`)."""

from __future__ import annotations

import click

from ..errors import BonsaiError


@click.command()
@click.option("--model", required=True, metavar="DIR_OR_ID", help="Student directory or hub id.")
@click.option("--adapter", default=None, type=click.Path(), metavar="DIR", help="Training checkpoint to apply.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the language model on load.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="Port to listen on.")
@click.option("--api-key", default=None, envvar="BONSAI_MLX_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 (also $BONSAI_MLX_API_KEY).")
@click.option("--max-concurrency", default=8, show_default=True, type=int,
              help="Requests decoding together in one batched step (continuous batching).")
@click.option("--max-queue", default=16, show_default=True, type=int,
              help="Requests waiting beyond those decoding; more are answered 503 with Retry-After.")
@click.option("--prompt-cache", default=8, show_default=True, type=int,
              help="Finished conversations whose KV cache is kept for prompt reuse (0: none).")
@click.option("--max-tokens", "default_max_tokens", default=512, show_default=True, type=int,
              help="Answer length when a request sets no max_tokens.")
@click.option("--allow-remote-images", is_flag=True, help="Fetch http(s) image URLs (off: data: URLs only).")
@click.option("--image-dir", default=None, type=click.Path(file_okay=False, exists=True),
              help="Allow local image paths, but only under this directory.")
@click.option("--max-body", default="32MB", show_default=True, help="Largest request body (e.g. 32MB); more is 413.")
@click.option("--max-pixels", default=40_000_000, show_default=True, type=int,
              help="Largest image (width × height) decoded; more is refused before decoding.")
def serve(model, adapter, quantize, host, port, api_key, max_concurrency, max_queue, prompt_cache, default_max_tokens,
          allow_remote_images, image_dir, max_body, max_pixels):
    """Serve the student over an OpenAI-compatible API, with a chat page at /.

    \b
    POST /v1/chat/completions (messages with image_url parts as data: URLs; stream, max_tokens, temperature,
    top_p, seed, stop), GET /v1/models, GET /health. Greedy answers equal `bonsai-mlx generate`'s.
    Requests in flight share one batched decode step; a chat that re-sends its history reuses its KV cache.
    Example:
      bonsai-mlx serve --model bonsai --port 8080
      curl localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello"}]}'
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise BonsaiError("bonsai-mlx serve needs FastAPI and uvicorn: pip install 'bonsai-mlx[serve]'") from None
    from ..serve import Server
    from ..units import parse_size

    if max_queue < 0 or prompt_cache < 0 or max_concurrency < 1 or default_max_tokens < 1 or max_pixels < 1:
        raise BonsaiError("--max-queue and --prompt-cache must be >= 0; --max-concurrency, --max-tokens and "
                          "--max-pixels >= 1")
    s = Server(model, host=host, port=port, api_key=api_key, quantize=int(quantize) if quantize else None,
               adapter=adapter, max_queue=max(max_queue, 1), max_concurrency=max_concurrency, prompt_cache=prompt_cache,
               allow_remote_images=allow_remote_images,
               image_dir=image_dir, max_body=parse_size(max_body), max_pixels=max_pixels,
               default_max_tokens=default_max_tokens)
    click.echo(f"serving {s.model_name} on {s.url} (chat page at {s.url}/, API at {s.url}/v1)", err=True)
    s.run()
