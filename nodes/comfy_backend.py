"""The trainer's model interface over ComfyUI's MODEL, CLIP and VAE (the only trainer glue).

The trainer injects its LoRA layers into *copies* of the diffusion model and the text encoder:
the MODEL and CLIP in the user's graph stay exactly as they were (other nodes may use them), and
the copies are ordinary tensors, whereas ComfyUI loads weights under ``torch.inference_mode``,
whose tensors cannot be saved for backward. Any LoRA already patched onto the MODEL (e.g. by a
stack before the trainer) is baked into the copy, so training continues from what the graph shows.
Under newer ComfyUI's DynamicVRAM the copies are taken from a non-dynamic clone (``static_patcher``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.utils
import torch

from ..trainer import run_record


@dataclass
class ComfySchedule:
    """The model's own DDPM noise schedule, from ComfyUI's ``model_sampling``."""

    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    prediction_type: str


def schedule_of(model) -> ComfySchedule:
    """Return the noise schedule and prediction type of a ComfyUI MODEL.

    Raises:
        ValueError: the model is not a discrete-time epsilon or v-prediction model (e.g. flow matching).
    """
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        prediction = "v_prediction"
    elif isinstance(sampling, comfy.model_sampling.EPS):
        prediction = "epsilon"
    else:
        raise ValueError(
            f"Train LoRA supports epsilon and v-prediction models; this one uses {type(sampling).__name__}"
        )
    sigmas = sampling.sigmas.detach().float().cpu()
    # ComfyUI stores sigma_t = sqrt((1 - a_t) / a_t); invert to the cumulative alphas.
    return ComfySchedule(1.0 / (1.0 + sigmas**2), len(sigmas), prediction)


def ldm_to_diffusers_names(model) -> dict[str, str]:
    """Return ``{ldm module path: diffusers module path}`` for the UNet, from ComfyUI's own table.

    Kohya files name UNet modules by their diffusers path; ComfyUI's modules use the ldm path.
    """
    table = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {ldm[: -len(".weight")]: diff[: -len(".weight")] for diff, ldm in table.items() if diff.endswith(".weight")}


def static_patcher(model):
    """Return a ModelPatcher whose loaded modules hold ordinary, fully patched weights (safe to copy).

    Newer ComfyUI's "DynamicVRAM" (default on NVIDIA GPUs) loads layers whose weights live in self-freeing
    native buffers, may split them between CPU and GPU, and applies LoRAs patched before a node on the fly;
    deep-copying such live layers is unsafe. There, a non-dynamic clone is made (ComfyUI reloads the model for
    it, carrying every patch, as its own trainer does). Elsewhere (ComfyUI 0.3.x, ``--cpu``,
    ``--disable-dynamic-vram``) the MODEL itself is returned.
    """
    is_dynamic = getattr(model, "is_dynamic", None)
    if callable(is_dynamic) and is_dynamic():
        return model.clone(disable_dynamic=True)
    return model


def _clone_input(_module, args):
    return (args[0].clone(), *args[1:])


def _keep_layer_norm_inputs(module: torch.nn.Module) -> None:
    """Let autograd train through ComfyUI's CLIP, whose layers add the residual in place (``x += attn(ln(x))``).

    LayerNorm saves its input for the backward pass, and the in-place add then changes it ("modified by an
    inplace operation"). Each LayerNorm of the trainer's own copy gets a clone of its input instead; the graph's
    CLIP is not touched.
    """
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.register_forward_pre_hook(_clone_input)


class ComfyModelApi:
    """``trainer.model_api`` over ComfyUI objects: encode prompts and images, predict noise, generate."""

    def __init__(self, model, clip, vae, train_text_encoder: bool = False):
        self.model = model
        self.clip = clip
        self.vae = vae
        source = static_patcher(model)
        comfy.model_management.load_models_gpu([source])
        self.device = model.load_device
        with torch.inference_mode(False):
            self.unet = copy.deepcopy(source.model.diffusion_model).float().requires_grad_(False)
            self.text_encoder = None
            if train_text_encoder:
                clip.load_model()
                self.text_encoder = copy.deepcopy(clip.cond_stage_model).float().requires_grad_(False)
                _keep_layer_norm_inputs(self.text_encoder)
        self.schedule = schedule_of(model)
        self._latent_format = model.model.latent_format
        self._identity: dict[str, str] | None = None

    def identity(self) -> dict[str, str]:
        """Return digests of the base UNet (with any LoRA patched before the trainer), of the conditioning a
        probe prompt gets (the text encoder as the graph uses it: its weights, patches and clip skip) and of
        the VAE weights."""
        if self._identity is None:
            with torch.no_grad():
                probe = self.clip.encode_from_tokens(self.clip.tokenize("a photo of a dog"))
            self._identity = {
                "unet": run_record.weights_digest(self.unet),
                "text_encoder": run_record.tensor_digest(probe),
                "vae": run_record.weights_digest(self.vae.first_stage_model),
            }
        return self._identity

    def fingerprint(self) -> str:
        """Return one short string for ``identity()`` (keys the class-image cache)."""
        return run_record.combined(self.identity())

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Return cross-attention conditioning ``(B, 77, dim)``; differentiable through a trained text encoder."""
        outs = []
        for prompt in prompts:
            tokens = self.clip.tokenize(prompt)
            if self.text_encoder is not None:
                # The graph's clip skip (CLIPSetLastLayer), set as CLIP.encode_from_tokens sets it for inference.
                self.text_encoder.reset_clip_options()
                if self.clip.layer_idx is not None:
                    self.text_encoder.set_clip_options({"layer": self.clip.layer_idx})
                cond = self.text_encoder.encode_token_weights(tokens)[0]
            else:
                with torch.no_grad():
                    cond = self.clip.encode_from_tokens(tokens).clone()
            outs.append(cond.to(self.device, torch.float32))
        return torch.cat(outs, dim=0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Return the diffusion model's latents for images ``(B, 3, H, W)`` in [0, 1]."""
        with torch.no_grad():
            latents = self.vae.encode(images.movedim(1, -1).cpu())
        return self._latent_format.process_in(latents.float()).to(self.device).clone()

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Return the UNet output (epsilon or v) for DDPM-scaled noisy latents at integer timesteps."""
        return self.unet(noisy_latents, timesteps.float(), context=cond)

    @torch.no_grad()
    def generate(self, prompt: str, n: int, seed: int, size: int, steps: int = 20) -> torch.Tensor:
        """Return ``n`` images ``(n, 3, size, size)`` in [0, 1] sampled by the frozen MODEL (class images)."""
        positive = [[self.clip.encode_from_tokens(self.clip.tokenize(prompt)), {}]]
        negative = [[self.clip.encode_from_tokens(self.clip.tokenize("")), {}]]
        latent = torch.zeros(n, 4, size // 8, size // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(
            self.model, noise, steps, 6.0, "euler", "normal", positive, negative, latent, seed=seed, disable_pbar=True
        )
        images = self.vae.decode(samples)
        return images.movedim(-1, 1).clamp(0, 1).float()
