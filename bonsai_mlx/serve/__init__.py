"""`bonsai-mlx serve`: an OpenAI-compatible chat server with images, and a chat page (docs/architecture.md,
"Serving"). `schema.py` reads and checks the requests, `engine.py` runs the one generation engine for them,
`app.py` is the HTTP layer; `Server` starts it in-process:

    from bonsai_mlx.serve import Server
    with Server("bonsai", port=8080) as s:      # or Server((model, processor), ...)
        ...  # s.url == "http://127.0.0.1:8080"

This `__init__` imports no framework until a Server is made.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Optional, Union


class Server:
    """The server on a background thread (uvicorn), until `stop()` (which finishes in-flight requests first)."""

    def __init__(self, model: Union[str, Path, tuple], host: str = "127.0.0.1", port: int = 8080,
                 api_key: Optional[str] = None, quantize: Optional[int] = None, adapter: Optional[str] = None,
                 max_queue: int = 16, max_concurrency: int = 8, prompt_cache: int = 8, allow_remote_images: bool = False,
                 image_dir: Optional[str] = None,
                 max_body: int = 32_000_000, max_pixels: int = 40_000_000, model_name: Optional[str] = None,
                 default_max_tokens: int = 512):
        import uvicorn

        from .app import create_app
        from .engine import Engine
        from .schema import ImagePolicy

        if isinstance(model, tuple):
            m, processor = model
            name = model_name or "bonsai-mlx"
        else:
            from ..io import load

            m, processor = load(model, quantize=quantize, adapter=adapter)
            name = model_name or Path(str(model)).name
        self.engine = Engine(m, processor, max_queue=max_queue, max_concurrency=max_concurrency,
                             prompt_cache=prompt_cache)
        policy = ImagePolicy(allow_remote=allow_remote_images, image_dir=image_dir, max_pixels=max_pixels)
        app = create_app(self.engine, name, api_key=api_key, policy=policy, max_body=max_body,
                         default_max_tokens=default_max_tokens)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None
        self.host, self.port, self.model_name = host, port, name

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "Server":
        self._thread = threading.Thread(target=self._server.run, name="bonsai-serve-http", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url} (is the port in use?)")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the server did not start on {self.url} within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def run(self) -> None:
        """In the foreground until SIGINT/SIGTERM (uvicorn's handlers: in-flight requests finish first)."""
        try:
            self._server.run()
        finally:
            self.engine.close()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(60)
        self.engine.close(60)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
