"""Image preprocessing equals transformers' SiglipImageProcessor(do_convert_rgb=True)."""

import io

import numpy as np
import pytest
from PIL import Image
from transformers import SiglipImageProcessor

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.processing import ImageProcessor


def _rgb(rng, w, h):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _cases(rng):
    rgba = np.concatenate([rng.integers(0, 256, (40, 30, 3)), rng.integers(0, 256, (40, 30, 1))], -1).astype(np.uint8)
    rgba[:10, :, 3] = 0  # fully transparent band → composited on white
    pal = _rgb(rng, 37, 23).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    return {
        "rgb_square": _rgb(rng, 64, 64),
        "rgb_wide": _rgb(rng, 90, 41),
        "rgb_tall": _rgb(rng, 20, 77),
        "rgba_transparent": Image.fromarray(rgba),
        "palette_transparent": pal,
        "grayscale": Image.fromarray(rng.integers(0, 256, (33, 50), dtype=np.uint8)),
        "grayscale_alpha": Image.fromarray(rng.integers(0, 256, (33, 50, 2), dtype=np.uint8)),
        "cmyk": _rgb(rng, 31, 29).convert("CMYK"),
    }


@pytest.mark.parametrize("size", [224, 32])
def test_pixel_values_equal_siglip_image_processor(size):
    rng = np.random.default_rng(0)
    ref_proc = SiglipImageProcessor(do_convert_rgb=True, size={"height": size, "width": size})
    ours = ImageProcessor(size=size)
    for name, img in _cases(rng).items():
        ref = ref_proc(images=img, return_tensors="np")["pixel_values"]
        got = ours([img], channels_first=True)
        assert got.shape == ref.shape == (1, 3, size, size), name
        assert np.abs(got - ref).max() <= 1e-5, name
    # channels-last is the same data
    img = _cases(rng)["rgb_wide"]
    assert np.array_equal(ours(img), ours(img, channels_first=True).transpose(0, 2, 3, 1))


def test_from_pretrained_config_roundtrip(tmp_path):
    p = ImageProcessor(size=48)
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(p.to_dict()))
    assert ImageProcessor.from_pretrained(tmp_path) == p
    # transformers reads the same file as a SigLIP processor with the same settings
    ref = SiglipImageProcessor.from_pretrained(str(tmp_path))
    img = _rgb(np.random.default_rng(3), 50, 70)
    assert np.abs(ref(images=img, return_tensors="np")["pixel_values"] - p(img, channels_first=True)).max() <= 1e-5


def test_sixteen_bit_is_scaled_not_clipped():
    rng = np.random.default_rng(1)
    eight = rng.integers(0, 256, (40, 40), dtype=np.uint16)
    sixteen = Image.fromarray(eight * 257)  # the same picture at 16 bits
    assert sixteen.mode == "I;16"
    p = ImageProcessor(size=32)
    a = p(sixteen)
    b = p(Image.fromarray(eight.astype(np.uint8)))
    assert np.abs(a - b).max() <= 1e-6
    assert a.min() < -0.9  # not clipped to white, which is what a plain convert("RGB") would give


def test_exif_orientation_is_applied(tmp_path):
    rng = np.random.default_rng(2)
    img = _rgb(rng, 60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    f = tmp_path / "rot.jpg"
    img.save(f, exif=exif.tobytes(), quality=100)
    stored = Image.fromarray(np.asarray(Image.open(f)))  # decoded pixels, EXIF dropped
    shown = stored.transpose(Image.Transpose.ROTATE_270)  # what a viewer displays: 30 wide, 60 tall
    assert shown.size == (30, 60)
    p = ImageProcessor(size=32)
    assert np.abs(p(str(f)) - p(shown)).max() <= 1e-6
    assert np.abs(p(str(f)) - p(stored)).max() > 0.1


def test_bad_files_give_one_line_errors(tmp_path):
    p = ImageProcessor(size=32)
    with pytest.raises(BonsaiError, match="no such file"):
        p(str(tmp_path / "missing.png"))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(BonsaiError, match="not an image"):
        p(str(tmp_path / "notes.txt"))
    buf = io.BytesIO()
    _rgb(np.random.default_rng(4), 64, 64).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BonsaiError, match="cut.jpg"):
        p(str(tmp_path / "cut.jpg"))
