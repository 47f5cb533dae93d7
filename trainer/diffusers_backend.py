"""``trainer.model_api`` over diffusers components (library use, fast tests, the reference comparison)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import run_record


@dataclass
class DiffusersSchedule:
    """The DDPM schedule of a diffusers scheduler config."""

    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    prediction_type: str


class DiffusersModelApi:
    """The model interface over a UNet2DConditionModel, a CLIP text encoder + tokenizer, a VAE and a scheduler.

    Args:
        unet: ``diffusers.UNet2DConditionModel``.
        text_encoder: ``transformers.CLIPTextModel``.
        tokenizer: its tokenizer.
        vae: ``AutoencoderKL`` (latents scaled by its ``scaling_factor``) or ``AutoencoderTiny``.
        scheduler: a diffusers DDPM-family scheduler (its ``alphas_cumprod`` and prediction type are used).
    """

    def __init__(self, unet, text_encoder, tokenizer, vae, scheduler, device: str | torch.device = "cpu"):
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.schedule = DiffusersSchedule(
            scheduler.alphas_cumprod.float(),
            scheduler.config.num_train_timesteps,
            scheduler.config.prediction_type,
        )
        self._scale = getattr(vae.config, "scaling_factor", 1.0)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Return the text encoder's last hidden state ``(B, max_length, dim)`` (padded to the tokenizer's length).

        Runs ``self.text_encoder`` with autograd on, so an injected text-encoder LoRA trains.
        """
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].float()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Return ``vae.encode(2 * images - 1) * scaling_factor`` for images ``(B, 3, H, W)`` in [0, 1].

        Takes the distribution's mode (deterministic, so latents can be encoded once), where diffusers' script
        samples; with SD's VAE the difference is far below the noise added in training.
        """
        x = images.to(self.device, torch.float32) * 2 - 1
        encoded = self.vae.encode(x)
        if hasattr(encoded, "latent_dist"):
            return encoded.latent_dist.mode() * self._scale
        return encoded.latents * self._scale

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Return ``unet(noisy_latents, timesteps, encoder_hidden_states=cond).sample`` (epsilon or v)."""
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=cond).sample

    @torch.no_grad()
    def generate(self, prompt: str, n: int, seed: int, size: int, steps: int = 10) -> torch.Tensor:
        """Return ``n`` images ``(n, 3, size, size)`` in [0, 1] from ``steps`` DDIM steps (no guidance, eta 0).

        Seeded: the same arguments give the same images. Decodes with the VAE's scaling factor.
        """
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn((n, self.unet.config.in_channels, size // factor, size // factor), generator=gen)
        latents = latents.to(self.device) * sched.init_noise_sigma
        cond = self.encode_prompts([prompt] * n)
        for t in sched.timesteps:
            pred = self.unet(latents, t, encoder_hidden_states=cond).sample
            latents = sched.step(pred, t, latents).prev_sample
        images = self.vae.decode(latents / self._scale).sample
        return ((images + 1) / 2).clamp(0, 1).float()

    def identity(self) -> dict[str, str]:
        """Return digests of the UNet, text encoder and VAE weights (see ``run_record.weights_digest``)."""
        return {
            "unet": run_record.weights_digest(self.unet),
            "text_encoder": run_record.weights_digest(self.text_encoder),
            "vae": run_record.weights_digest(self.vae),
        }

    def fingerprint(self) -> str:
        """Return one short string for ``identity()`` (keys the class-image cache)."""
        return run_record.combined(self.identity())
