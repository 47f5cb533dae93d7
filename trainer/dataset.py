"""An image folder as a training set: captions, trigger/class template, resize, crop, buckets, flips.

Every file is looked at on purpose: images that can be used are converted (CMYK, 16-bit, palette,
alpha composited on white), everything else is skipped and listed in the report with the reason.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_TEMPLATE = "a photo of {trigger} {class_noun}"
# Pillow's decompression-bomb guard, made explicit: a 64-megapixel image is already far beyond training sizes.
MAX_PIXELS = 64_000_000
BUCKET_STEP = 64


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


@dataclass
class Example:
    """One usable image: pixels ``(3, H, W)`` in [0, 1] and its caption."""

    path: Path
    pixels: torch.Tensor
    caption: str
    captioned: bool


@dataclass
class ImageDataset:
    """The usable examples of a folder, the skipped files with reasons, and the options used."""

    folder: Path
    examples: list[Example]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    converted: list[tuple[str, str]] = field(default_factory=list)
    options: DatasetOptions = field(default_factory=DatasetOptions)

    def __len__(self) -> int:
        return len(self.examples) * self.options.repeats

    @property
    def class_prompt(self) -> str:
        """Return the default class prompt: the caption template without the trigger."""
        return " ".join(self.options.caption_template.format(trigger="", class_noun=self.options.class_noun).split())

    def report(self) -> str:
        """Return a human-readable summary: counts, captions, conversions and every skipped file with its reason."""
        captioned = sum(e.captioned for e in self.examples)
        sizes = sorted({tuple(e.pixels.shape[1:]) for e in self.examples})
        lines = [
            f"{len(self.examples)} image(s) from {self.folder} x{self.options.repeats} repeats; "
            f"{captioned} with a caption file, {len(self.examples) - captioned} from the template "
            f"'{self.options.caption_template}'; sizes {', '.join(f'{w}x{h}' for h, w in sizes)}",
        ]
        lines += [f"converted {name}: {why}" for name, why in self.converted]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)

    def epoch_batches(
        self, batch_size: int, seed: int, epoch: int, caption_dropout: float | None = None
    ) -> list[list[tuple[int, bool, bool]]]:
        """Return one epoch's batches as lists of ``(example index, flip, drop caption)``.

        A pure function of (seed, epoch): a run resumed at any step sees exactly the data it would
        have seen. Images of one size go together (aspect buckets). ``caption_dropout`` replaces the
        options' probability when given.
        """
        dropout = self.options.caption_dropout if caption_dropout is None else caption_dropout
        rng = random.Random(f"{seed}:{epoch}")
        items = list(range(len(self.examples))) * self.options.repeats
        rng.shuffle(items)
        by_size: dict[tuple, list[int]] = {}
        for i in items:
            by_size.setdefault(tuple(self.examples[i].pixels.shape), []).append(i)
        batches = []
        for group in by_size.values():
            for start in range(0, len(group), batch_size):
                batches.append(
                    [
                        (
                            i,
                            self.options.flip and rng.random() < 0.5,
                            bool(dropout) and rng.random() < dropout,
                        )
                        for i in group[start : start + batch_size]
                    ]
                )
        return batches

    def batch(
        self, batch_size: int, seed: int, number: int, caption_dropout: float | None = None
    ) -> list[tuple[int, bool, bool]]:
        """Return batch ``number`` (counting from 0 across epochs) of the plan ``epoch_batches`` makes."""
        per_epoch = len(self.epoch_batches(batch_size, seed, 0, caption_dropout))
        epoch, index = divmod(number, per_epoch)
        return self.epoch_batches(batch_size, seed, epoch, caption_dropout)[index]


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


def _resize_crop(img: Image.Image, size: tuple[int, int], crop: str, rng: random.Random) -> Image.Image:
    tw, th = size
    scale = max(tw / img.width, th / img.height)
    nw, nh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    if crop == "random":
        left, top = rng.randint(0, nw - tw), rng.randint(0, nh - th)
    else:
        left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def load_image_folder(folder: str | Path, options: DatasetOptions | None = None, seed: int = 0) -> ImageDataset:
    """Return the usable images of ``folder`` with captions, resized and cropped; skipped files are reported.

    A same-name ``.txt`` file is the caption; otherwise the template is filled with the trigger and class noun.

    Raises:
        DatasetError: the folder does not exist, or holds no usable image (the message lists why each file was
            skipped), or the options are invalid.
    """
    options = options or DatasetOptions()
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder '{folder}' does not exist or is not a folder")
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

    rng = random.Random(seed)
    dataset = ImageDataset(folder, [], options=options)
    for path in sorted(folder.iterdir()):
        if path.is_dir() or path.suffix.lower() == ".txt" or path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            dataset.skipped.append((path.name, f"not an image file type ({path.suffix or 'no extension'})"))
            continue
        if path.stat().st_size == 0:
            dataset.skipped.append((path.name, "empty file (0 bytes)"))
            continue
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
                    img = ImageOps.exif_transpose(opened)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            dataset.skipped.append((path.name, f"image too large (decompression-bomb guard): {e}"))
            continue
        except (OSError, SyntaxError, ValueError) as e:
            dataset.skipped.append((path.name, f"cannot be read as an image (corrupt or truncated): {e}"))
            continue
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated_allowed
        img, note = _to_rgb(img)
        if note:
            dataset.converted.append((path.name, note))
        size = (
            _bucket_size(img.width, img.height, options.resolution)
            if options.buckets
            else (
                options.resolution,
                options.resolution,
            )
        )
        img = _resize_crop(img, size, options.crop, rng)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        caption_file = path.with_suffix(".txt")
        captioned = caption_file.is_file() and caption_file.read_text(encoding="utf-8", errors="replace").strip()
        caption = (
            caption_file.read_text(encoding="utf-8", errors="replace").strip()
            if captioned
            else options.caption_template.format(trigger=options.trigger, class_noun=options.class_noun)
        )
        dataset.examples.append(Example(path, pixels, caption, bool(captioned)))
    if not dataset.examples:
        reasons = "; ".join(f"{n}: {why}" for n, why in dataset.skipped) or "the folder is empty"
        raise DatasetError(f"no usable image in '{folder}' ({reasons})")
    return dataset


def load_class_images(folder: str | Path, resolution: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """Return up to ``count`` class images from a folder as ``(3, resolution, resolution)`` tensors in [0, 1].

    Raises:
        DatasetError: as ``load_image_folder``.
    """
    ds = load_image_folder(folder, DatasetOptions(resolution=resolution), seed=seed)
    return [e.pixels for e in ds.examples[:count]]
