"""Image-folder datasets: every kind of bad file gets a named outcome; captions, repeats, crops, buckets, order."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lora_workbench.trainer.dataset import (
    MAX_PIXELS,
    DatasetError,
    DatasetOptions,
    crop_window,
    folder_signature,
    load_image_folder,
)

OPTS = DatasetOptions(resolution=16)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _with_size(png: bytes, width: int, height: int) -> bytes:
    """Return a PNG whose IHDR claims ``width x height`` (CRC fixed), so only the header is huge."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _folder_with_good_image(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "good.png").write_bytes(png_bytes(Image.new("RGB", (16, 16), (10, 20, 30))))
    return folder


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", lambda: b"", "empty file (0 bytes)"),
        ("cut.png", lambda: png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))[:300], "corrupt or truncated"),
        ("cut.jpg", lambda: _jpeg(Image.effect_noise((64, 64), 50).convert("RGB"))[:400], "corrupt or truncated"),
        ("notes.png", lambda: b"this is a text file, not a PNG\n" * 4, "cannot be read as an image"),
        # Pillow's own guard (above 2 x its 89-megapixel limit) fires at open: still named as a bomb.
        ("bomb.png", lambda: _with_size(png_bytes(Image.new("RGB", (4, 4))), 100000, 100000), "decompression-bomb"),
        # Above our MAX_PIXELS (64 MP) but below Pillow's warning (89 MP): our own check must catch it.
        ("big.png", lambda: _with_size(png_bytes(Image.new("RGB", (4, 4))), 9000, 8000), "decompression-bomb"),
        ("meta.json", lambda: b"{}", "not an image file type (.json)"),
    ],
)
def test_bad_file_is_skipped_with_its_reason(tmp_path, name, content, reason):
    folder = _folder_with_good_image(tmp_path)
    (folder / name).write_bytes(content())
    ds = load_image_folder(folder, OPTS)
    assert [e.path.name for e in ds.examples] == ["good.png"], "the good image must still load"
    assert len(ds.skipped) == 1 and ds.skipped[0][0] == name, ds.skipped
    assert reason in ds.skipped[0][1], ds.skipped
    assert f"skipped {name}: " in ds.report(), "the report must name every skipped file"
    if name == "big.png":
        assert 9000 * 8000 > MAX_PIXELS and str(MAX_PIXELS) in ds.skipped[0][1]


def test_cmyk_and_16_bit_are_converted_and_listed(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)  # pure red in CMYK
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(folder / "deep.png")  # 16-bit white
    ds = load_image_folder(folder, OPTS)
    assert dict(ds.converted) == {"cmyk.jpg": "CMYK converted to RGB", "deep.png": "16-bit converted to 8-bit RGB"}
    by_name = {e.path.name: e.pixels for e in ds.examples}
    assert all(p.shape == (3, 16, 16) for p in by_name.values())
    # JPEG is lossy: 0.1 leaves room for its rounding while telling red from any other colour.
    red = by_name["cmyk.jpg"].mean(dim=(1, 2))
    assert red[0] > 0.9 and red[1] < 0.1 and red[2] < 0.1, red
    assert by_name["deep.png"].min() == 1.0, "65535 in 16 bits is white, not clipped or wrapped"
    assert "converted cmyk.jpg: CMYK" in ds.report()


def test_transparency_is_composited_on_white(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 8, 16))  # left half fully transparent black
    rgba.save(folder / "alpha.png")
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0, 0, 0] * 254)
    pal.paste(0, (0, 0, 8, 16))  # left half index 0, declared transparent
    pal.save(folder / "palette.png", transparency=0)
    ds = load_image_folder(folder, OPTS)
    assert {n for n, _ in ds.converted} == {"alpha.png", "palette.png"}
    assert all(why == "transparency composited on white" for _, why in ds.converted)
    px = {e.path.name: e.pixels for e in ds.examples}
    # 16x16 at resolution 16 is not resampled, so the halves stay exact.
    assert (px["alpha.png"][:, :, :8] == 1.0).all(), "transparent pixels must become white, not black"
    assert (px["alpha.png"][:, :, 8:] == 0.0).all()
    assert (px["palette.png"][:, :, :8] == 1.0).all(), "a palette's transparent index must become white"
    assert np.allclose(px["palette.png"][:, 0, 12].numpy(), [200 / 255, 30 / 255, 30 / 255])


