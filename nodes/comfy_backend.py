"""The trainer's model interface over ComfyUI's MODEL, CLIP and VAE, for every family ComfyUI loads.

Training goes through ComfyUI's own model object, so there is no second copy of the base:

- the LoRA layers are injected into the *live* diffusion model (and text encoder) ComfyUI loaded, in the dtype
  and on the device it loaded them (fp16, bf16, fp8 ...); only the LoRA parameters train, in float32. The layers
  are removed afterwards and every original module object is put back, so the graph's MODEL and CLIP are
  unchanged (the trainer's ``inject.remove_adapter``);
- ComfyUI loads weights under ``torch.inference_mode``, whose tensors autograd cannot save for the backward pass.
  Each such tensor is replaced by an ordinary one that shares its memory (``_make_autograd_safe``): nothing is
  copied;
- noise levels, network inputs and conditioning come from the model's own machinery: ``model_sampling`` (epsilon,
  v-prediction, flow matching with its shift) and ``extra_conds`` (SDXL's pooled and size conditioning, Flux's
  guidance, ...), through ``BaseModel.apply_model``, as ComfyUI samples. The network's raw output (epsilon, v or
  velocity) is what the trainer's loss compares;
- ComfyUI's model management loads what training needs (text encoders are used first, then may be unloaded)
  with room for the activations of a training step.

Under newer ComfyUI's DynamicVRAM (NVIDIA GPUs) the layers' weights live in self-freeing buffers that cannot take
LoRA layers; there a non-dynamic clone is trained (``static_patcher``; ComfyUI's own trainer always clones).
Weight patches of the MODEL (a LoRA loaded before the trainer) take part as ComfyUI patched them; sampling-time
patches (attention or block patches from other nodes) are not applied during training.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.utils
import torch
import torch.utils.dlpack

from ..trainer import run_record
from .model_family import model_family

# Denoiser architecture per family (the trainer's target presets are per architecture).
_ARCHITECTURE = {"flux": "flux", "sd3": "mmdit"}
# Text encoders of multi-encoder families, as kohya names them (SDXL's te1/te2; Flux's CLIP-L is te1).
_TEXT_ENCODER_PREFIX = {"clip_l": "lora_te1", "clip_g": "lora_te2", "t5xxl": "lora_te3"}
# A training step keeps the activations of the forward pass for the backward one: ComfyUI's estimate of one
# inference forward, times this, is what is freed before loading (a generous rule of thumb, not a measurement).
_TRAINING_MEMORY_FACTOR = 3


@dataclass
class ComfySchedule:
    """The model's noise schedule, from ComfyUI's ``model_sampling``.

    DDPM models (epsilon, v): ``alphas_cumprod`` and ``sigmas`` per integer step. Flow matching ("flow"):
    ``flow_sigma`` maps ``u`` in [0, 1] to the model's (shifted) sigma.
    """

    alphas_cumprod: torch.Tensor | None
    num_train_timesteps: int
    prediction_type: str
    sigmas: torch.Tensor | None = None
    flow_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None


def schedule_of(model) -> ComfySchedule:
    """Return the noise schedule and prediction type of a ComfyUI MODEL.

    Raises:
        ValueError: the model predicts something the trainer has no loss for (EDM, x0, image-to-image models).
    """
    sampling = model.get_model_object("model_sampling")
    kind = next(
        (
            name
            for cls, name in (
                (getattr(comfy.model_sampling, "EDM", None), None),
                (comfy.model_sampling.V_PREDICTION, "v_prediction"),
                (getattr(comfy.model_sampling, "X0", None), None),
                (comfy.model_sampling.EPS, "epsilon"),
                (comfy.model_sampling.CONST, "flow"),
            )
            if cls is not None and isinstance(sampling, cls)
        ),
        None,
    )
    if kind is None:
        raise ValueError(
            "Train LoRA supports epsilon, v-prediction and flow-matching models; this one predicts with "
            f"{type(sampling).__name__}"
        )
    if kind == "flow":
        # Flux's sampling takes t in [0, 1]; SD3's discrete-flow sampling t in [0, multiplier].
        scale = float(getattr(sampling, "multiplier", 1.0))
        return ComfySchedule(None, 1000, "flow", flow_sigma=lambda u: sampling.sigma(u * scale).float())
    sigmas = sampling.sigmas.detach().float().cpu()
    # ComfyUI stores sigma_t = sqrt((1 - a_t) / a_t); invert to the cumulative alphas.
    return ComfySchedule(1.0 / (1.0 + sigmas**2), len(sigmas), kind, sigmas=sigmas)


def ldm_to_diffusers_names(model) -> dict[str, str]:
    """Return ``{ldm module path: diffusers module path}`` for a UNet, from ComfyUI's own table.

    Kohya files name UNet modules by their diffusers path; ComfyUI's modules use the ldm path.
    """
    table = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {ldm[: -len(".weight")]: diff[: -len(".weight")] for diff, ldm in table.items() if diff.endswith(".weight")}


def static_patcher(model):
    """Return a ModelPatcher whose loaded modules hold ordinary, fully patched weights (LoRA layers can wrap them).

    Newer ComfyUI's "DynamicVRAM" (default on NVIDIA GPUs) loads layers whose weights live in self-freeing
    native buffers, may split them between CPU and GPU, and applies LoRAs patched before a node on the fly.
    There, a non-dynamic clone is made (ComfyUI reloads the model for it, carrying every patch, as its own
    trainer does). Elsewhere (ComfyUI 0.3.x, ``--cpu``, ``--disable-dynamic-vram``) the MODEL itself is returned.
    """
    is_dynamic = getattr(model, "is_dynamic", None)
    if callable(is_dynamic) and is_dynamic():
        return model.clone(disable_dynamic=True)
    return model


def _make_autograd_safe(module: torch.nn.Module) -> int:
    """Replace each inference-mode parameter and buffer of ``module`` by an ordinary tensor with the same values.

    ComfyUI creates and loads weights under ``torch.inference_mode``; autograd refuses to save such tensors for
    the backward pass ("Inference tensors do not track version counter"), and every frozen layer a gradient
    passes through needs its weight saved. The replacement shares the weight's memory (``_ordinary_tensor``), so
    nothing is copied; the module keeps its parameter names and values (new Parameter objects, as ComfyUI's own
    weight patching makes).

    Returns:
        How many tensors were replaced.
    """
    replaced = copied = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                # A new Parameter object: one made in inference mode keeps lacking a version counter even
                # when its data is swapped, and views of it (indexing, peft's reshapes) then fail.
                if p.is_inference():
                    t, was_copied = _ordinary_tensor(p)
                    setattr(sub, name, torch.nn.Parameter(t, requires_grad=p.requires_grad))
                    replaced, copied = replaced + 1, copied + was_copied
            for name, b in list(sub.named_buffers(recurse=False)):
                if b is not None and b.is_inference():
                    sub._buffers[name], was_copied = _ordinary_tensor(b)
                    replaced, copied = replaced + 1, copied + was_copied
    if copied:
        _give_freed_memory_back()
    return replaced


def _ordinary_tensor(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Return an ordinary tensor with the values of the inference tensor ``t``, and whether it is a copy.

    A tensor made from ``t``'s DLPack capsule shares its memory and is created outside inference mode, so autograd
    can save it. Where the device or dtype has no DLPack form, it is a copy."""
    try:
        shared = torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t.detach()))
    except (RuntimeError, TypeError, ValueError, BufferError):
        shared = None
    if shared is None or shared.is_inference() or shared.data_ptr() != t.data_ptr():
        return t.clone(), True
    return shared, False


