"""The "pico" student: a tiny random Bonsai-LLaVA built entirely offline.

Same architecture and on-disk layout as the real student (SigLIP vision config, Qwen2 text config, llava config.json,
published key layout), scaled down, with a byte-level BPE tokenizer trained on the fly in Qwen2's real format
(Qwen's pre-tokenizer regex, ChatML special tokens, `<image>`, our chat template). Used by the README's smoke command,
the demo and the tests; the loading code it exercises is the code that loads the real checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

from .prompting import CHAT_TEMPLATE, IMAGE_TOKEN

# Qwen2's tokenizer.json pre-tokenizer pattern (Qwen/Qwen2.5-0.5B-Instruct).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

DEFAULT_CORPUS = [
    "A chat between a curious user and a helpful assistant.",
    "What colour is the shape? The shape is red. The square is blue. The circle is green. The triangle is yellow.",
    "How many shapes are there? There are two shapes. There is one circle and three squares.",
    "Is the circle left of the square? Yes. No. The triangle is above the circle, and the square is on the right.",
    "Describe the image. A small purple star on a white background, next to an orange rectangle.",
    "You are a helpful assistant. Answer the question about the picture in one word.",
]


def train_tokenizer(corpus: Optional[Iterable[str]] = None, vocab_size: int = 400, image_token: bool = True):
    """A byte-level BPE tokenizer in Qwen2's format with its special tokens, `<image>` and our chat template
    (`image_token=False`: as the Qwen2.5 release ships it, without `<image>`).

    Returns a transformers `PreTrainedTokenizerFast` (eos `<|im_end|>`, pad `<|endoftext|>`, no BOS, as Qwen2.5-Instruct).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or DEFAULT_CORPUS), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    if image_token:
        add_image_token(fast)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def add_image_token(tokenizer) -> int:
    """Add `<image>` as a special token (if absent) and return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def pico_configs(vocab_size: int, image_token_index: int, image_size: int = 32, patch_size: int = 8,
                 vision: Optional[dict] = None, text: Optional[dict] = None) -> dict:
    """A llava config.json (as a dict) for a tiny SigLIP + Qwen2 student; `vision`/`text` override config keys."""
    vision_over, text_over = vision or {}, text or {}
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_channels": 3,
        "image_size": image_size,
        "patch_size": patch_size,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh",
        "vision_use_head": False,
        **vision_over,
    }
    text = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        **text_over,
    }
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": vision,
        "text_config": text,
        "image_token_index": image_token_index,
        "image_seq_length": (image_size // patch_size) ** 2,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": True,
    }


def hf_init(model, std: float = 0.02) -> None:
    """transformers' `_init_weights` scheme for Qwen2/Llava: every linear, embedding and conv weight ~ normal(0, std),
    biases 0, norms 1.

    The pico student uses std 0.1 (≈ 1/sqrt(width 64)), not transformers' `initializer_range` 0.02, which is sized for
    widths of ~1k: at width 64 it gives every linear a gain of ~0.16 and the tiny LM barely learns (measured: a
    copy-from-the-prompt task stayed at the answer prior for 300 steps at 0.02 and was solved in 50 at 0.1)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    new = []
    for k, v in tree_flatten(model.parameters()):
        if "norm" in k.rsplit(".", 2)[-2] or k.endswith(("layer_norm1.weight", "layer_norm2.weight")):
            new.append((k, mx.ones_like(v) if k.endswith("weight") else mx.zeros_like(v)))
        elif k.endswith("bias"):
            new.append((k, mx.zeros_like(v)))
        else:
            new.append((k, std * mx.random.normal(v.shape).astype(v.dtype)))
    model.update(tree_unflatten(new))


def build_pico(out: Union[str, Path], seed: int = 0, corpus: Optional[Iterable[str]] = None, image_size: int = 32,
               patch_size: int = 8, vision: Optional[dict] = None, text: Optional[dict] = None,
               vocab_size: int = 400, init_std: float = 0.1) -> Path:
    """Write a random pico student directory (weights, config, tokenizer, processor files) to `out`."""
    import mlx.core as mx

    from .assemble import write_processor_files
    from .atomic import atomic_dir
    from .io import write_model_files
    from .model import LlavaModel, ModelConfig
    from .processing import ImageProcessor

    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size)
    vocab = -(-len(tokenizer) // 64) * 64  # room above the tokenizer, like Qwen's 151936 rows for 151665 tokens
    config = pico_configs(vocab, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_size, patch_size, vision, text)
    mx.random.seed(seed)
    model = LlavaModel(ModelConfig.from_dict(config))
    hf_init(model, std=init_std)
    with atomic_dir(out) as tmp:
        write_model_files(model, tmp)
        write_processor_files(tmp, tokenizer, ImageProcessor(size=config["vision_config"]["image_size"]), model.config)
    return Path(out)
