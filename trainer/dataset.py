"""An image folder as a training set: captions, trigger/class template, resize, crop, buckets, flips.

Every file is looked at on purpose: images that can be used are converted (CMYK, 16-bit, palette,
alpha composited on white), everything else is skipped and listed in the report with the reason, so
each file under the folder is either used or named. Sub-folders are walked (kohya's ``N_name`` folders
repeat their images N times); pixels are held as uint8 (a quarter of float32's memory in ComfyUI's
output cache). Random crops and flips are drawn per use from the (seed, epoch) plan, so a resumed run
sees exactly the crops the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_TEMPLATE = "a photo of {trigger} {class_noun}"
# Pillow's decompression-bomb guard, made explicit: a 64-megapixel image is already far beyond training sizes.
MAX_PIXELS = 64_000_000
BUCKET_STEP = 64
# Random crops move in steps of one latent pixel of the usual 8x VAE (see ``Example.data``).
CROP_STEP = 8
# kohya's DreamBooth folder convention: "<repeats>_<caption words>", e.g. "10_sks dog".
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """The folder cannot give a training set; the message names the folder and why."""


@dataclass
class DatasetOptions:
    """How to turn the folder into training examples."""

    trigger: str = "sks"
    class_noun: str = "dog"
    caption_template: str = DEFAULT_TEMPLATE
    resolution: int = 512
    crop: str = "center"  # or "random"
    buckets: bool = False
    flip: bool = False
    repeats: int = 1
    caption_dropout: float = 0.0
    recursive: bool = True


@dataclass
class Example:
    """One usable image, its caption and how often an epoch uses it.

    ``data`` is uint8 ``(3, H, W)``: exactly the trained size ``size`` with a center crop; with a random
    crop, the image resized to cover ``size`` with up to ``CROP_STEP``-aligned room to move the crop in.
    """

    path: Path
    name: str  # relative to the dataset folder, with '/' separators (what reports show)
    data: torch.Tensor
    size: tuple[int, int]  # (height, width) trained on
    caption: str
    captioned: bool
    repeats: int = 1
    digest: str = ""  # of the pixels, caption and repeats: what the run sees of this file

    @property
    def pixels(self) -> torch.Tensor:
        """Return the center crop at the trained size as float32 ``(3, h, w)`` in [0, 1]."""
        h, w = self.size
        top, left = (self.data.shape[1] - h) // 2, (self.data.shape[2] - w) // 2
        return self.data[:, top : top + h, left : left + w].float() / 255.0

    @property
    def full_pixels(self) -> torch.Tensor:
        """Return all of ``data`` as float32 in [0, 1] (the room random crops are taken from)."""
        return self.data.float() / 255.0


class BatchItem(NamedTuple):
    """One example's use in a batch: which, mirrored or not, caption dropped or not, crop position in [0, 1)^2."""

    index: int
    flip: bool
    drop_caption: bool
    crop: tuple[float, float] = (0.5, 0.5)