def test_captions_from_txt_or_template(subject_folder):
    ds = load_image_folder(subject_folder, DatasetOptions(resolution=16, trigger="zwx", class_noun="cat"))
    for e in ds.examples:
        i = int(e.path.stem.split("_")[1])
        if i % 2:
            assert (e.caption, e.captioned) == ("a photo of sks toy", True), e.path.name
        else:
            assert (e.caption, e.captioned) == ("a photo of zwx cat", False), e.path.name
    assert ds.class_prompt == "a photo of cat", "the class prompt is the template without the trigger"
    assert "3 with a caption file, 3 from the template" in ds.report()


def test_repeats_multiply_the_epoch(subject_folder):
    ds = load_image_folder(subject_folder, DatasetOptions(resolution=16, repeats=3))
    assert len(ds) == 18
    seen = [item.index for batch in ds.epoch_batches(4, seed=0, epoch=0) for item in batch]
    assert sorted(seen) == sorted(list(range(6)) * 3), "each image appears `repeats` times per epoch"
    with pytest.raises(DatasetError, match="repeats 0"):
        load_image_folder(subject_folder, DatasetOptions(resolution=16, repeats=0))


def test_center_crop_and_random_crops_drawn_per_use(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    # 48x16: left third red, middle green, right blue; at resolution 16 only the scale-1 crop remains.
    arr = np.zeros((16, 48, 3), np.uint8)
    arr[:, :16, 0] = arr[:, 16:32, 1] = arr[:, 32:, 2] = 255
    Image.fromarray(arr).save(folder / "wide.png")
    center = load_image_folder(folder, DatasetOptions(resolution=16, crop="center")).examples[0]
    assert center.data.dtype == torch.uint8 and center.data.shape == (3, 16, 16), "held as uint8, cropped"
    assert (center.pixels[1] == 1).all() and (center.pixels[0] == 0).all(), "a center crop keeps the middle third"
    # Random: the whole resized image is kept (48 wide = 16 + 4 steps of 8) and a crop is drawn per use.
    ds = load_image_folder(folder, DatasetOptions(resolution=16, crop="random", repeats=4))
    example = ds.examples[0]
    assert example.data.shape == (3, 16, 48) and example.size == (16, 16)
    lefts = {
        crop_window((48 - 16) // 8, item.crop[1])
        for epoch in range(4)
        for batch in ds.epoch_batches(1, seed=0, epoch=epoch)
        for item in batch
    }
    assert len(lefts) >= 3, f"16 uses of one image should start at several places, got {lefts}"
    assert ds.epoch_batches(1, seed=0, epoch=2) == ds.epoch_batches(1, seed=0, epoch=2), "a function of seed, epoch"


@pytest.mark.parametrize("w, h", [(64, 32), (32, 64), (40, 40), (60, 45)])
def test_buckets_are_multiples_of_64_and_keep_the_aspect(tmp_path, w, h):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (w, h), (90, 90, 90)).save(folder / "img.png")
    px = load_image_folder(folder, DatasetOptions(resolution=256, buckets=True)).examples[0].pixels
    bh, bw = px.shape[1:]
    assert bw % 64 == 0 and bh % 64 == 0, (bw, bh)
    # With 64-px steps at resolution 256 the closest bucket can be off by up to 15% in aspect (measured worst
    # over aspects 0.5-2 in steps of 0.01); 2:1, 1:2, 1:1 and 4:3 have exact buckets.
    assert abs((bw / bh) / (w / h) - 1) < 0.16, (bw, bh)
    assert bw * bh <= 256**2, "a bucket never has more than resolution^2 pixels"


def test_mixed_buckets_batch_by_size(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 32), (i, 0, 0)).save(folder / f"wide{i}.png")
        Image.new("RGB", (32, 64), (i, 0, 0)).save(folder / f"tall{i}.png")
    ds = load_image_folder(folder, DatasetOptions(resolution=64 * 2, buckets=True))
    for batch in ds.epoch_batches(2, seed=0, epoch=0):
        assert len({ds.examples[item.index].size for item in batch}) == 1, "a batch mixes bucket sizes"


def test_empty_and_missing_folders_are_named(tmp_path):
    empty = tmp_path / "empty_set"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty_set.*the folder is empty"):
        load_image_folder(empty, OPTS)
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DatasetError, match="no_such_folder.*does not exist"):
        load_image_folder(missing, OPTS)


def test_only_bad_files_lists_every_reason(tmp_path):
    folder = tmp_path / "bad_only"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.png").write_bytes(b"not an image")
    (folder / "c.json").write_text("{}")
    with pytest.raises(DatasetError) as e:
        load_image_folder(folder, OPTS)
    msg = str(e.value)
    assert "bad_only" in msg
    for part in ("a.png: empty file", "b.png: cannot be read", "c.json: not an image file type"):
        assert part in msg, msg


