"""Measurements through ComfyUI's own model objects, independent of the trainer's code: denoising error of a
MODEL on fixed noise and noise levels, and the conditioning a CLIP gives."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def subject_latents(model, vae, folder, size: int = 64) -> torch.Tensor:
    """Return the model-space latents of the images in ``folder`` (center-cropped squares of ``size``)."""
    images = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg")):
        img = Image.open(path).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
        images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
    with torch.no_grad():
        latents = vae.encode(torch.stack(images))
    return model.model.latent_format.process_in(latents.float())


def conditioning(clip, text: str) -> torch.Tensor:
    """Return the cross-attention conditioning ``clip`` gives ``text`` (as CLIPTextEncode computes it)."""
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(text)).float()


def denoise_error(model, latents: torch.Tensor, cond: torch.Tensor, seed: int = 0, draws: int = 4) -> float:
    """Return the mean squared error of ``model``'s denoised prediction against ``latents``.

    Fixed noise and noise levels (from ``seed``), ``draws`` per latent, evaluated through ComfyUI's own
    ``load_models_gpu`` and ``BaseModel.apply_model``, so a MODEL with patches is measured as it samples.
    """
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    sampling = model.get_model_object("model_sampling")
    gen = torch.Generator().manual_seed(seed)
    x0 = latents.repeat(draws, 1, 1, 1)
    t = torch.randint(100, 900, (x0.shape[0],), generator=gen)
    sigma = sampling.sigmas[t].float()
    noise = torch.randn(x0.shape, generator=gen)
    noisy = sampling.noise_scaling(sigma, noise, x0)
    with torch.no_grad(), torch.inference_mode():
        denoised = model.model.apply_model(noisy, sigma, c_crossattn=cond.expand(x0.shape[0], -1, -1))
    return float(((denoised.float() - x0) ** 2).mean())
