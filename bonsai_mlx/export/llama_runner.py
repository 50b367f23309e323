"""Run an exported student in llama.cpp itself (through `llama-cpp-python`, the optional `llama` extra): greedy
tokens and next-token logits from *our* token ids, with the image handed to llama.cpp's mtmd as the RGB picture our
processor resized (`ImageProcessor.resized`). That way the comparison is of the models, not of two preprocessors:
llama.cpp's own path pads a non-square image onto a grey square and resamples with its own bicubic, where SigLIP
stretches it (see docs/gguf.md).

Used by the GGUF tests and `bench/gguf_vs_mlx.py`; `bonsai_mlx` does not depend on it otherwise.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from ..errors import BonsaiError


class LlamaCppRunner:
    def __init__(self, model: Union[str, Path], mmproj: Optional[Union[str, Path]] = None, n_ctx: int = 2048,
                 n_threads: Optional[int] = None, logits_all: bool = False, exact: bool = False):
        try:
            import llama_cpp
        except ImportError:
            raise BonsaiError("running a GGUF needs llama-cpp-python: pip install 'bonsai-mlx[llama]'") from None
        from llama_cpp._utils import suppress_stdout_stderr

        self.lc = llama_cpp
        # exact: an F32 KV cache and no flash attention (whose CPU kernel rounds K/V to F16), for parity checks; by
        # default llama.cpp's own settings, as its users run it
        kw = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False) if exact else {}
        self.llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_batch=512, n_threads=n_threads,
                                   logits_all=logits_all, verbose=False, **kw)
        self.n_vocab = self.llm.n_vocab()
        self.mtmd = None
        if mmproj is not None:
            from llama_cpp import mtmd_cpp

            self.m = mtmd_cpp
            params = mtmd_cpp.mtmd_context_params_default()
            params.use_gpu = False
            params.print_timings = False
            params.warmup = False
            if exact:
                params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            params.n_threads = self.llm.n_threads
            with suppress_stdout_stderr(disable=False):
                self.mtmd = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
            if not self.mtmd:
                raise BonsaiError(f"llama.cpp could not load the mmproj {mmproj}")

    def close(self) -> None:
        if self.mtmd:
            self.m.mtmd_free(self.mtmd)
            self.mtmd = None
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- evaluation -----------------------------------------------------------------------------------------------
    def last_logits(self) -> np.ndarray:
        ptr = self.lc.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32)  # a copy

    def _eval_image(self, image) -> int:
        """Encode `image` (PIL RGB, already the tower's size) with the mmproj and decode its embeddings at the
        current position; returns its number of positions."""
        m = self.m
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), np.uint8))
        h, w = rgb.shape[:2]
        data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = m.mtmd_bitmap_init(w, h, data)
        chunks = m.mtmd_input_chunks_init()
        try:
            text = m.mtmd_input_text()
            marker = m.mtmd_default_marker()
            text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
            arr = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if m.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(text), arr, 1) != 0:
                raise BonsaiError("llama.cpp's mtmd could not tokenize the image")
            n = 0
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                new = self.lc.llama_pos(0)
                if m.mtmd_helper_eval_chunk_single(self.mtmd, self.llm.ctx, chunk, self.llm.n_tokens, 0,
                                                   self.llm.n_batch, False, ctypes.byref(new)) != 0:
                    raise BonsaiError("llama.cpp's mtmd could not evaluate the image")
                n += new.value - self.llm.n_tokens
                self.llm.n_tokens = new.value
            return n
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def prefill(self, ids: Sequence[int], image=None, image_token_id: Optional[int] = None) -> None:
        """Evaluate prompt `ids` from an empty cache; with `image`, the run of `image_token_id` ids in `ids` is
        replaced by the image's embeddings (the run must be as long as llama.cpp's image: checked)."""
        self.llm.reset()
        ids = [int(i) for i in ids]
        if image is None:
            self.llm.eval(ids)
            return
        if self.mtmd is None:
            raise BonsaiError("an image needs the mmproj GGUF")
        pos = [i for i, t in enumerate(ids) if t == image_token_id]
        if not pos or pos != list(range(pos[0], pos[0] + len(pos))):
            raise BonsaiError("the prompt needs exactly one run of image tokens")
        before, after = ids[: pos[0]], ids[pos[-1] + 1 :]
        if before:
            self.llm.eval(before)
        n = self._eval_image(image)
        if n != len(pos):
            raise BonsaiError(f"llama.cpp encodes the image as {n} positions, the prompt has {len(pos)}")
        self.llm.eval(after)

    def greedy(self, ids: Sequence[int], max_tokens: int, image=None, image_token_id: Optional[int] = None,
               stop: Sequence[int] = (), suppress: Sequence[int] = ()) -> List[int]:
        """Greedy (argmax) continuation of `ids`, up to `max_tokens` or a `stop` id (included); `suppress`: ids never
        chosen (as transformers' `min_new_tokens` masks EOS)."""
        self.prefill(ids, image, image_token_id)
        out: List[int] = []
        for _ in range(max_tokens):
            logits = self.last_logits()
            logits[list(suppress)] = -np.inf
            tok = int(np.argmax(logits))
            out.append(tok)
            if tok in stop or len(out) == max_tokens:
                break
            self.llm.eval([tok])
        return out
