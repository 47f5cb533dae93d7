"""The small interface through which the trainer sees a diffusion model.

Two implementations: ``trainer.diffusers_backend.DiffusersModelApi`` (library use, fast tests, the
reference comparison) and ``nodes.comfy_backend.ComfyModelApi`` (ComfyUI's MODEL, CLIP and VAE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class NoiseSchedule(Protocol):
    """The model's own noise schedule: discrete DDPM (epsilon, v) or flow matching."""

    alphas_cumprod: torch.Tensor | None  # (T,) float32, cumulative product of (1 - beta_t); None for flow
    num_train_timesteps: int  # T
    prediction_type: str  # "epsilon", "v_prediction" or "flow" (velocity noise - x0)
    # flow only: u in [0, 1] -> the model's (shifted) sigma, e.g. SD3's shift 3, Flux's resolution shift
    flow_sigma: Callable[[torch.Tensor], torch.Tensor] | None


class ModelApi(Protocol):
    """What the training loop needs from a model.

    The loop injects LoRA layers into ``unet`` (and ``text_encoder``) in place, so ``predict_noise`` and
    ``encode_prompts`` must run those very module objects (not copies made earlier): that is how the LoRA takes
    effect. The loop removes the layers again, putting every original layer object back, and restores the
    modules' flags afterwards, so a shared model (ComfyUI's MODEL) can be handed over as it is.
    ``generate``, ``identity`` and ``fingerprint`` are called before injection, on the frozen base.

    Optional members, used when present: ``architecture`` ("unet", "flux", "mmdit": which target presets apply;
    default "unet"), ``prepare_for_training(batch_size)`` (called after images and frozen prompts are encoded,
    before injection: load what training needs) and ``end_training()`` (after removal), ``checkpoint_blocks()``
    (the blocks gradient checkpointing recomputes) with ``blocks_change_inputs`` (they add to their inputs in
    place), ``text_encoder_prefix`` (the kohya prefix of the text encoder's names, or a function of a module
    path giving it, e.g. SDXL's ``lora_te1``/``lora_te2``), ``dtype`` (the base's compute dtype: fp16 turns on
    loss scaling on CUDA).

    Attributes:
        unet: the denoiser module LoRA layers are injected into. In a UNet its attention projections are named
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

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor | dict[str, torch.Tensor]:
        """Return the conditioning float32 on ``device``, one row per prompt: a cross-attention tensor
        ``(B, tokens, dim)``, or a dict of such batched tensors (``trainer.conds``; ComfyUI's pooled output ...).

        Deterministic (the loop caches it when the text encoder is frozen). Must run ``text_encoder`` with
        autograd enabled so gradients reach LoRA layers injected there; no ``torch.no_grad`` inside.
        """

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Return the latents the denoiser trains on for images ``(B, 3, H, W)`` float32 in [0, 1].

        Scaled as the denoiser expects (SD: ``vae.encode(2x - 1) * scaling_factor``), ``(B, C, H/f, W/f)`` on
        ``device``. Deterministic (the loop encodes each image once); called under ``torch.no_grad``.
        """

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        """Return the denoiser output (epsilon, v or flow velocity, per ``schedule.prediction_type``).

        DDPM: ``noisy_latents = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` with ``a_t = schedule.alphas_cumprod[t]``
        and ``timesteps`` an int64 tensor ``(B,)`` of integer steps in ``[0, T)``. Flow: ``timesteps`` are the
        sigmas ``(B,)`` in [0, 1] and ``noisy_latents = sigma * noise + (1 - sigma) * x0``. ``cond`` comes from
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
