"""Draw the small example dataset in ``examples/train_images/`` (a made-up "sks" toy subject).

Run ``python examples/draw_train_images.py`` to redraw it; the images are deterministic, a few KB
each, and shipped so the training example needs no download. Half have a caption file, half
rely on the dataset node's caption template.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent / "train_images"
COUNT = 8
SIZE = 128


def draw(index: int) -> Image.Image:
    """Return image ``index``: the subject (orange body, dark ears, blue collar) at a varied pose."""
    rng = random.Random(index)
    background = tuple(rng.randint(150, 230) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), background)
    d = ImageDraw.Draw(img)
    cx, cy = SIZE // 2 + rng.randint(-14, 14), SIZE // 2 + rng.randint(-10, 10)
    r = rng.randint(28, 36)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(230, 120, 30))
    for side in (-1, 1):
        ex = cx + side * int(r * 0.7)
        d.polygon([(ex - 10, cy - r + 6), (ex + 10, cy - r + 6), (ex, cy - r - 18)], fill=(60, 40, 30))
        d.ellipse([cx + side * 10 - 4, cy - 8, cx + side * 10 + 4, cy], fill=(20, 20, 20))
    d.rectangle([cx - r + 6, cy + r - 12, cx + r - 6, cy + r - 4], fill=(40, 80, 200))
    return img


def main() -> None:
    """Write the images and the captions of the even-numbered ones."""
    HERE.mkdir(exist_ok=True)
    for i in range(COUNT):
        draw(i).save(HERE / f"sks_{i:02d}.jpg", quality=85)
        if i % 2 == 0:
            (HERE / f"sks_{i:02d}.txt").write_text("a photo of sks toy, plain background\n")


if __name__ == "__main__":
    main()
