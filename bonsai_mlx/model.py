"""The student: a transformers `LlavaForConditionalGeneration` (SigLIP vision + projector + Qwen2) in MLX.

Forward semantics follow `transformers.models.llava.modeling_llava.LlavaModel`:
image features = projector(vision_tower.hidden_states[vision_feature_layer]) ("full": all patches; "default": drop
the first token), scattered in row-major order into the positions whose input id is `image_token_index`.

Parameter names are the published llava-hf ones (`vision_tower.vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*`), so checkpoints load and save without renaming.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import BonsaiError
from .language import build_language_model, lm_forward, normalize_text_config
from .projector import MultiModalProjector
from .vision import VisionConfig, VisionTower


@dataclass
class ModelConfig:
    text_config: dict
    vision_config: VisionConfig
    image_token_index: int = 32000
    vision_feature_layer: Union[int, List[int]] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_seq_length: int = 576
    quantization: Optional[dict] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)  # the config.json as read, for re-saving

    @classmethod
    def from_dict(cls, params: dict) -> "ModelConfig":
        if params.get("model_type") != "llava":
            raise BonsaiError(
                f"expected a llava checkpoint (config.json model_type 'llava'), got {params.get('model_type')!r}; "
                "build a student from SigLIP + Qwen2 backbones with `bonsai-mlx init`"
            )
        vision = dict(params.get("vision_config") or {})
        if vision.get("model_type") not in ("siglip_vision_model", "siglip"):
            raise BonsaiError(
                f"vision_config.model_type {vision.get('model_type')!r} is not supported: bonsai-mlx implements the "
                "SigLIP vision tower (siglip_vision_model)"
            )
        kw = {k: v for k, v in params.items() if k in inspect.signature(cls).parameters}
        if "image_token_index" not in params and "image_token_id" in params:
            kw["image_token_index"] = params["image_token_id"]
        kw["text_config"] = normalize_text_config(params.get("text_config") or {})
        kw["vision_config"] = VisionConfig.from_dict(vision)
        kw["raw"] = params
        return cls(**kw)

    def feature_layers(self) -> List[int]:
        layers = self.vision_feature_layer
        return [layers] if isinstance(layers, int) else list(layers)


class LlavaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(
            config.vision_config.hidden_size,
            config.text_config["hidden_size"],
            act=config.projector_hidden_act,
            bias=config.multimodal_projector_bias,
            num_feature_layers=len(config.feature_layers()),
        )
        self.language_model = build_language_model(config.text_config)

    # --- vision ---------------------------------------------------------------------------------------------------
    def _hidden_state_indices(self) -> List[int]:
        n = self.config.vision_config.num_hidden_layers + 1  # hidden_states has embeddings + one per layer
        out = []
        for layer in self.config.feature_layers():
            idx = layer + n if layer < 0 else layer
            if not 0 <= idx < n:
                raise ValueError(f"vision_feature_layer {layer} out of range for a {n - 1}-layer tower")
            out.append(idx)
        return out

    def get_image_features(self, pixel_values: mx.array) -> mx.array:
        """pixel_values [N, H, W, C] (or NCHW) → projected features [N, P, D_text]."""
        indices = self._hidden_state_indices()
        # Run only as many layers as the feature layer needs (-2 skips the last layer entirely).
        _, hidden_states = self.vision_tower(pixel_values, output_hidden_states=True, stop_at=max(indices))
        feats = [hidden_states[i] for i in indices]
        if self.config.vision_feature_select_strategy == "default":
            feats = [f[:, 1:] for f in feats]  # drops a CLS token (CLIP); kept for parity with transformers
        feats = feats[0] if len(feats) == 1 else mx.concatenate(feats, axis=-1)
        return self.multi_modal_projector(feats)

    # --- merge ----------------------------------------------------------------------------------------------------
    def get_input_embeddings(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        image_features: Optional[mx.array] = None,
        validate: bool = True,
    ) -> mx.array:
        """Token embeddings with image features scattered into the `<image>` positions.

        input_ids [B, T]; pixel_values [N, H, W, C] for the N images of the batch in row-major order of their
        placeholder runs (any number of runs per row, any number of images per batch), or their already projected
        `image_features` [N, P, D]. Returns [B, T, D].

        `validate=False` skips the token/feature count check, which needs a host sync (not allowed under
        `mx.compile`); the training data pipeline guarantees the counts instead.
        """
        embed = self.language_model.model.embed_tokens
        image_mask = input_ids == self.config.image_token_index  # [B, T]
        # The image id may lie beyond the embedding rows (e.g. LLaVA-1.5's 32000): look up a valid id instead.
        embeds = embed(mx.where(image_mask, 0, input_ids))  # [B, T, D]
        n_tokens = int(image_mask.sum().item()) if validate else None
        if pixel_values is None and image_features is None:
            if n_tokens:
                raise ValueError(f"input has {n_tokens} image tokens but no pixel_values were given")
            return embeds
        feats = self.get_image_features(pixel_values) if image_features is None else image_features  # [N, P, D]
        n_images = feats.shape[0]
        D = feats.shape[-1]
        feats = feats.reshape(-1, D).astype(embeds.dtype)  # [N*P, D]
        if validate and n_tokens != feats.shape[0]:
            raise ValueError(
                f"Image features and image tokens do not match: tokens {n_tokens}, features {feats.shape[0]} "
                f"({n_images} images x {feats.shape[0] // max(n_images, 1)} tokens)"
            )
        B, T = input_ids.shape
        flat_mask = image_mask.reshape(-1)  # [B*T]
        src = mx.maximum(mx.cumsum(flat_mask.astype(mx.int32)) - 1, 0)  # k-th image token takes feature row k
        merged = mx.where(flat_mask[:, None], feats[src], embeds.reshape(-1, D))
        return merged.reshape(B, T, D)

    # --- forward --------------------------------------------------------------------------------------------------
    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        cache: Optional[List[Any]] = None,
        output_hidden_states: bool = False,
        last_only: bool = False,
        input_embeddings: Optional[mx.array] = None,
    ):
        """Logits [B, T, V] (or [B, 1, V] with `last_only`); with `output_hidden_states` also the LM's hidden states.

        Right-padded batches need no mask: causal attention never lets a real position see the padding after it.
        """
        if input_embeddings is None:
            input_embeddings = self.get_input_embeddings(input_ids, pixel_values)
        logits, hidden_states = lm_forward(
            self.language_model,
            input_embeddings,
            cache=cache,
            output_hidden_states=output_hidden_states,
            last_only=last_only,
        )
        if output_hidden_states:
            return logits, hidden_states
        return logits

    @property
    def layers(self):
        # mlx-lm's cache helpers (make_prompt_cache) look for `model.layers`.
        return self.language_model.layers

    # --- weights --------------------------------------------------------------------------------------------------
    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map a llava checkpoint's keys (published or transformers-5 layout) to this module's parameter names."""
        vision, projector, language = {}, {}, {}
        for k, v in weights.items():
            if k.startswith("model.") and k.split(".")[1] in ("vision_tower", "language_model", "multi_modal_projector"):
                k = k[len("model.") :]  # transformers-5 in-memory names: model.language_model.* → language_model.*
                if k.startswith("language_model."):
                    k = "language_model.model." + k[len("language_model.") :]
            if k == "lm_head.weight":
                k = "language_model.lm_head.weight"
            if k.startswith("vision_tower."):
                vision[k[len("vision_tower.") :]] = v
            elif k.startswith("multi_modal_projector."):
                projector[k] = v
            elif k.startswith("language_model."):
                sub = k[len("language_model.") :]
                if not sub.startswith(("model.", "lm_head.")):
                    sub = "model." + sub
                language[sub] = v
            # anything else (e.g. a SigLIP text tower) is not part of the student
        out = {f"vision_tower.{k}": v for k, v in VisionTower.sanitize(vision).items()}
        out.update(projector)
        out.update({f"language_model.{k}": v for k, v in self.language_model.sanitize(language).items()})
        return out

    def hf_weights(self) -> Dict[str, mx.array]:
        """This model's weights in the published llava-hf layout (PyTorch conv layout), the inverse of `sanitize`."""
        params = dict(tree_flatten(self.parameters()))
        out = {}
        vision = {k[len("vision_tower.") :]: v for k, v in params.items() if k.startswith("vision_tower.")}
        out.update({f"vision_tower.{k}": v for k, v in VisionTower.to_hf(vision).items()})
        for k, v in params.items():
            if not k.startswith(("vision_tower.", "align.")):  # align: HSD's training-only projectors
                out[k] = v
        if getattr(self.language_model.args, "tie_word_embeddings", False):
            out.pop("language_model.lm_head.weight", None)
        return out


