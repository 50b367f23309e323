"""Data preparation at scale (train/prepare.py): the batched, array-masked, compactly stored samples equal
`encode_example` record for record, skip counts included; the prepared-data cache is used only for the same key."""

import json

import numpy as np
import pytest
from PIL import Image

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.prompting import RecordError, encode_example
from bonsai_mlx.train import prepare
from bonsai_mlx.train.data import SFTDataset, _check_image, iter_records, read_records


def rec(i, *turns, image="ok.png"):
    return {"id": f"r{i}", **({"image": image} if image else {}),
            "conversations": [{"from": f, "value": v} for f, v in turns]}


def mixed_records():
    """Every shape of record the 665k mix has, and every kind of bad one."""
    h, g = "human", "gpt"
    good = [
        rec(0, (h, "Describe <image> please"), (g, "A red square."), (h, "And?"), (g, "Small."), (h, "Sure?"),
            (g, "Yes.")),
        rec(1, (h, "What is in the picture?\n<image>"), (g, "Ligne 1\n\nzweite Zeile — 猫 🐱 cafe\u0301\n  indented")),
        rec(2, (h, "<image>\nfirst"), (g, "  leading spaces and trailing  ")),
        rec(3, (h, "Hello?"), (g, "Hi there."), image=None),
        rec(4, (h, "A long question " * 30), (g, "answer " * 40), image=None),
        rec(5, (h, "<image>Q " * 1), (g, "answer " * 60)),
        rec(6, (h, "Q"), (g, "A"), (h, "Q2"), (g, "A2"), image=None),
        rec(7, (h, "<image>"), (g, "missing picture")),  # the image file does not exist
        rec(8, (h, "<image>"), (g, "garbage picture")),
    ]
    good[7]["image"], good[8]["image"] = "nope.png", "garbage.png"
    bad = [
        "not a record",
        {"id": "nc"},
        rec(9, (h, 3), (g, "a")),
        rec(10, ("bot", "x"), (g, "a")),
        rec(11, (h, "<image> q")),
        rec(12, (g, "a"), (h, "<image>q")),
        rec(13, (h, "<image> q"), (g, "a"), image=None),
        rec(14, (h, "<image><image> q"), (g, "a")),
        rec(15, (h, "q"), (g, "a")),
        {"id": "ni", "image": 5, "conversations": [{"from": h, "value": "<image>"}, {"from": g, "value": "x"}]},
    ]
    out = []
    for k in range(max(len(good), len(bad))):  # interleaved, so bad records sit between good ones
        out += good[k : k + 1] + bad[k : k + 1]
    return out * 3


def reference(records, tok, root, n_img, max_len, system=None):
    """The data set as the per-record code built it before: encode_example, then the image check, in file order."""
    from collections import Counter

    samples, skipped = [], Counter()
    for i, r in enumerate(records):
        try:
            ex = encode_example(tok, r, n_img, max_len, system)
            if ex.image is not None:
                _check_image(root / ex.image)
        except RecordError as e:
            skipped[e.reason] += 1
            continue
        samples.append((i, ex.input_ids, ex.labels_mask, None if ex.image is None else root / ex.image))
    return samples, skipped


