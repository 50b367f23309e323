"""Prompt construction shared by inference, training and the teacher tool. Framework-free: imports neither mlx nor
torch (the PyTorch teacher tool imports this module).

The student speaks Qwen's ChatML. An image is the `<image>` placeholder at the start of the first user turn followed
by a newline (LLaVA's own preprocessing moves it there), expanded to the model's image-token count before
tokenization, as transformers' `LlavaProcessor` does.
"""

from __future__ import annotations

from typing import List, Optional

IMAGE_TOKEN = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# A ChatML template that takes both plain-string content and the transformers multimodal message format
# ([{"type": "image"}, {"type": "text", "text": ...}]); images render as "<image>\n" before the turn's text.
# The same template is written into every student directory (tokenizer and processor), so the prompt
# `bonsai-mlx` builds and the one `processor.apply_chat_template` renders never drift apart.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def user_message(prompt: str, with_image: bool = True) -> dict:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return {"role": "user", "content": content}


def render_chat(tokenizer, messages: List[dict], add_generation_prompt: bool = True) -> str:
    """The chat text (with a single `<image>` per image) from the tokenizer's chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def expand_image_tokens(text: str, image_seq_length: int) -> str:
    """Replace each `<image>` by `image_seq_length` copies, as `LlavaProcessor` does."""
    return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_seq_length)


def build_generation_prompt(
    tokenizer, prompt: str, image_seq_length: int, with_image: bool = True, system: Optional[str] = None
) -> List[int]:
    """Token ids of a one-turn prompt ending with the assistant header."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append(user_message(prompt, with_image=with_image))
    text = expand_image_tokens(render_chat(tokenizer, messages), image_seq_length)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
