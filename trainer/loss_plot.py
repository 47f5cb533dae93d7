"""Draw a loss curve as an RGB image (PIL only): raw losses faint, a moving average on top."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 512, 256
MARGIN = 32


def moving_average(values: list[float], window: int) -> list[float]:
    """Return the trailing moving average of ``values`` (same length; shorter windows at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(losses: list[float], title: str = "loss") -> np.ndarray:
    """Return the loss curve as a ``(HEIGHT, WIDTH, 3)`` float32 array in [0, 1] (ComfyUI's IMAGE layout).

    An empty list gives a blank plot with the title; non-finite values are left out of the scale.
    """
    img = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    d = ImageDraw.Draw(img)
    finite = [v for v in losses if np.isfinite(v)]
    d.text((MARGIN, 8), f"{title}  ({len(losses)} steps)", fill=(0, 0, 0))
    box = (MARGIN, MARGIN, WIDTH - 8, HEIGHT - MARGIN)
    d.rectangle(box, outline=(160, 160, 160))
    if finite:
        lo, hi = min(finite), max(finite)
        span = (hi - lo) or 1.0
        d.text((2, box[1]), f"{hi:.3g}", fill=(0, 0, 0))
        d.text((2, box[3] - 10), f"{lo:.3g}", fill=(0, 0, 0))

        def xy(i: int, v: float) -> tuple[float, float]:
            x = box[0] + (box[2] - box[0]) * (i / max(len(losses) - 1, 1))
            y = box[3] - (box[3] - box[1]) * ((v - lo) / span)
            return x, y

        raw = [xy(i, v) for i, v in enumerate(losses) if np.isfinite(v)]
        if len(raw) > 1:
            d.line(raw, fill=(170, 190, 230), width=1)
        smooth = moving_average(finite, max(1, len(finite) // 10))
        if len(smooth) > 1:
            d.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 200), width=2)
    return np.asarray(img, dtype=np.float32) / 255.0