def test_epoch_order_is_a_function_of_seed_and_epoch(subject_folder):
    ds = load_image_folder(subject_folder, DatasetOptions(resolution=16, flip=True, caption_dropout=0.3))
    a = ds.epoch_batches(2, seed=7, epoch=0)
    assert a == ds.epoch_batches(2, seed=7, epoch=0), "same seed and epoch must give the same batches"
    # 6! = 720 orders (times flips and dropouts): a repeat by chance is unlikely, and the seeds here are fixed.
    assert a != ds.epoch_batches(2, seed=7, epoch=1), "each epoch must be shuffled anew"
    assert a != ds.epoch_batches(2, seed=8, epoch=0)
    assert ds.batch(2, seed=7, number=3) == ds.epoch_batches(2, seed=7, epoch=1)[0], "batch 3 = epoch 1's first"
    flips = [item.flip for b in a + ds.epoch_batches(2, 7, 1) for item in b]
    assert any(flips) and not all(flips), "flip is drawn per image"


def _png(path, colour=(10, 20, 30), size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def test_sub_folders_are_used_and_kohya_folders_repeat_and_caption(tmp_path):
    folder = tmp_path / "data"
    _png(folder / "top.png")
    _png(folder / "more" / "a.png", (200, 0, 0))
    _png(folder / "10_zwx cat" / "b.png", (0, 200, 0))
    (folder / "10_zwx cat" / "c.png").write_bytes(png_bytes(Image.new("RGB", (16, 16))))
    (folder / "10_zwx cat" / "c.txt").write_text("own caption")
    (folder / "orphan.txt").write_text("no image of this name")
    (folder / ".DS_Store").write_bytes(b"\0")
    ds = load_image_folder(folder, DatasetOptions(resolution=16, trigger="sks", class_noun="dog"))
    by_name = {e.name: e for e in ds.examples}
    assert sorted(by_name) == ["10_zwx cat/b.png", "10_zwx cat/c.png", "more/a.png", "top.png"]
    assert (by_name["10_zwx cat/b.png"].caption, by_name["10_zwx cat/b.png"].repeats) == ("zwx cat", 10)
    assert (by_name["10_zwx cat/c.png"].caption, by_name["10_zwx cat/c.png"].repeats) == ("own caption", 10)
    assert (by_name["more/a.png"].caption, by_name["more/a.png"].repeats) == ("a photo of sks dog", 1)
    assert len(ds) == 22
    report = ds.report()
    # Every file is used or named: the orphan caption and the hidden file are listed with their reason.
    assert "skipped orphan.txt: caption file without an image" in report
    assert "skipped .DS_Store: hidden" in report
    assert "folder 10_zwx cat/: repeats x10" in report

    flat = load_image_folder(folder, DatasetOptions(resolution=16, recursive=False))
    assert [e.name for e in flat.examples] == ["top.png"]
    assert "skipped more/: sub-folder with 1 file(s), not used (recursive is off)" in flat.report()
    assert "skipped 10_zwx cat/: sub-folder with 3 file(s)" in flat.report()


def test_report_and_errors_name_the_folder_as_the_user_gave_it(tmp_path):
    folder = tmp_path / "secret_parent" / "my_dog"
    _png(folder / "x.png")
    ds = load_image_folder(folder, DatasetOptions(resolution=16), label="my_dog")
    assert "my_dog" in ds.report() and "secret_parent" not in ds.report()
    with pytest.raises(DatasetError) as e:
        load_image_folder(tmp_path / "secret_parent" / "missing", DatasetOptions(resolution=16), label="missing")
    assert "secret_parent" not in str(e.value) and "'missing'" in str(e.value)


def test_folder_signature_sees_added_and_edited_files(tmp_path):
    folder = tmp_path / "data"
    _png(folder / "a.png")
    first = folder_signature(folder)
    assert folder_signature(folder) == first, "no change, same signature"
    _png(folder / "sub" / "b.png")
    second = folder_signature(folder)
    assert second != first, "an image added in a sub-folder changes it"
    _png(folder / "a.png", (1, 2, 3), size=17)
    assert folder_signature(folder) != second, "an edited image changes it"
    assert folder_signature(tmp_path / "nope") == "missing"


def test_identity_changes_with_pixels_or_caption_not_with_the_folder(tmp_path):
    for name in ("one", "two"):
        _png(tmp_path / name / "a.png")
    one = load_image_folder(tmp_path / "one", DatasetOptions(resolution=16)).identity()
    assert one == load_image_folder(tmp_path / "two", DatasetOptions(resolution=16)).identity(), "content, not place"
    (tmp_path / "two" / "a.txt").write_text("another caption")
    assert one != load_image_folder(tmp_path / "two", DatasetOptions(resolution=16)).identity()