@dataclass
class ImageDataset:
    """The usable examples of a folder, the skipped files with reasons, and the options used."""

    folder: Path
    examples: list[Example]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    converted: list[tuple[str, str]] = field(default_factory=list)
    options: DatasetOptions = field(default_factory=DatasetOptions)
    label: str = ""  # how reports and errors name the folder (never more than the user gave)

    def __len__(self) -> int:
        return sum(e.repeats for e in self.examples) * self.options.repeats

    @property
    def class_prompt(self) -> str:
        """Return the default class prompt: the caption template without the trigger."""
        return " ".join(self.options.caption_template.format(trigger="", class_noun=self.options.class_noun).split())

    def identity(self) -> dict[str, str]:
        """Return ``{file name: digest}`` of what training sees (pixels, caption, repeats), plus the options.

        Two datasets with equal identities train identically; resume compares them.
        """
        opts = self.options
        options = f"{opts.crop}|{opts.flip}|{opts.repeats}|{opts.caption_dropout}|{opts.buckets}|{opts.resolution}"
        return {"<options>": options, **{e.name: e.digest for e in self.examples}}

    def report(self) -> str:
        """Return a human-readable summary: counts, captions, conversions and every skipped file with its reason."""
        captioned = sum(e.captioned for e in self.examples)
        sizes = sorted({e.size for e in self.examples})
        extra = sorted({(e.name.rsplit("/", 1)[0], e.repeats) for e in self.examples if e.repeats > 1})
        lines = [
            f"{len(self.examples)} image(s) from {self.label or self.folder.name} x{self.options.repeats} repeats "
            f"({len(self)} uses per epoch); {captioned} with a caption file, {len(self.examples) - captioned} "
            f"from the template '{self.options.caption_template}' or their folder's name; "
            f"sizes {', '.join(f'{w}x{h}' for h, w in sizes)}",
        ]
        lines += [f"folder {name}/: repeats x{n} (kohya folder name)" for name, n in extra]
        lines += [f"converted {name}: {why}" for name, why in self.converted]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)

    def epoch_batches(self, batch_size: int, seed: int, epoch: int, caption_dropout: float | None = None):
        """Return one epoch's batches as lists of ``BatchItem``.

        A pure function of (seed, epoch): a run resumed at any step sees exactly the data it would have
        seen. Images of one size go together (aspect buckets). Flips, caption dropout and random crop
        positions are drawn per use. ``caption_dropout`` replaces the options' probability when given.
        """
        dropout = self.options.caption_dropout if caption_dropout is None else caption_dropout
        rng = random.Random(f"{seed}:{epoch}")
        items = [i for i, e in enumerate(self.examples) for _ in range(e.repeats)] * self.options.repeats
        rng.shuffle(items)
        by_size: dict[tuple, list[int]] = {}
        for i in items:
            by_size.setdefault(self.examples[i].size, []).append(i)
        random_crop = self.options.crop == "random"
        batches = []
        for group in by_size.values():
            for start in range(0, len(group), batch_size):
                batch = []
                for i in group[start : start + batch_size]:
                    flip = self.options.flip and rng.random() < 0.5
                    drop = bool(dropout) and rng.random() < dropout
                    crop = (rng.random(), rng.random()) if random_crop else (0.5, 0.5)
                    batch.append(BatchItem(i, flip, drop, crop))
                batches.append(batch)
        return batches

    def batch(self, batch_size: int, seed: int, number: int, caption_dropout: float | None = None):
        """Return batch ``number`` (counting from 0 across epochs) of the plan ``epoch_batches`` makes."""
        per_epoch = len(self.epoch_batches(batch_size, seed, 0, caption_dropout))
        epoch, index = divmod(number, per_epoch)
        return self.epoch_batches(batch_size, seed, epoch, caption_dropout)[index]


