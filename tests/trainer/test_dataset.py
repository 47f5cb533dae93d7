"""Image folder dataset: every kind of bad file is converted or skipped with a reason, never silently."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lora_workbench.trainer.dataset import DatasetError, DatasetOptions, load_image_folder

TRIGGER = "sks"


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming a huge size, and a tiny IDAT: PIL sees the size before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _write_bad_files(folder, draw_subject):
    """Return {file name: expected reason fragment (skipped) or conversion note (kept)}."""
    good = draw_subject(0, 32)
    jpeg = io.BytesIO()
    good.save(jpeg, format="JPEG")
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(_png_bytes(good)[:200])
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "text.png").write_text("this is not an image")
    (folder / "huge.png").write_bytes(_huge_png_header(100_000, 100_000))
    (folder / "notes.json").write_text("{}")
    good.convert("CMYK").save(folder / "cmyk.jpg")
    wide = (np.asarray(good.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(wide).save(folder / "sixteen.png")  # a 16-bit greyscale PNG ("I;16")
    rgba = good.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must come out white, not black
    rgba.save(folder / "alpha.png")
    return {
        "skipped": {
            "zero.png": "empty file (0 bytes)",
            "truncated.png": "corrupt or truncated",
            "truncated.jpg": "corrupt or truncated",
            "text.png": "cannot be read as an image",
            "huge.png": "too large",
            "notes.json": "not an image file type",
        },
        "converted": {"cmyk.jpg": "CMYK", "sixteen.png": "16-bit", "alpha.png": "transparency composited on white"},
    }


def test_bad_files_are_converted_or_skipped_with_reasons(tmp_path, draw):
    draw_subject = draw
    expected = _write_bad_files(tmp_path, draw)
    ds = load_image_folder(tmp_path, DatasetOptions(resolution=16))
    report = ds.report()
    assert sorted(e.path.name for e in ds.examples) == sorted(expected["converted"])
    for name, reason in expected["skipped"].items():
        line = next((ln for ln in report.splitlines() if ln.startswith(f"skipped {name}:")), None)
        assert line is not None and reason in line, f"{name} should be skipped for '{reason}':\n{report}"
    for name, note in expected["converted"].items():
        assert any(ln.startswith(f"converted {name}:") and note in ln for ln in report.splitlines()), report
    by_name = {e.path.name: e.pixels for e in ds.examples}
    assert by_name["alpha.png"].min() == 1.0, "a transparent image is composited on white"
    # 16-bit values are scaled, not clipped: the 8-bit and 16-bit versions of the same picture agree.
    grey = np.asarray(draw_subject(0, 32).convert("L").resize((16, 16), Image.Resampling.LANCZOS)) / 255.0
    assert np.abs(by_name["sixteen.png"][0].numpy() - grey).max() < 0.02  # LANCZOS on 8 vs 16 bit input
    assert all(p.shape == (3, 16, 16) and 0 <= p.min() and p.max() <= 1 for p in by_name.values())


def test_folder_of_only_bad_files_names_folder_and_reasons(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("nope")
    with pytest.raises(DatasetError) as e:
        load_image_folder(tmp_path)
    assert str(tmp_path) in str(e.value) and "zero.png: empty file" in str(e.value) and "text.png" in str(e.value)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match="the folder is empty"):
        load_image_folder(tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=str(missing)):
        load_image_folder(missing)


def test_captions_template_repeats_and_deterministic_batches(subject_folder):
    options = DatasetOptions(trigger=TRIGGER, class_noun="toy", resolution=16, flip=True, repeats=2,
                             caption_dropout=0.3, crop="random")
    ds = load_image_folder(subject_folder, options, seed=1)
    captions = {e.path.name: (e.caption, e.captioned) for e in ds.examples}
    assert captions["img_1.png"] == (f"a photo of {TRIGGER} toy", True)
    assert captions["img_0.png"] == (f"a photo of {TRIGGER} toy", False)
    assert len(ds) == 12 and "6 image(s)" in ds.report().splitlines()[0]
    plan = [ds.batch(4, 7, n) for n in range(9)]
    assert plan == [ds.batch(4, 7, n) for n in range(9)], "the data plan is a pure function of seed and number"
    epoch = [i for n in range(3) for i, _, _ in plan[n]]
    assert sorted(epoch) == sorted(list(range(6)) * 2), "one epoch shows every image `repeats` times"
    flags = [(f, d) for b in plan for _, f, d in b]
    assert any(f for f, _ in flags) and not all(f for f, _ in flags)
    assert any(d for _, d in flags) and not all(d for _, d in flags)
    again = load_image_folder(subject_folder, options, seed=1)
    assert all((a.pixels == b.pixels).all() for a, b in zip(ds.examples, again.examples))


def test_buckets_keep_aspect_ratio(tmp_path, draw):
    draw_subject = draw
    draw_subject(0, 64).resize((128, 64)).save(tmp_path / "wide.png")
    draw_subject(1, 64).save(tmp_path / "square.png")
    ds = load_image_folder(tmp_path, DatasetOptions(resolution=128, buckets=True))
    shapes = {e.path.name: tuple(e.pixels.shape[1:]) for e in ds.examples}
    # At most 128^2 pixels with sides in steps of 64: 128x64 is the 2:1 bucket (nothing cropped away).
    assert shapes == {"wide.png": (64, 128), "square.png": (128, 128)}
    assert all(len({tuple(ds.examples[i].pixels.shape) for i, _, _ in b}) == 1 for b in ds.epoch_batches(2, 0, 0))
