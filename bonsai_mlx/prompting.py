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
# Bumped whenever the student's or the teacher's prompt format changes: a teacher cache records it and the HSD
# trainer refuses a cache built with another version (its token positions would not match).
PROMPT_TEMPLATE_VERSION = "student-chatml-1+teacher-vicuna_v1-1"

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


def build_chat_prompt(tokenizer, messages: List[dict], image_seq_length: int, system: Optional[str] = None) -> List[int]:
    """Token ids of chat `messages` (transformers / OpenAI style: content a string, or a list of {"type": "image"} and
    {"type": "text", "text": ...} parts) rendered by the tokenizer's chat template and ending with the assistant
    header; each image becomes `image_seq_length` `<image>` tokens. The one prompt builder of every caller."""
    messages = ([] if system is None else [{"role": "system", "content": system}]) + list(messages)
    text = expand_image_tokens(render_chat(tokenizer, messages), image_seq_length)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_generation_prompt(
    tokenizer, prompt: str, image_seq_length: int, with_image: bool = True, system: Optional[str] = None
) -> List[int]:
    """Token ids of a one-turn prompt ending with the assistant header."""
    return build_chat_prompt(tokenizer, [user_message(prompt, with_image=with_image)], image_seq_length, system)


def turns_to_messages(turns) -> List[dict]:
    """`parse_turns` output ([(role, text)], the image as a leading "<image>\n") → chat messages."""
    out = []
    for role, text in turns:
        if text.startswith(IMAGE_TOKEN + "\n"):
            out.append(user_message(text[len(IMAGE_TOKEN) + 1:], with_image=True))
        else:
            out.append({"role": role, "content": text})
    return out


# --- LLaVA-Instruct records → supervised examples ---------------------------------------------------------------

ROLES = {"human": "user", "gpt": "assistant"}  # LLaVA-Instruct's speaker names → chat roles
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class RecordError(ValueError):
    """A record that cannot become a training example. `reason` is a short code used for counting skips."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_turns(record) -> tuple:
    """Validate a LLaVA-Instruct record; return ([(role, text), ...], image or None).

    The `<image>` placeholder must appear exactly once, in the first human turn, when the record has an image, and
    never otherwise; it is moved to the start of that turn followed by a newline, as LLaVA's preprocessing does
    (`value.replace("<image>", "").strip()` then `"<image>\\n" + value`).
    """
    if not isinstance(record, dict):
        raise RecordError("not_a_record", "record is not a JSON object")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise RecordError("no_conversations", "record has no `conversations` list")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise RecordError("non_string_value", "`image` is not a string")
    turns = []
    for i, t in enumerate(convs):
        if not isinstance(t, dict):
            raise RecordError("not_a_record", f"turn {i} is not an object")
        role = ROLES.get(t.get("from"))
        if role is None:
            raise RecordError("unknown_role", f"turn {i} has unknown role {t.get('from')!r} (expected human/gpt)")
        if not isinstance(t.get("value"), str):
            raise RecordError("non_string_value", f"turn {i} value is not a string")
        turns.append((role, t["value"]))
    if not any(r == "assistant" for r, _ in turns):
        raise RecordError("no_assistant_turn", "record has no gpt turn")
    for i, (role, _) in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise RecordError("bad_turn_order", f"turn {i} is {role}: turns must alternate human, gpt, human, …")
    n_img = sum(v.count(IMAGE_TOKEN) for _, v in turns)
    if image is None:
        if n_img:
            raise RecordError("image_token_without_image", "text-only record contains <image>")
        return turns, None
    if n_img > 1:
        raise RecordError("image_token_repeated", f"<image> appears {n_img} times")
    if n_img == 0 or IMAGE_TOKEN not in turns[0][1]:
        raise RecordError("image_token_missing", "no <image> in the first human turn")
    turns[0] = ("user", IMAGE_TOKEN + "\n" + turns[0][1].replace(IMAGE_TOKEN, "").strip())
    return turns, image


def chat_text(turns, system: Optional[str] = None, image_seq_length: int = 1) -> tuple:
    """ChatML text for the turns (exactly what CHAT_TEMPLATE renders, with `<image>` expanded), and the character
    span [start, end) of each assistant turn's content."""
    parts = [f"{IM_START}system\n{system or DEFAULT_SYSTEM_PROMPT}{IM_END}\n"]
    pos = len(parts[0])
    spans = []
    for role, content in turns:
        if role == "user":
            content = expand_image_tokens(content, image_seq_length)
        head = f"{IM_START}{role}\n"
        if role == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(content)))
        piece = f"{head}{content}{IM_END}\n"
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), spans


class Example:
    """One tokenized training example (plain Python lists; framework-free)."""

    __slots__ = ("input_ids", "labels_mask", "offsets", "text", "spans", "image", "num_image_tokens", "truncated")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


def encode_example(tokenizer, record, image_seq_length: int, max_seq_len: Optional[int] = None,
                   system: Optional[str] = None, image_token_id: Optional[int] = None) -> Example:
    """Record → token ids, assistant-only label mask, char offsets and assistant spans.

    Supervised: every token that overlaps an assistant turn's content or its closing `<|im_end|>` (not the newline
    after it, not the `<|im_start|>assistant\\n` header). Truncation to `max_seq_len` keeps the head of the sequence;
    a record whose image tokens would be cut is refused (`image_does_not_fit`), as is one left with nothing to learn.
    """
    turns, image = parse_turns(record)
    text, spans = chat_text(turns, system, image_seq_length)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    sup = [(s, e + len(IM_END)) for s, e in spans]
    mask = [any(a < e and b > s for s, e in sup) for a, b in offsets]
    n_img = 0
    if image is not None:
        img_id = image_token_id if image_token_id is not None else tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        img_pos = [i for i, t in enumerate(ids) if t == img_id]
        n_img = len(img_pos)
        if n_img != image_seq_length:
            raise ValueError(f"<image> tokenized into {n_img} image ids, expected {image_seq_length}: the tokenizer "
                             "needs <image> as a special token (bonsai-mlx init adds it)")
    truncated = False
    if max_seq_len is not None and len(ids) > max_seq_len:
        if n_img and img_pos[-1] >= max_seq_len:
            raise RecordError("image_does_not_fit", f"image tokens end at {img_pos[-1] + 1} > --max-seq-len {max_seq_len}")
        ids, offsets, mask = ids[:max_seq_len], offsets[:max_seq_len], mask[:max_seq_len]
        truncated = True
    if not any(mask[1:]):  # position 0 is never a target
        raise RecordError("no_supervised_tokens", "no assistant token left after truncation")
    return Example(input_ids=ids, labels_mask=mask, offsets=offsets, text=text, spans=spans, image=image,
                   num_image_tokens=n_img, truncated=truncated)
