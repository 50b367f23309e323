"""The LLaVA multimodal projector: `linear_1` → GELU → `linear_2`.

Matches `transformers.models.llava.modeling_llava.LlavaMultiModalProjector` (names included), with
`projector_hidden_act: "gelu"` (the exact erf GELU, as `ACT2FN["gelu"]`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .vision import activation


class MultiModalProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, act: str = "gelu", bias: bool = True, num_feature_layers: int = 1):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim * num_feature_layers, text_dim, bias=bias)
        self.act = activation(act, "projector_hidden_act")
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        # x: [N, P, Dv] → [N, P, Dt]
        return self.linear_2(self.act(self.linear_1(x)))
