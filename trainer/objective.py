"""The DreamBooth objective: the loss of the model family (epsilon, v or flow matching) with the model's own
schedule, plus prior preservation."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..lora.safeio import atomic_write_bytes

log = logging.getLogger(__name__)


def noisy_latents(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Return ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` (DDPM forward process) for ``(B, C, H, W)`` latents."""
    a = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def target_for(
    prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod
) -> torch.Tensor:
    """Return what the model should predict: the noise (epsilon) or ``v = sqrt(a) noise - sqrt(1-a) x0``.

    Raises:
        ValueError: an unknown prediction type.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    raise ValueError(f"unknown prediction type '{prediction_type}'")


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Return per-example Min-SNR-gamma loss weights ``(B,)`` (Hang et al. 2023, https://arxiv.org/abs/2303.09556).

    ``min(snr, gamma) / snr`` for epsilon prediction and ``min(snr, gamma) / (snr + 1)`` for v-prediction, with
    ``snr = a_t / (1 - a_t)``, as diffusers' training scripts compute it.
    """
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def sample_noise(
    shape: tuple[int, ...], generator: torch.Generator, noise_offset: float = 0.0, device: torch.device | None = None
) -> torch.Tensor:
    """Return float32 Gaussian noise of ``shape`` (latents' ``(B, C, ...)``) on ``device``, plus a per-channel
    offset when ``noise_offset`` > 0. Drawn on the CPU from ``generator``, so the values do not depend on the
    device."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    if noise_offset:
        offset = torch.randn((shape[0], shape[1], *[1] * (len(shape) - 2)), generator=generator)
        noise = noise + noise_offset * offset.to(device)
    return noise


def sample_timesteps(schedule, n: int, generator: torch.Generator, sampling: str = "auto") -> torch.Tensor:
    """Return ``n`` training timesteps drawn from ``generator``, as the model family is trained.

    DDPM schedules (epsilon, v): int64 steps in ``[0, T)``. Flow matching: float32 sigmas in ``[0, 1]``, where
    ``u`` in ``(0, 1)`` is mapped through the model's own shift (``schedule.flow_sigma``). ``sampling``: "uniform"
    draws ``u`` uniformly, "logit_normal" as ``sigmoid(N(0, 1))`` (SD3's and Flux's training, most weight on the
    middle noise levels); "auto" is uniform for DDPM schedules and logit-normal for flow matching.

    Raises:
        ValueError: an unknown ``sampling``.
    """
    if sampling not in ("auto", "uniform", "logit_normal"):
        raise ValueError(f"unknown timestep sampling '{sampling}' (auto, uniform or logit_normal)")
    flow = schedule.prediction_type == "flow"
    if sampling == "logit_normal" or (sampling == "auto" and flow):
        u = torch.sigmoid(torch.randn(n, generator=generator))
    elif flow:
        u = torch.rand(n, generator=generator)
    else:
        return torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator)
    if flow:
        return schedule.flow_sigma(u).float()
    return (u * schedule.num_train_timesteps).long().clamp(max=schedule.num_train_timesteps - 1)


def per_example_loss(
    model_api,
    latents: torch.Tensor,
    cond,
    generator: torch.Generator,
    *,
    noise_offset: float = 0.0,
    min_snr_gamma: float = 0.0,
    timestep_sampling: str = "auto",
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the denoising MSE of each example ``(B,)``: one forward pass over the whole batch.

    Timesteps (see ``sample_timesteps``) and noise are drawn from ``generator`` unless given (evaluation on fixed
    noise). The objective follows the model's own schedule: for DDPM models the epsilon or v target of the
    forward process, with min-SNR weights when ``min_snr_gamma`` > 0; for flow matching (rectified flow, SD3 and
    Flux) ``x_t = sigma * noise + (1 - sigma) * x0`` and the velocity target ``noise - x0``.

    Raises:
        ValueError: an unknown prediction type or timestep sampling, or min-SNR asked of a flow model.
    """
    schedule = model_api.schedule
    if timesteps is None:
        timesteps = sample_timesteps(schedule, latents.shape[0], generator, timestep_sampling)
    timesteps = timesteps.to(latents.device)
    if noise is None:
        noise = sample_noise(latents.shape, generator, noise_offset, latents.device)
    if schedule.prediction_type == "flow":
        if min_snr_gamma:
            raise ValueError("min_snr_gamma weights DDPM noise levels; flow-matching models train without it")
        sigma = timesteps.float().view(-1, *[1] * (latents.dim() - 1))
        noisy = sigma * noise + (1 - sigma) * latents
        target = noise - latents
    else:
        noisy = noisy_latents(latents, noise, timesteps, schedule.alphas_cumprod)
        target = target_for(schedule.prediction_type, latents, noise, timesteps, schedule.alphas_cumprod)
    pred = model_api.predict_noise(noisy, timesteps, cond).float()
    loss = ((pred - target) ** 2).mean(dim=tuple(range(1, pred.dim())))
    if min_snr_gamma:
        loss = loss * min_snr_weights(timesteps, schedule.alphas_cumprod, min_snr_gamma, schedule.prediction_type)
    return loss


