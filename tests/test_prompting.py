"""Prompt building and assistant-only label masks (framework-free module)."""

import pytest

from bonsai_mlx.prompting import (
    IMAGE_TOKEN,
    RecordError,
    chat_text,
    encode_example,
    parse_turns,
    render_chat,
)


def rec(*turns, image="x.png"):
    return {"id": "r", **({"image": image} if image else {}),
            "conversations": [{"from": f, "value": v} for f, v in turns]}


def supervised_text(tok, ex):
    return tok.decode([t for t, m in zip(ex.input_ids, ex.labels_mask, strict=True) if m])


def test_three_turn_record_supervises_exactly_the_answers(tokenizer):
    r = rec(("human", "Describe <image> please"), ("gpt", "A red square."), ("human", "And the size?"),
            ("gpt", "Small."), ("human", "Sure?"), ("gpt", "Yes."))
    ex = encode_example(tokenizer, r, image_seq_length=4)
    assert supervised_text(tokenizer, ex) == "A red square.<|im_end|>Small.<|im_end|>Yes.<|im_end|>"
    # <image> moved to the start of the first turn with a newline, expanded to 4 ids
    assert "<|im_start|>user\n" + IMAGE_TOKEN * 4 + "\nDescribe  please<|im_end|>" in ex.text
    assert ex.input_ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == 4
    # spans point at the answers in the text
    assert [ex.text[s:e] for s, e in ex.spans] == ["A red square.", "Small.", "Yes."]


def test_text_only_record(tokenizer):
    r = rec(("human", "Hello?"), ("gpt", "Hi there."), image=None)
    ex = encode_example(tokenizer, r, image_seq_length=4)
    assert ex.num_image_tokens == 0 and ex.image is None
    assert supervised_text(tokenizer, ex) == "Hi there.<|im_end|>"


def test_unicode_and_newlines_in_answers(tokenizer):
    answer = "Ligne 1\n\nzweite Zeile — 猫 🐱\n  indented"
    ex = encode_example(tokenizer, rec(("human", "<image>\nWhat?"), ("gpt", answer)), image_seq_length=2)
    assert supervised_text(tokenizer, ex) == answer + "<|im_end|>"
    # the supervised tokens are exactly those inside the answer span (+ <|im_end|>)
    s, e = ex.spans[0]
    for (a, b), m in zip(ex.offsets, ex.labels_mask, strict=True):
        assert m == (a < e + len("<|im_end|>") and b > s)


def test_text_matches_the_chat_template(tokenizer):
    r = rec(("human", "Q1 <image>"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2"))
    turns, _ = parse_turns(r)
    text, _ = chat_text(turns, image_seq_length=1)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]
    assert render_chat(tokenizer, msgs, add_generation_prompt=False) == text
    assert chat_text(turns, system="Be brief.")[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_truncation_keeps_image_and_refuses_when_it_cannot(tokenizer):
    r = rec(("human", "<image>\nQ"), ("gpt", "word " * 40), ("human", "Q2"), ("gpt", "last"))
    full = encode_example(tokenizer, r, image_seq_length=8)
    img_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    img_end = max(i for i, t in enumerate(full.input_ids) if t == img_id) + 1
    first_sup = full.labels_mask.index(True)
    n = first_sup + 5
    cut = encode_example(tokenizer, r, image_seq_length=8, max_seq_len=n)
    assert len(cut.input_ids) == n and cut.truncated and len(full.input_ids) > n
    assert cut.input_ids == full.input_ids[:n] and cut.labels_mask == full.labels_mask[:n]
    assert cut.num_image_tokens == 8
    with pytest.raises(RecordError) as e:
        encode_example(tokenizer, r, image_seq_length=8, max_seq_len=img_end - 1)
    assert e.value.reason == "image_does_not_fit"
    with pytest.raises(RecordError) as e:  # the image fits, but no answer token does
        encode_example(tokenizer, r, image_seq_length=8, max_seq_len=first_sup)
    assert e.value.reason == "no_supervised_tokens"


@pytest.mark.parametrize(
    "record,reason",
    [
        (rec(("human", "<image> hi")), "no_assistant_turn"),
        (rec(("human", "hi"), ("gpt", "yo")), "image_token_missing"),
        (rec(("human", "<image> hi <image>"), ("gpt", "yo")), "image_token_repeated"),
        (rec(("human", "hi"), ("gpt", "yo"), ("human", "<image>"), ("gpt", "x")), "image_token_missing"),
        (rec(("human", "<image>"), ("gpt", 3)), "non_string_value"),
        (rec(("human", "<image>"), ("robot", "yo")), "unknown_role"),
        (rec(("human", "<image> hi"), ("gpt", "yo"), image=None), "image_token_without_image"),
        (rec(("gpt", "yo"), ("human", "<image> hi")), "bad_turn_order"),
    ],
)
def test_bad_records_have_reasons(record, reason):
    with pytest.raises(RecordError) as e:
        parse_turns(record)
    assert e.value.reason == reason
