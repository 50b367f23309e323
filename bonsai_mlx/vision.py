"""SigLIP vision tower in MLX.

Matches `transformers.models.siglip.modeling_siglip.SiglipVisionModel` (and the `vision_model` of
`google/siglip-base-patch16-224`): conv patch embedding without CLS token, learned absolute position embeddings,
pre-LN encoder layers with tanh-GELU MLPs, and a final `post_layernorm`. The attention-pooling `head` is not used
by LLaVA (features are taken from `hidden_states[vision_feature_layer]`), so it is dropped on load.

Module names follow transformers so checkpoints load without renaming.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .errors import BonsaiError


@dataclass
class VisionConfig:
    model_type: str = "siglip_vision_model"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, params: dict) -> "VisionConfig":
        # Ignore unknown keys (transformers configs carry many), as mlx-lm's BaseModelArgs does.
        return cls(**{k: v for k, v in params.items() if k in inspect.signature(cls).parameters})

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


_ACTIVATIONS = {
    # transformers ACT2FN names → MLX. SigLIP uses the tanh approximation ("gelu_pytorch_tanh"); on the CPU,
    # `accelerate()` runs it on a faster rational tanh (cpu/layers.py: CPUVisionMLP).
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_new": nn.gelu_approx,
    "gelu_fast": nn.gelu_approx,
    "gelu": nn.gelu,
    "quick_gelu": nn.gelu_fast_approx,
}


def activation(name: str, field: str = "activation"):
    """The MLX function for a transformers ACT2FN name; a config.json naming another is one line naming `field`."""
    try:
        return _ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise BonsaiError(f"config.json {field} {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}") \
            from None


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (dim // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=True)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape  # [B, L, D]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)  # [B, H, L, Dh]
        k = k.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        out = self.attend(q, k, v)  # [B, H, L, Dh]
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))

    def attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        # bidirectional, no mask (on the CPU, `accelerate()` swaps in a faster softmax: cpu/layers.py)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = activation(config.hidden_act, "vision_config.hidden_act")
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        # pixel_values: [B, H, W, C] (MLX convs are channels-last)
        x = self.patch_embedding(pixel_values)  # [B, H/p, W/p, D]
        B, h, w, D = x.shape
        x = x.reshape(B, h * w, D)  # row-major patches, as torch's flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None, : h * w]


class VisionModel(nn.Module):
    """The `vision_model` of a SigLIP checkpoint (embeddings, encoder, post_layernorm)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(
        self, pixel_values: mx.array, output_hidden_states: bool = True, stop_at: Optional[int] = None
    ) -> Tuple[mx.array, List[mx.array]]:
        """Run the tower.

        Args:
            pixel_values: [B, H, W, C] (channels-last) or [B, C, H, W] (channels-first, as transformers gives).
            stop_at: if set, run only the first `stop_at` layers (the LLaVA feature layer needs no more);
                the post-layernorm output is then not computed and returned as None.

        Returns:
            (post_layernorm output [B, L, D] or None, hidden_states) where hidden_states[0] is the embedding output
            and hidden_states[i] the output of layer i, as transformers' `output_hidden_states=True`.
        """
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be 4-D, got shape {pixel_values.shape}")
        if pixel_values.shape[1] == self.config.num_channels and pixel_values.shape[-1] != self.config.num_channels:
            pixel_values = pixel_values.transpose(0, 2, 3, 1)  # NCHW → NHWC
        x = self.embeddings(pixel_values)
        hidden_states = [x] if output_hidden_states else []
        layers = self.encoder.layers if stop_at is None else self.encoder.layers[:stop_at]
        for layer in layers:
            x = layer(x)
            if output_hidden_states:
                hidden_states.append(x)
        pooled = self.post_layernorm(x) if stop_at is None else None
        return pooled, hidden_states


class VisionTower(nn.Module):
    """Holds the SigLIP `vision_model` so parameters are named `vision_tower.vision_model.*` (published layout)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionModel(config)

    def __call__(self, pixel_values: mx.array, output_hidden_states: bool = True, stop_at: Optional[int] = None):
        return self.vision_model(pixel_values, output_hidden_states=output_hidden_states, stop_at=stop_at)

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """Map SigLIP weights (keys relative to the tower, any published layout) to this module's names.

        Accepts `vision_model.*` (published llava-hf / SigLIP layout) and the bare transformers-5 layout
        (`embeddings.*`, `encoder.*`, `post_layernorm.*`). Drops the attention-pooling `head` (unused by LLaVA)
        and converts the patch-embedding conv from PyTorch OIHW to MLX OHWI.
        """
        out = {}
        for k, v in weights.items():
            if not k.startswith("vision_model."):
                k = "vision_model." + k
            if k.startswith("vision_model.head."):
                continue
            if k.endswith("embeddings.position_ids"):
                continue
            if k == "vision_model.embeddings.patch_embedding.weight":
                # On disk weights are always in the PyTorch layout (we also save that way): [O, I, kh, kw] → [O, kh, kw, I].
                v = v.transpose(0, 2, 3, 1)
            out[k] = v
        return out

    @staticmethod
    def to_hf(weights: dict) -> dict:
        """Inverse of `sanitize`: MLX OHWI conv → PyTorch OIHW; keys stay `vision_model.*`."""
        out = {}
        for k, v in weights.items():
            if k == "vision_model.embeddings.patch_embedding.weight":
                v = v.transpose(0, 3, 1, 2)
            out[k] = v
        return out