def dreambooth_loss(
    per_example: torch.Tensor, n_instance: int, prior_loss_weight: float, count: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Split a concatenated batch (instance examples first, then class examples) into the DreamBooth loss.

    ``total = mean(instance) + prior_loss_weight * mean(class)``, the DreamBooth objective
    (Ruiz et al. 2022, https://arxiv.org/abs/2208.12242) as diffusers' example trains it: both halves come from
    one forward pass over the concatenated batch. ``count``: when ``per_example`` is one process's part of a
    larger batch, that batch's number of instance examples (and of class examples): each half's sum is divided
    by it, so the parts' losses (and gradients) add up to the whole batch's.

    Returns:
        ``(total, instance_loss, prior_loss)``; ``prior_loss`` is None without class examples.
    """
    count = count or n_instance
    instance = per_example[:n_instance].sum() / count
    if per_example.shape[0] == n_instance:
        return instance, instance, None
    prior = per_example[n_instance:].sum() / count
    return instance + prior_loss_weight * prior, instance, prior


CLASS_IMAGE_CHUNK = 4  # images sampled per call: memory stays that of a batch of 4, whatever the count


def class_images(
    model_api,
    prompt: str,
    count: int,
    seed: int,
    size: int,
    cache_dir: str | Path | None = None,
    folder: str | Path | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    fingerprint: str | None = None,
) -> torch.Tensor:
    """Return DreamBooth class images ``(N, 3, size, size)`` in [0, 1] (CPU, float32).

    From ``folder`` when given (its first ``count`` usable images, resized and center-cropped). Otherwise generated
    by ``model_api.generate`` in chunks of ``CLASS_IMAGE_CHUNK`` (call this before injecting LoRA layers: the class
    images must come from the frozen base model), each chunk seeded from ``(seed, chunk)``, with
    ``progress(done, count)`` after each chunk. With ``cache_dir`` they are cached as PNG under
    ``cache_dir/class_images/<key>/``, where the key covers the prompt, count, seed, size and the model
    (``fingerprint``, default ``model_api.fingerprint()``: UNet, text encoder and VAE); every file is written
    atomically, so an interrupted generation resumes at the first incomplete chunk.

    Raises:
        trainer.dataset.DatasetError: ``folder`` is missing or holds no usable image.
    """
    if folder:
        from .dataset import load_class_images

        return torch.stack(load_class_images(folder, size, count))
    model = fingerprint or model_api.fingerprint()
    key = hashlib.sha256(f"{prompt}|{count}|{seed}|{size}|{model}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) / "class_images" / key if cache_dir else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    images = []
    for start in range(0, count, CLASS_IMAGE_CHUNK):
        n = min(CLASS_IMAGE_CHUNK, count - start)
        files = [cache / f"{i:04d}.png" for i in range(start, start + n)] if cache is not None else []
        if files and all(f.is_file() for f in files):
            images += [_read_png(f) for f in files]
        else:
            chunk_seed = int(hashlib.sha256(f"{seed}:{start}".encode()).hexdigest()[:15], 16)
            chunk = model_api.generate(prompt, n, chunk_seed, size).detach().float().cpu().clamp(0, 1)
            for img, path in zip(chunk, files):
                arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                png = io.BytesIO()
                Image.fromarray(arr).save(png, format="PNG")
                atomic_write_bytes(path, png.getvalue())
            # Read back what was written so a first run trains on exactly the pixels later runs reuse (8-bit).
            images += [_read_png(f) for f in files] if files else list(chunk)
        if progress is not None:
            progress(start + n, count)
    if cache is not None:
        (cache / "about.json").write_text(json.dumps({"prompt": prompt, "count": count, "seed": seed, "size": size}))
        log.info("%d class images in %s", count, cache)
    return torch.stack(images)


def _read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def fit_images(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Return ``images (N, 3, H, W)`` scaled to cover ``height x width`` and center-cropped to it.

    Used to give class images the size of an aspect-ratio bucket so they share the instance batch's forward pass.
    """
    if images.shape[-2:] == (height, width):
        return images
    scale = max(height / images.shape[-2], width / images.shape[-1])
    h, w = max(height, round(images.shape[-2] * scale)), max(width, round(images.shape[-1] * scale))
    resized = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (h - height) // 2, (w - width) // 2
    return resized[..., top : top + height, left : left + width].clamp(0, 1)
