"""The small interface through which the trainer sees a diffusion model.

Two implementations: ``trainer.diffusers_backend.DiffusersModelApi`` (library use, fast tests, the
reference comparison) and ``nodes.comfy_backend.ComfyModelApi`` (ComfyUI's MODEL, CLIP and VAE).
"""

from __future__ import annotations

from typing import Protocol

import torch


class NoiseSchedule(Protocol):
    """The model's own discrete DDPM schedule."""

    alphas_cumprod: torch.Tensor  # (T,) float32, cumulative product of (1 - beta_t)
    num_train_timesteps: int  # T
    prediction_type: str  # "epsilon" or "v_prediction"


class ModelApi(Protocol):
    """What the training loop needs from a model.

    The loop injects LoRA layers into ``unet`` (and ``text_encoder``) in place, so ``predict_noise`` and
    ``encode_prompts`` must run those very module objects (not copies made earlier): that is how the LoRA takes
    effect. The loop removes the layers again and restores the modules' flags afterwards; an implementation
    that must not let training touch a shared model (ComfyUI's MODEL) hands the loop copies here.
    ``generate``, ``identity`` and ``fingerprint`` are called before injection, on the frozen base.

    Attributes:
        unet: the denoiser module LoRA layers are injected into. Its attention projections are named
            ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (diffusers and ComfyUI's ldm UNet agree).
        text_encoder: the text encoder to inject into when training it (projections ``q_proj``,
            ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``, ``fc2``), or None.
        schedule: the noise schedule and prediction type.
        device: where tensors for the model go.
    """

    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None
    schedule: NoiseSchedule
    device: torch.device

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Return cross-attention conditioning ``(B, tokens, dim)`` float32 on ``device``, one row per prompt.

        Deterministic (the loop caches it when the text encoder is frozen). Must run ``text_encoder`` with
        autograd enabled so gradients reach LoRA layers injected there; no ``torch.no_grad`` inside.
        """

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Return the latents the denoiser trains on for images ``(B, 3, H, W)`` float32 in [0, 1].

        Scaled as the denoiser expects (SD: ``vae.encode(2x - 1) * scaling_factor``), ``(B, C, H/f, W/f)`` on
        ``device``. Deterministic (the loop encodes each image once); called under ``torch.no_grad``.
        """

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Return the denoiser output (epsilon or v, per ``schedule.prediction_type``).

        ``noisy_latents = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` with ``a_t = schedule.alphas_cumprod[t]``;
        ``timesteps`` is an int64 tensor ``(B,)`` of integer steps in ``[0, T)``; ``cond`` comes from
        ``encode_prompts``. The output has the latents' shape and must be computed by ``unet``.
        """

    def generate(self, prompt: str, n: int, seed: int, size: int) -> torch.Tensor:
        """Return ``n`` images ``(n, 3, size, size)`` float32 in [0, 1] sampled by the frozen base model.

        Used for DreamBooth class images; the same arguments must give the same images (seeded sampler).
        """

    def identity(self) -> dict[str, str]:
        """Return ``{part: digest}`` identifying the base model (UNet, text encoder with its clip skip, VAE).

        Recorded in checkpoints: a run resumes only on the model it was trained on.
        """

    def fingerprint(self) -> str:
        """Return one short string for ``identity()`` (keys the class-image cache)."""
