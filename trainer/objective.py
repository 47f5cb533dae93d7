"""The DreamBooth objective: noise-prediction loss with the model's own schedule, plus prior preservation."""

from __future__ import annotations

import torch


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


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str):
    """Return per-example Min-SNR-gamma loss weights (Hang et al. 2023, https://arxiv.org/abs/2303.09556)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Return Gaussian noise like ``latents``, plus a per-channel offset when ``noise_offset`` > 0."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + noise_offset * offset.to(latents.device)
    return noise


def per_example_loss(
    model_api,
    latents: torch.Tensor,
    cond: torch.Tensor,
    generator: torch.Generator,
    *,
    noise_offset: float = 0.0,
    min_snr_gamma: float = 0.0,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the denoising MSE of each example ``(B,)``: one forward pass over the whole batch.

    Timesteps and noise are drawn from ``generator`` unless given (evaluation on fixed noise).
    """
    schedule = model_api.schedule
    if timesteps is None:
        timesteps = torch.randint(0, schedule.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device)
    if noise is None:
        noise = sample_noise(latents, generator, noise_offset)
    noisy = noisy_latents(latents, noise, timesteps, schedule.alphas_cumprod)
    pred = model_api.predict_noise(noisy, timesteps, cond).float()
    target = target_for(schedule.prediction_type, latents, noise, timesteps, schedule.alphas_cumprod)
    loss = ((pred - target) ** 2).mean(dim=tuple(range(1, pred.dim())))
    if min_snr_gamma:
        loss = loss * min_snr_weights(timesteps, schedule.alphas_cumprod, min_snr_gamma, schedule.prediction_type)
    return loss


def dreambooth_loss(per_example: torch.Tensor, n_instance: int, prior_loss_weight: float):
    """Split a concatenated batch (instance examples first, then class examples) into the DreamBooth loss.

    Returns:
        ``(total, instance_loss, prior_loss)``; ``prior_loss`` is None without class examples.
    """
    instance = per_example[:n_instance].mean()
    if per_example.shape[0] == n_instance:
        return instance, instance, None
    prior = per_example[n_instance:].mean()
    return instance + prior_loss_weight * prior, instance, prior