def _give_freed_memory_back() -> None:
    """Return freed heap memory to the system (glibc keeps it otherwise: measured 0.2x the base model's size of
    resident memory after copying weights on the CPU, ``benchmarks/bench_train_memory.py``). A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RecomputedInBackward(torch.autograd.Function):
    """A frozen layer that autograd keeps no weight of: the forward pass runs without autograd, and the backward
    pass runs the layer again on the saved input to get the input's gradient.

    For layers that bring their weight to the compute device (or dtype) at each call, as ComfyUI's layers do when
    their weights stay in CPU memory (low-VRAM loading, ``offload``) or are stored in another dtype (fp8 with
    manual casting): autograd would otherwise keep every such on-the-fly copy until the backward pass, a term as
    large as the model. The recomputation brings the weight over again, so at most a layer's copy is alive.
    """

    @staticmethod
    def forward(ctx, x, layer_forward):
        ctx.layer_forward = layer_forward
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return layer_forward(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            x = x.detach().requires_grad_(True)
            out = ctx.layer_forward(x)
        (grad_x,) = torch.autograd.grad(out, x, grad_output)
        return grad_x, None


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def recompute_cast_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Make every layer of ``module`` that casts its weight at each call (ComfyUI's ``comfy_cast_weights``: weights
    left in CPU memory by low-VRAM loading, or stored in another dtype; linear, conv and norm layers) recompute
    itself in the backward pass instead of leaving its weight copy to autograd (``_RecomputedInBackward``).
    Calls with more than one argument, or whose input needs no gradient, run as before.

    Returns:
        The layers changed (``restore_forward`` undoes it).
    """
    changed = []
    for layer in module.modules():
        if not getattr(layer, "comfy_cast_weights", False):
            continue  # its weights are where it computes, in its dtype: autograd keeps no copy
        if "forward" in layer.__dict__:
            continue  # already wrapped by someone else: leave it

        def forward(x, *args, _forward=layer.forward, **kwargs):
            if args or kwargs or not (torch.is_grad_enabled() and x.requires_grad):
                return _forward(x, *args, **kwargs)  # nothing upstream needs a gradient through this layer
            return _RecomputedInBackward.apply(x, _forward)

        layer.forward = forward
        changed.append(layer)
    return changed