@pytest.fixture()
def images(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_text("not an image")
    return tmp_path


@pytest.mark.parametrize("n_img,max_len", [(8, None), (8, 60), (8, 40), (32, 45)])
def test_prepared_samples_equal_encode_example_record_for_record(tokenizer, images, monkeypatch, n_img, max_len):
    records = mixed_records()
    monkeypatch.setattr(prepare, "CHUNK", 7)  # many chunk boundaries, inside runs of good and bad records
    want, want_skips = reference(records, tokenizer, images, n_img, max_len)
    ds = SFTDataset(records, tokenizer, images, n_img, max_len)
    assert len(ds) == len(want) > 0
    for s, (i, ids, mask, path) in zip(ds.samples, want, strict=True):
        assert s.index == i and s.record_id == (records[i].get("id", str(i)))
        assert s.input_ids.dtype == np.int32 and s.input_ids.tolist() == ids
        assert s.labels_mask.dtype == bool and s.labels_mask.tolist() == mask
        assert s.image_path == path
    assert dict(ds.skipped) == dict(want_skips)
    if n_img == 8:
        assert want_skips["missing_image"] == want_skips["corrupt_image"] == 3
    if max_len == 40:  # truncation leaves some records nothing to learn
        assert want_skips["no_supervised_tokens"] > 0
    if max_len == 45:  # 32 image tokens end past 45
        assert want_skips["image_does_not_fit"] > 0
    # encode_many (the teacher build's student side) is encode_example itself, errors included
    got = prepare.encode_many(tokenizer, records, n_img, max_len)
    for r, g in zip(records, got, strict=True):
        try:
            ex = encode_example(tokenizer, r, n_img, max_len)
        except RecordError as e:
            assert isinstance(g, RecordError) and (g.reason, str(g)) == (e.reason, str(e))
            continue
        assert all(getattr(g, k) == getattr(ex, k) for k in ex.__slots__), r


def test_storage_is_compact(tokenizer, images):
    records = [rec(i, ("human", "<image>\nWhat is it?"), ("gpt", "A thing.")) for i in range(50)]
    ds = SFTDataset(records, tokenizer, images, 196, None)
    p = ds.prepared
    assert len(ds) == 50 and len(ds.samples[0].input_ids) > 196
    # each image's 196 <image> ids are stored as one: the flat id array is ~196 × 50 shorter than the samples
    assert len(p.ids) == sum(len(s.input_ids) for s in ds.samples) - 195 * 50
    # everything stored (ids, offsets, mask runs, record ids, paths) is under a third of the expanded int32 ids
    assert p.nbytes() < sum(len(s.input_ids) for s in ds.samples) * 4 / 3


def test_the_cache_is_used_only_for_the_same_key(tokenizer, images, tmp_path, monkeypatch):
    from bonsai_mlx.pico import train_tokenizer

    data = tmp_path / "d.json"
    records = mixed_records()
    data.write_text(json.dumps(records))
    cache = tmp_path / "cache"
    logs = []

    def load(tok=tokenizer, n_img=8, max_len=64, path=data, system=None):
        return SFTDataset.from_file(path, tok, images, n_img, max_len, system, cache_dir=cache, log=logs.append)

    def hit():
        return any("prepared-data cache" in m for m in logs[-2:])

    fresh = load()
    assert not hit() and any(cache.iterdir())
    again = load()
    assert hit()
    assert [s.input_ids.tolist() for s in again.samples] == [s.input_ids.tolist() for s in fresh.samples]
    assert [s.labels_mask.tolist() for s in again.samples] == [s.labels_mask.tolist() for s in fresh.samples]
    assert again.skipped == fresh.skipped and again.report() == fresh.report()

    # anything that changes the samples changes the key: never a stale cache
    other_tok = train_tokenizer(corpus=["a different corpus of words entirely"] * 20, vocab_size=300)
    for kw in ({"tok": other_tok}, {"n_img": 4}, {"max_len": 32}, {"system": "Be brief."}):
        logs.clear()
        ds = load(**kw)
        assert not hit(), kw
        want, _ = reference(records, kw.get("tok", tokenizer), images, kw.get("n_img", 8), kw.get("max_len", 64),
                            kw.get("system"))
        assert [s.input_ids.tolist() for s in ds.samples] == [w[1] for w in want], kw
    logs.clear()
    monkeypatch.setattr(prepare, "PROMPT_TEMPLATE_VERSION", "another-template")
    load()
    assert not hit()
    monkeypatch.undo()
    # the data file edited in place (same path, same size)
    records[0]["conversations"][1]["value"] = "A blue square."
    data.write_text(json.dumps(records))
    logs.clear()
    ds = load()
    assert not hit()
    assert ds.samples[0].input_ids.tolist() == encode_example(tokenizer, records[0], 8, 64).input_ids
    # a damaged entry is rebuilt, not trusted
    for entry in cache.iterdir():
        (entry / "meta.json").write_text("{")
    logs.clear()
    load()
    assert not hit()
    logs.clear()
    load()
    assert hit()


def test_strict_names_the_first_bad_record_in_file_order(tokenizer, images):
    records = [rec(0, ("human", "<image>"), ("gpt", "ok")), rec(1, ("human", "<image>"), ("gpt", "x")),
               rec(2, ("gpt", "a"))]
    records[1]["image"] = "nope.png"
    with pytest.raises(BonsaiError, match="record r1: image .*nope.png not found"):
        SFTDataset(records, tokenizer, images, 8, strict=True)
    records[1]["image"] = "ok.png"
    with pytest.raises(BonsaiError, match="record r2: .*--strict"):
        SFTDataset(records, tokenizer, images, 8, strict=True)


@pytest.mark.parametrize("text", ['[{"a": 1}, {"b": [1, 2]} ,\n {"c": "x"}]\n', "[]", '{"x": 1}', '[{"a": 1},\n {"b": }]',
                                  '[{"a": 1} {"b": 2}]', ' [ {"a": 1} ] x', '[{"a": 1},'])
def test_streamed_records_equal_read_records(tmp_path, text):
    """The trainer streams a JSON list record by record (665k records never in memory at once): same records, same
    one-line errors as parsing the whole file."""
    f = tmp_path / "d.json"
    f.write_text(text)

    def run(fn):
        try:
            return fn()
        except BonsaiError as e:
            return str(e)

    whole = run(lambda: read_records(f))
    assert run(lambda: list(iter_records(f))) == whole
    if isinstance(whole, list):
        assert list(iter_records(f, 1)) == whole[:1]


def _offsets(backend, texts):
    from itertools import chain

    encs = backend.encode_batch(texts, add_special_tokens=False)
    lens = np.array([len(e.ids) for e in encs], np.int64)
    ids = np.fromiter(chain.from_iterable(e.ids for e in encs), np.int32, int(lens.sum()))
    ref = np.array([o for e in encs for o in e.offsets], np.int64).reshape(-1, 2)
    return encs, lens, ids, ref


def test_offsets_from_token_lengths_equal_the_tokenizers_and_are_refused_where_inexact(tokenizer):
    """The byte-level shortcut for offsets (train/fast_tokens.py) gives the tokenizer's own offsets, ASCII or not
    (those take the tokenizer's), and is not used where a token's length is not what its offsets count."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from bonsai_mlx.train.fast_tokens import offsets_from_lengths, token_byte_lengths

    backend = tokenizer.backend_tokenizer
    table = token_byte_lengths(backend)
    assert table is not None
    texts = ["<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n  A cat,  on a mat.<|im_end|>",
             "", "zweite Zeile — 猫 🐱\n  x", "\n\n\t tabs\tand   spaces  \n", "<|im_end|><|im_end|>ok"]
    encs, lens, ids, ref = _offsets(backend, texts)
    assert np.array_equal(offsets_from_lengths(table, ids, lens, texts, encs), ref)
    # a table that disagrees with a record's text length is caught per record (that record takes the real offsets)
    bad = table.copy()
    bad[ids[0]] += 1
    assert np.array_equal(offsets_from_lengths(bad, ids, lens, texts, encs), ref)

    spec = json.loads(backend.to_str())
    trimmed = Tokenizer.from_str(backend.to_str())
    trimmed.post_processor = processors.ByteLevel(trim_offsets=True)
    assert token_byte_lengths(trimmed) is None  # its offsets drop the leading space a token holds
    stripped = dict(spec, added_tokens=[dict(t, lstrip=True) for t in spec["added_tokens"]])
    assert token_byte_lengths(Tokenizer.from_str(json.dumps(stripped))) is None
    word = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    assert token_byte_lengths(word) is None
    assert token_byte_lengths(None) is None


def test_the_nfc_free_tokenizer_is_used_only_on_nfc_text(tokenizer):
    """Qwen's NFC normalizer changes nothing on NFC text, so the copy without it is exact there; a chunk holding a
    text that NFC would change goes through the tokenizer itself (where the two differ)."""
    from bonsai_mlx.train.fast_tokens import pick_backend, without_nfc

    backend = tokenizer.backend_tokenizer
    raw = without_nfc(backend)
    assert raw is not None and raw.normalizer is None
    nfc = ["<|im_start|>user\nCafé — 猫 🐱 déjà vu<|im_end|>", "plain ascii\n"]
    assert pick_backend(backend, raw, nfc) is raw
    a, b = (be.encode_batch(nfc, add_special_tokens=False) for be in (backend, raw))
    assert [(e.ids, e.offsets) for e in a] == [(e.ids, e.offsets) for e in b]
    decomposed = nfc + ["Cafe\u0301"]  # e + combining acute: NFC makes it one character
    assert pick_backend(backend, raw, decomposed) is backend
    assert backend.encode("Cafe\u0301", add_special_tokens=False).ids != raw.encode("Cafe\u0301",
                                                                                  add_special_tokens=False).ids
    from tokenizers import Tokenizer, normalizers

    other = Tokenizer.from_str(backend.to_str())
    other.normalizer = normalizers.NFKC()
    assert without_nfc(other) is None
