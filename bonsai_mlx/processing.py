"""Image preprocessing identical to transformers' `SiglipImageProcessor` (PIL backend), framework-free.

convert to RGB (transparency composited on white, as `transformers.image_transforms.convert_to_rgb`) → resize to
(size, size) with PIL bicubic, no crop → rescale 1/255 → normalize with mean/std 0.5. Additions transformers lacks:
EXIF orientation is applied, and 16-bit images are scaled to 8 bits rather than clipped.

Returns channels-last float32 arrays ([N, H, W, 3]), the layout MLX convs take; `channels_first=True` gives
transformers' [N, 3, H, W].
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BonsaiError
from .prompting import build_chat_prompt, user_message

if TYPE_CHECKING:
    from .model import LlavaModel

_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


def load_image(source: Union[str, Path, Image.Image], timeout: float = 20.0) -> Image.Image:
    """Open an image from a path or http(s) URL, fully decoded (a truncated file fails here, not later)."""
    if isinstance(source, Image.Image):
        return source
    src = str(source)
    try:
        if src.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(src, timeout=timeout) as r:
                img = Image.open(io.BytesIO(r.read()))
        else:
            img = Image.open(src)
        img.load()
    except FileNotFoundError:
        raise BonsaiError(f"image {src}: no such file") from None
    except UnidentifiedImageError:
        raise BonsaiError(f"image {src}: not an image file Pillow can read") from None
    except OSError as e:  # truncated / corrupt data
        raise BonsaiError(f"image {src}: cannot decode ({e})") from None
    except Exception as e:  # URL errors and the like
        raise BonsaiError(f"image {src}: cannot open ({type(e).__name__}: {e})") from None
    return img


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit int/float) single-channel images → 8-bit "L", scaling the value range instead of clipping."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr.astype(np.float64) / 65535.0 * 255.0
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr.astype(np.float64) * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))  # 2-D uint8 → "L"


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb` (alpha composited on white; P, L, LA, CMYK via Pillow), after EXIF
    orientation and 16-bit → 8-bit scaling."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _sixteen_to_eight(img)
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


@dataclass
class ImageProcessor:
    """The fields of a `SiglipImageProcessor` preprocessor_config.json that matter (unknown keys are ignored)."""

    size: int = 224
    resample: int = 3  # bicubic
    rescale_factor: float = 1 / 255
    image_mean: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, d: dict, default_size: int = 224) -> "ImageProcessor":
        size = d.get("size", default_size)
        if isinstance(size, dict):
            h, w = size.get("height", default_size), size.get("width", default_size)
            if h != w:
                raise BonsaiError(f"non-square processor size {size} is not supported")
            size = h
        kw = {k: d[k] for k in ("resample", "rescale_factor", "image_mean", "image_std", "do_resize", "do_rescale",
                                 "do_normalize") if k in d}
        return cls(size=int(size), **kw)

    @classmethod
    def from_pretrained(cls, model_dir: Union[str, Path], default_size: int = 224) -> "ImageProcessor":
        f = Path(model_dir) / "preprocessor_config.json"
        if not f.exists():
            return cls(size=default_size)
        return cls.from_dict(json.loads(f.read_text()), default_size=default_size)

    def to_dict(self) -> dict:
        """A preprocessor_config.json transformers' AutoImageProcessor / LlavaProcessor read as SiglipImageProcessor."""
        return {
            "image_processor_type": "SiglipImageProcessor",
            "processor_class": "LlavaProcessor",
            "do_convert_rgb": True,
            "do_resize": self.do_resize,
            "size": {"height": self.size, "width": self.size},
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    def resized(self, image: Union[str, Path, Image.Image]) -> Image.Image:
        """The RGB picture the tower sees, before rescaling (what the GGUF runner hands llama.cpp, so that its own
        pad-to-square and resampler never run)."""
        img = to_rgb(load_image(image))
        if self.do_resize:
            img = img.resize((self.size, self.size), resample=_RESAMPLE.get(self.resample, Image.BICUBIC))
        return img

    def preprocess_one(self, image: Union[str, Path, Image.Image]) -> np.ndarray:
        x = np.asarray(self.resized(image))
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)  # as transformers' rescale
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            x = (x - mean) / std
        return x  # [H, W, 3]

    def __call__(self, images: Union[Sequence, str, Path, Image.Image], channels_first: bool = False) -> np.ndarray:
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        x = np.stack([self.preprocess_one(im) for im in images]).astype(np.float32)  # [N, H, W, 3]
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if channels_first else x


@dataclass
class Processor:
    """Tokenizer (mlx-lm's TokenizerWrapper around the transformers tokenizer) + image preprocessing + the
    model's image-token count: everything needed to turn (prompt, image) into model inputs."""

    tokenizer: object  # mlx_lm.tokenizer_utils.TokenizerWrapper
    image_processor: ImageProcessor
    image_seq_length: int
    context_length: int

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], model: "LlavaModel") -> "Processor":
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        path = Path(path)
        eos = set()
        gen_cfg = path / "generation_config.json"
        if gen_cfg.exists():
            e = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos.update(e if isinstance(e, list) else [e] if e is not None else [])
        try:
            tok = load_tokenizer(path, eos_token_ids=sorted(eos) or None)
        except (OSError, ValueError) as e:
            raise BonsaiError(f"cannot load the tokenizer in {path}: {e}") from None
        for t in ("<|im_end|>",):  # Qwen chat turns end here even when the config only names <|endoftext|>
            tid = tok._tokenizer.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != tok._tokenizer.unk_token_id:
                tok.add_eos_token(tid)
        cfg = model.config
        return cls(
            tokenizer=tok,
            image_processor=ImageProcessor.from_pretrained(path, default_size=cfg.vision_config.image_size),
            image_seq_length=cfg.image_seq_length,
            context_length=int(cfg.text_config.get("max_position_embeddings") or 32768),
        )

    def prompt_ids(self, prompt: str, with_image: bool, system: Optional[str] = None) -> List[int]:
        """A one-turn prompt (the question, after the image when there is one)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise BonsaiError("the prompt is empty")
        return self.chat_ids([user_message(prompt, with_image=with_image)], system)

    def chat_ids(self, messages: List[dict], system: Optional[str] = None) -> List[int]:
        """Chat messages → prompt ids ending with the assistant header (`prompting.build_chat_prompt`)."""
        return build_chat_prompt(self.tokenizer._tokenizer, messages, self.image_seq_length, system)