def restore_forward(layers: list[torch.nn.Module]) -> None:
    """Undo ``recompute_cast_layers`` (the instance attribute shadowed the class's forward)."""
    for layer in layers:
        layer.__dict__.pop("forward", None)


def _clone_input(_module, args):
    return (args[0].clone(), *args[1:])


def _keep_layer_norm_inputs(module: torch.nn.Module) -> list:
    """Let autograd train through ComfyUI modules that add residuals in place (``x += attn(ln(x))``: its CLIP,
    Flux's and SD3's blocks).

    LayerNorm saves its input for the backward pass, and the in-place add then changes it ("modified by an
    inplace operation"). Each LayerNorm gets a clone of its input instead, while the text encoder trains.

    Returns:
        The hook handles (remove them when training ends).
    """
    return [m.register_forward_pre_hook(_clone_input) for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]


def checkpoint_blocks(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """Return the blocks to recompute in the backward pass (gradient checkpointing), for any architecture.

    The elements of the model's top-level block lists: ResBlocks, spatial transformers and up/down samplers of a
    UNet (whose ``TimestepEmbedSequential`` containers are unpacked: ComfyUI calls their layers one by one), Flux's
    double- and single-stream blocks, SD3's joint blocks. Single layers (a lone conv or linear) are left out.
    """
    blocks = []

    def add(container):
        for child in container.children():
            if isinstance(child, torch.nn.Sequential):
                add(child)
            elif any(True for _ in child.children()):
                blocks.append(child)

    for child in diffusion_model.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            add(child)
    return blocks


def _architecture(model, family: str | None) -> str:
    """Return the denoiser architecture the trainer's target presets know ("unet", "flux", "mmdit"), or
    "transformer" for another family (its layers are then named with ``custom_targets``)."""
    if family in _ARCHITECTURE:
        return _ARCHITECTURE[family]
    unet_config = getattr(model.model.model_config, "unet_config", {}) or {}
    return "unet" if "num_res_blocks" in unet_config else "transformer"


class ComfyModelApi:
    """``trainer.model_api`` over ComfyUI objects: encode prompts and images, predict, generate class images."""

    def __init__(self, model, clip, vae, train_text_encoder: bool = False, offload: bool = False):
        self.model = model
        self.offload = offload
        self.clip = clip
        self.vae = vae
        self.family = model_family(model)
        self.architecture = _architecture(model, self.family)
        # ComfyUI's transformer blocks add residuals to their inputs in place; its UNet blocks do not.
        self.blocks_change_inputs = self.architecture != "unet"
        self.source = static_patcher(model)
        self.base = self.source.model
        self.unet = self.base.diffusion_model
        self.device = model.load_device
        self.dtype = self.base.manual_cast_dtype or self.base.get_dtype()
        self.text_encoder = clip.cond_stage_model if train_text_encoder else None
        self.schedule = schedule_of(model)
        self.unet_name_map = ldm_to_diffusers_names(model) if self.architecture == "unet" else {}
        self._latent_format = self.base.latent_format
        self._identity: dict[str, str] | None = None
        self._largest_latent: tuple[int, ...] | None = None
        self._hooks: list = []
        self._recomputed: list[torch.nn.Module] = []
        self.notes: list[str] = []
        self._raw_output: torch.Tensor | None = None
        self._was_in_training = None

    def text_encoder_prefix(self, path: str) -> str:
        """Return the kohya prefix of a text-encoder module path: ``lora_te`` for a family with one text encoder
        (SD1, SD2); ``lora_te1``/``lora_te2`` for SDXL's CLIP-L/CLIP-G (and Flux's and SD3's CLIP-L/G)."""
        encoders = [
            n for n, _ in self.clip.cond_stage_model.named_children() if n in _TEXT_ENCODER_PREFIX or "clip" in n
        ]
        if len(encoders) <= 1:
            return "lora_te"
        return _TEXT_ENCODER_PREFIX.get(path.split(".", 1)[0], "lora_te")

    def identity(self) -> dict[str, str]:
        """Return digests of the base denoiser (with any LoRA patched before the trainer), of the conditioning a
        probe prompt gets (the text encoder as the graph uses it: its weights, patches and clip skip) and of
        the VAE weights."""
        if self._identity is None:
            with torch.no_grad():
                probe = self.clip.encode_from_tokens(self.clip.tokenize("a photo of a dog"))
                comfy.model_management.load_models_gpu([self.source])
            self._identity = {
                "unet": run_record.weights_digest(self.unet),
                "text_encoder": run_record.tensor_digest(probe),
                "vae": run_record.weights_digest(self.vae.first_stage_model),
            }
        return self._identity

    def fingerprint(self) -> str:
        """Return one short string for ``identity()`` (keys the class-image cache)."""
        return run_record.combined(self.identity())

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Return the conditioning of each prompt as the graph's CLIP gives it, batched: ``cross_attn``
        ``(B, tokens, dim)`` plus what the encoders add (``pooled_output`` ...), float32 on the model's device;
        differentiable through a trained text encoder."""
        outs = []
        for prompt in prompts:
            tokens = self.clip.tokenize(prompt)
            if self.text_encoder is not None:
                encoded = self._encode_trained(tokens)
            else:
                with torch.no_grad():
                    encoded = self.clip.encode_from_tokens(tokens, return_dict=True)
            cond = {"cross_attn": encoded.pop("cond")}
            cond.update({k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)})
            outs.append({k: v.to(self.device, torch.float32) for k, v in cond.items()})
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def _encode_trained(self, tokens) -> dict:
        # CLIP.encode_from_tokens without its load_model call (the encoder is loaded for training, with LoRA
        # layers in it, and must stay as it is): the graph's clip skip (CLIPSetLastLayer) and device options.
        model = self.text_encoder
        model.reset_clip_options()
        if self.clip.layer_idx is not None:
            model.set_clip_options({"layer": self.clip.layer_idx})
        model.set_clip_options({"execution_device": self.clip.patcher.load_device})
        out = model.encode_token_weights(tokens)
        return {"cond": out[0], "pooled_output": out[1], **(out[2] if len(out) > 2 else {})}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Return the diffusion model's latents for images ``(B, 3, H, W)`` in [0, 1]."""
        with torch.no_grad():
            latents = self.vae.encode(images.movedim(1, -1).cpu())
        latents = self._latent_format.process_in(latents.float()).to(self.device).clone()
        if self._largest_latent is None or latents[0].numel() > _numel(self._largest_latent):
            self._largest_latent = tuple(latents.shape[1:])
        return latents

    def prepare_for_training(self, batch_size: int) -> None:
        """Load the denoiser (and a trained text encoder) with room for a training step of ``batch_size`` of the
        largest latents encoded so far: fully, or with ``offload`` as much as fits (ComfyUI keeps the rest in
        CPU memory and brings each layer over when it runs); make their weights usable by autograd; watch the
        raw output."""
        memory = 0
        if self._largest_latent is not None:
            shape = (batch_size, *self._largest_latent)
            memory = _TRAINING_MEMORY_FACTOR * self.base.memory_required(shape)
        patchers = [self.source] + ([self.clip.patcher] if self.text_encoder is not None else [])
        comfy.model_management.load_models_gpu(patchers, memory_required=memory, force_full_load=not self.offload)
        trained = [self.unet] + ([self.text_encoder] if self.text_encoder is not None else [])
        for module in trained:
            _make_autograd_safe(module)
            self._recomputed += recompute_cast_layers(module)
        if self._recomputed:
            self.notes.append(
                f"{len(self._recomputed)} layers bring their weights over at each call (kept in CPU memory or "
                "another dtype) and are recomputed in the backward pass"
            )
        if self.text_encoder is not None:
            self._hooks += _keep_layer_norm_inputs(self.text_encoder)
        if self.blocks_change_inputs:
            # Flux's and SD3's blocks add their residuals in place (``x += ...``) after a LayerNorm saved x.
            self._hooks += _keep_layer_norm_inputs(self.unet)
        self._hooks.append(self.unet.register_forward_hook(self._keep_raw_output))
        # Some ComfyUI models avoid in-place operations while this is set (newer ComfyUI's own trainer sets it).
        if hasattr(comfy.model_management, "in_training"):
            self._was_in_training = comfy.model_management.in_training
            comfy.model_management.in_training = True

    def end_training(self) -> None:
        """Remove the hooks ``prepare_for_training`` added (the trainer has removed its LoRA layers)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        restore_forward(self._recomputed)
        self._recomputed.clear()
        self._raw_output = None
        if self._was_in_training is not None:
            comfy.model_management.in_training = self._was_in_training
            self._was_in_training = None

    def checkpoint_blocks(self) -> list[torch.nn.Module]:
        """Return the denoiser's blocks to recompute in the backward pass (see ``checkpoint_blocks``)."""
        return checkpoint_blocks(self.unet)

    def _keep_raw_output(self, _module, _args, output):
        self._raw_output = output

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """Return the network's own output (epsilon, v or flow velocity) for noisy latents, through ComfyUI's
        ``apply_model``.

        DDPM models: ``noisy_latents`` are DDPM-scaled and ``timesteps`` integer steps; the input ComfyUI expects is
        ``x0 + sigma * noise``, i.e. the DDPM latents times ``sqrt(1 + sigma^2)``. Flow models: ``timesteps`` are
        the sigmas and the latents are ``sigma * noise + (1 - sigma) * x0`` as they are.
        """
        if self.schedule.prediction_type == "flow":
            sigma, x = timesteps.float(), noisy_latents
        else:
            sigma = self.schedule.sigmas.to(noisy_latents.device)[timesteps]
            x = noisy_latents * (1 + sigma**2).sqrt().view(-1, *[1] * (noisy_latents.dim() - 1))
        self._raw_output = None
        self.base.apply_model(x, sigma, **self._model_conds(cond, x))
        if self._raw_output is None:
            raise RuntimeError("ComfyUI's apply_model did not run the diffusion model (prepare_for_training first)")
        out, self._raw_output = self._raw_output, None
        return out

    def _model_conds(self, cond: dict, x: torch.Tensor) -> dict:
        """Return ``apply_model``'s keyword arguments for a batch: the model's ``extra_conds`` of the conditioning
        (cross-attention, pooled output, SDXL's size conditioning at the latents' pixel size, Flux's guidance)."""
        extra = {k: v for k, v in cond.items() if k != "cross_attn"}
        height, width = x.shape[-2] * 8, x.shape[-1] * 8  # as ComfyUI's samplers derive them from the latent
        made = self.base.extra_conds(
            cross_attn=cond["cross_attn"],
            device=x.device,
            noise=x,
            width=width,
            height=height,
            target_width=width,
            target_height=height,
            **extra,
        )
        return {k: c.process_cond(batch_size=x.shape[0], device=x.device, area=None).cond for k, c in made.items()}

    @torch.no_grad()
    def generate(self, prompt: str, n: int, seed: int, size: int, steps: int = 20) -> torch.Tensor:
        """Return ``n`` images ``(n, 3, size, size)`` in [0, 1] sampled by the frozen MODEL (class images)."""

        def conditioning(text):
            encoded = self.clip.encode_from_tokens(self.clip.tokenize(text), return_dict=True)
            return [[encoded.pop("cond"), encoded]]

        images = self.sample_images(self.model, conditioning(prompt), conditioning(""), n, seed, size, steps, 6.0)
        return images.movedim(-1, 1)

    @torch.no_grad()
    def sample_images(self, patcher, positive, negative, n: int, seed: int, size: int, steps: int, cfg: float):
        """Return ``n`` images ``(n, size, size, 3)`` in [0, 1] sampled by ComfyUI (Euler, normal schedule) from
        ``patcher`` with ComfyUI conditionings, from the noise of ``seed``, decoded by the graph's VAE.

        Flow models (Flux, SD3) are sampled without classifier-free guidance (``cfg`` is then 1).
        """
        factor = getattr(self.vae, "downscale_ratio", 8)
        factor = factor if isinstance(factor, int) else 8
        side = max(1, size // factor)
        latent = torch.zeros(n, self._latent_format.latent_channels, side, side)
        noise = comfy.sample.prepare_noise(latent, seed)
        cfg = 1.0 if self.schedule.prediction_type == "flow" else cfg
        samples = comfy.sample.sample(
            patcher, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed, disable_pbar=True
        )
        return self.vae.decode(samples).clamp(0, 1).float()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