# --- quantization ---------------------------------------------------------------------------------------------------
def quantize_language_model(model: LlavaModel, bits: int = 4, group_size: int = 64) -> dict:
    """Quantize the LM's Linear and Embedding layers in place with MLX's affine quantization (as mlx-lm's
    `quantize_model` does); the vision tower and projector stay in full precision. Returns the config entry.
    The new layers are MLX's own: `cpu.accelerate(model)` gives them the CPU kernels (`io.load_model(quantize=…)`
    does both)."""
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"unsupported bits {bits}")

    def predicate(path, module):
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    nn.quantize(model.language_model, group_size=group_size, bits=bits, class_predicate=predicate)
    q = {"group_size": group_size, "bits": bits, "mode": "affine"}
    model.config.quantization = q
    return q


def config_to_dict(config: ModelConfig) -> dict:
    """config.json for a llava student as transformers writes it, with `rope_theta` at the text_config's top level
    (mlx-lm, vLLM and transformers 4 read it there) and bonsai's `quantization` entry when quantized."""
    out = dict(config.raw)
    text = dict(out.get("text_config") or {})
    text["rope_theta"] = config.text_config["rope_theta"]
    out["text_config"] = text
    out["model_type"] = "llava"
    out["image_token_index"] = config.image_token_index
    out["vision_feature_layer"] = config.vision_feature_layer
    out["vision_feature_select_strategy"] = config.vision_feature_select_strategy
    out["image_seq_length"] = config.image_seq_length
    out.setdefault("architectures", ["LlavaForConditionalGeneration"])
    if config.quantization:
        out["quantization"] = dict(config.quantization)
    else:
        out.pop("quantization", None)
    return out