def crop_window(room: int, fraction: float) -> int:
    """Return the offset of a crop inside ``room`` spare units for a position ``fraction`` in [0, 1)."""
    return min(room, int(fraction * (room + 1)))


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Return an RGB image and a note of the conversion made, if any."""
    note = None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
        return img, "16-bit converted to 8-bit RGB"
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background, "transparency composited on white"
    if img.mode == "CMYK":
        note = "CMYK converted to RGB"
    elif img.mode not in ("RGB",):
        note = f"{img.mode} converted to RGB"
    return img.convert("RGB"), note


def _bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Return the (w, h) bucket for an image: at most resolution^2 pixels, sides in steps of 64 (finer below 256).

    The bucket whose aspect ratio is closest to the image's wins (least cropped away), the larger one on a tie.
    """
    area = resolution * resolution
    aspect = math.log(width / height)
    # 64 keeps SD's latents divisible by 8; small test resolutions need finer steps to have any buckets at all.
    step = max(8, min(BUCKET_STEP, resolution // 4 // 8 * 8))
    best = None
    for w in range(step, 4 * resolution + 1, step):
        h = (area // w) // step * step
        if h < step:
            break
        for hh in range(step, h + 1, step):
            key = (round(abs(math.log(w / hh) - aspect), 6), -w * hh)
            if best is None or key < best[0]:
                best = (key, (w, hh))
    return best[1]


def _resize(img: Image.Image, size: tuple[int, int], crop: str) -> Image.Image:
    """Resize ``img`` to cover ``size`` (w, h) and crop it: to ``size`` exactly (center), or, for random crops,
    to ``size`` plus the largest multiple of ``CROP_STEP`` that fits on each side (the room a crop moves in)."""
    tw, th = size
    scale = max(tw / img.width, th / img.height)
    nw, nh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    if crop == "random":
        tw, th = tw + (nw - tw) // CROP_STEP * CROP_STEP, th + (nh - th) // CROP_STEP * CROP_STEP
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def _validate(options: DatasetOptions, label: str) -> None:
    if options.resolution < 16 or options.resolution % 8:
        raise DatasetError(f"resolution {options.resolution}: must be a multiple of 8 and at least 16")
    if options.repeats < 1:
        raise DatasetError(f"repeats {options.repeats}: must be at least 1")
    if options.crop not in ("center", "random"):
        raise DatasetError(f"crop '{options.crop}': expected 'center' or 'random'")
    try:
        options.caption_template.format(trigger=options.trigger, class_noun=options.class_noun)
    except (KeyError, IndexError, ValueError) as e:
        raise DatasetError(f"caption template '{options.caption_template}' is invalid: {e!r}") from None


def _walk(folder: Path, recursive: bool):
    """Yield ``(relative name, path, kind)`` for every entry under ``folder``, sorted, folders walked in place.

    ``kind`` is "file", "hidden", "link-folder" or "folder-off" (a sub-folder not walked: recursive is off).
    """
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        prefix = "" if rel == Path(".") else rel.as_posix() + "/"
        entries = sorted([(d, True) for d in dirs] + [(f, False) for f in files])
        walk_into = []
        for name, is_dir in entries:
            path = Path(root) / name
            if name.startswith("."):
                yield prefix + name + ("/" if is_dir else ""), path, "hidden"
            elif is_dir and path.is_symlink():
                yield prefix + name + "/", path, "link-folder"
            elif is_dir and not recursive:
                yield prefix + name + "/", path, "folder-off"
            elif is_dir:
                walk_into.append(name)
            else:
                yield prefix + name, path, "file"
        dirs[:] = walk_into  # os.walk visits these next, in this sorted order


def _kohya_folder(name: str) -> tuple[int, str] | None:
    """Return ``(repeats, caption words)`` of the nearest kohya-style folder in a relative file name."""
    for part in reversed(name.split("/")[:-1]):
        m = KOHYA_FOLDER.match(part)
        if m and int(m.group(1)) > 0:
            return int(m.group(1)), m.group(2).strip()
    return None


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode an image; raise ``Image.DecompressionBombError``, OSError or ValueError when unusable."""
    # A truncated file must fail here, not load half grey (ComfyUI switches this on globally).
    truncated_allowed, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(
                        f"{opened.width}x{opened.height} pixels is above the limit of {MAX_PIXELS}"
                    )
                opened.load()
                return ImageOps.exif_transpose(opened)
    except Image.DecompressionBombWarning as e:
        raise Image.DecompressionBombError(str(e)) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_allowed


def load_image_folder(
    folder: str | Path, options: DatasetOptions | None = None, label: str | None = None
) -> ImageDataset:
    """Return the usable images under ``folder`` with captions, resized (and center-cropped); others are reported.

    A same-name ``.txt`` file is the caption; otherwise the caption is the words of the nearest kohya-style
    ``N_words`` folder, else the template filled with the trigger and class noun. ``label`` is how reports and
    errors name the folder (default: its last path part), so a server never shows more of its paths than the
    user typed.

    Raises:
        DatasetError: the folder does not exist, or holds no usable image (the message lists why each file was
            skipped), or the options are invalid.
    """
    options = options or DatasetOptions()
    folder = Path(folder)
    label = label or folder.name
    if not folder.is_dir():
        raise DatasetError(f"dataset folder '{label}' does not exist or is not a folder")
    _validate(options, label)

    dataset = ImageDataset(folder, [], options=options, label=label)
    listing = list(_walk(folder, options.recursive))
    image_stems = {
        name.rsplit(".", 1)[0]
        for name, _, kind in listing
        if kind == "file" and Path(name).suffix.lower() in IMAGE_SUFFIXES
    }
    for name, path, kind in listing:
        if kind == "hidden":
            dataset.skipped.append((name, "hidden (its name starts with '.')"))
            continue
        if kind == "link-folder":
            dataset.skipped.append((name, "a link to a folder (not followed)"))
            continue
        if kind == "folder-off":
            count = sum(len(files) for _, _, files in os.walk(path))
            dataset.skipped.append((name, f"sub-folder with {count} file(s), not used (recursive is off)"))
            continue
        suffix = path.suffix.lower()
        if suffix == ".txt":
            if name[: -len(path.suffix)] not in image_stems:
                dataset.skipped.append((name, "caption file without an image of the same name"))
            continue
        if suffix not in IMAGE_SUFFIXES:
            dataset.skipped.append((name, f"not an image file type ({path.suffix or 'no extension'})"))
            continue
        if path.stat().st_size == 0:
            dataset.skipped.append((name, "empty file (0 bytes)"))
            continue
        try:
            img = _open_image(path)
        except Image.DecompressionBombError as e:
            dataset.skipped.append((name, f"image too large (decompression-bomb guard): {e}"))
            continue
        except (OSError, SyntaxError, ValueError) as e:
            # Pillow's messages quote the absolute path: name the file as the report does.
            why = str(e).replace(str(path), name)
            dataset.skipped.append((name, f"cannot be read as an image (corrupt or truncated): {why}"))
            continue
        img, note = _to_rgb(img)
        if note:
            dataset.converted.append((name, note))
        w, h = (
            _bucket_size(img.width, img.height, options.resolution)
            if options.buckets
            else (options.resolution, options.resolution)
        )
        data = torch.from_numpy(np.asarray(_resize(img, (w, h), options.crop), dtype=np.uint8).copy())
        data = data.permute(2, 0, 1).contiguous()
        caption_file = path.with_suffix(".txt")
        text = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.is_file() else ""
        kohya = _kohya_folder(name)
        repeats = kohya[0] if kohya else 1
        if text:
            caption = text
        elif kohya:
            caption = kohya[1]
        else:
            caption = options.caption_template.format(trigger=options.trigger, class_noun=options.class_noun)
        digest = hashlib.sha256(data.numpy().tobytes())
        digest.update(f"|{tuple(data.shape)}|{caption}|{repeats}".encode())
        dataset.examples.append(
            Example(path, name, data, (h, w), caption, bool(text), repeats, digest.hexdigest()[:16])
        )
    if not dataset.examples:
        reasons = "; ".join(f"{n}: {why}" for n, why in dataset.skipped) or "the folder is empty"
        raise DatasetError(f"no usable image in '{label}' ({reasons})")
    return dataset


def folder_signature(folder: str | Path) -> str:
    """Return a hash of every entry's name, size and modification time under ``folder`` (walking sub-folders).

    Cheap (no file is read): what ComfyUI's cache compares to see that a dataset folder changed.
    """
    digest = hashlib.sha256()
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    for name, path, kind in _walk(folder, recursive=True):
        try:
            st = path.stat()
        except OSError:
            continue
        digest.update(f"{name}|{kind}|{st.st_size}|{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def load_class_images(folder: str | Path, resolution: int, count: int, label: str | None = None) -> list[torch.Tensor]:
    """Return up to ``count`` class images from a folder as float32 ``(3, resolution, resolution)`` in [0, 1].

    Raises:
        DatasetError: as ``load_image_folder``.
    """
    ds = load_image_folder(folder, DatasetOptions(resolution=resolution), label=label)
    return [e.pixels for e in ds.examples[:count]]
