"""Tiny models of more ComfyUI model families (SD2 v-prediction, SDXL, Flux, SD3), built in-process.

For tests and benchmarks: no download, no network, a fixed seed, float32, built on the CPU in about
a second each. Every module is one of ComfyUI's own classes, so state dict keys, LoRA key maps,
conditioning and sampling are ComfyUI's; only the sizes are small, and every parameter is initialised
explicitly (``tiny_model._initialise``), as ComfyUI's ops skip initialisation.

The diffusion model is built the way ``comfy.sd.load_state_dict_guess_config`` builds a checkpoint's
(``model_config.get_model`` from a ``comfy.supported_models`` class, wrapped in the loader's
``ModelPatcher`` class), not read from a file: ComfyUI recognises SDXL only by its exact transformer
depths, and on 0.3.75 a Flux file only at full width (its detection fixes 24 heads of 128 channels).

The text encoders are ComfyUI's own classes too (``SD2ClipModel``, ``SDXLClipModel``, Flux's
``clip_l`` + ``t5xxl``, SD3's ``clip_l`` + ``clip_g``) inside a real ``comfy.sd.CLIP``, made tiny through
the option ComfyUI itself reads: ``model_options["<name>_model_config"]`` overrides keys of a text
model's JSON config (``sd1_clip.SDClipModel``). Their tokenizers are the real ones. The VAE is a
TAESD of ComfyUI's class with the family's latent channels, loaded through ``comfy.sd.VAE``.

Usage (ComfyUI imported first, ``comfy_env.import_comfy_core``)::

    tiny = build("sdxl")
    cond = tiny.clip.encode_from_tokens_scheduled(tiny.clip.tokenize("a photo"))
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from .tiny_model import _initialise

log = logging.getLogger(__name__)

SEED = 20261205
# The family names ``build`` takes, each with the name ``TinyModel.family`` reports.
FAMILIES = {"sd2v": "sd2", "sdxl": "sdxl", "flux": "flux", "sd3": "sd3"}

# Text encoders: overrides of ComfyUI's JSON configs. Three layers, because SD2's and SDXL's CLIPs read
# the penultimate layer and ComfyUI asserts abs(layer_idx) < num_layers. Vocabularies, position counts
# and end tokens stay as ComfyUI's configs have them, so the real tokenizers fit.
CLIP_L_CONFIG = {"num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
CLIP_G_CONFIG = {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
CLIP_H_CONFIG = {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
T5_CONFIG = {"num_layers": 2, "d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128}
# The pooled vector ComfyUI's SDXL model takes is CLIP-G's projected pooled output (width = hidden
# size: ComfyUI's text projection is square) plus six 256-wide size embeddings (model_base.SDXL).
SDXL_SIZE_EMBEDDINGS = 6 * 256
# SD3's text encoder pads the CLIP-L + CLIP-G conditioning to T5-XXL's width (fixed in ComfyUI).
SD3_CONTEXT_WIDTH = 4096

# UNets with the keys model_detection.detect_unet_config reports, so that ComfyUI's diffusers name table
# (comfy.utils.unet_to_diffusers, behind the kohya LoRA names) covers them. num_heads/num_head_channels
# come from the model config class (64-channel heads for SD2 and SDXL).
_UNET_COMMON = dict(
    use_checkpoint=False,
    image_size=32,
    use_spatial_transformer=True,
    legacy=False,
    in_channels=4,
    out_channels=4,
    model_channels=64,
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth_middle=1,
    use_linear_in_transformer=True,
    use_temporal_resblock=False,
    use_temporal_attention=False,
)
SD2_UNET_CONFIG = dict(
    _UNET_COMMON,
    adm_in_channels=None,
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    context_dim=CLIP_H_CONFIG["hidden_size"],
)
# As in SDXL, no attention at the first level (its down_blocks.0 has no attentions).
SDXL_UNET_CONFIG = dict(
    _UNET_COMMON,
    num_classes="sequential",
    adm_in_channels=CLIP_G_CONFIG["hidden_size"] + SDXL_SIZE_EMBEDDINGS,
    transformer_depth=[0, 1],
    transformer_depth_output=[0, 0, 1, 1],
    context_dim=CLIP_L_CONFIG["hidden_size"] + CLIP_G_CONFIG["hidden_size"],
)
# Flux.1-dev's layout (guidance embedding, 2x2 patches, 16 latent channels) at 64 wide: two heads of 32
# channels, whose rotary axes (4 + 14 + 14) sum to the head width as ComfyUI requires.
FLUX_UNET_CONFIG = dict(
    image_model="flux",
    in_channels=16,
    out_channels=16,
    vec_in_dim=CLIP_L_CONFIG["hidden_size"],
    context_in_dim=T5_CONFIG["d_model"],
    hidden_size=64,
    mlp_ratio=4.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=[4, 14, 14],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=True,
)
# SD3's MMDiT fixes 64-channel heads and a width of 64 * depth: depth 2 is two joint blocks, 128 wide.
SD3_POS_EMBED_MAX_SIZE = 16
SD3_UNET_CONFIG = dict(
    in_channels=16,
    out_channels=16,
    patch_size=2,
    depth=2,
    input_size=None,
    adm_in_channels=CLIP_L_CONFIG["hidden_size"] + CLIP_G_CONFIG["hidden_size"],
    context_embedder_config={
        "target": "torch.nn.Linear",
        "params": {"in_features": SD3_CONTEXT_WIDTH, "out_features": 128},
    },
    num_patches=SD3_POS_EMBED_MAX_SIZE**2,
    pos_embed_max_size=SD3_POS_EMBED_MAX_SIZE,
    pos_embed_scaling_factor=None,
    x_block_self_attn_layers=[],
)


@dataclass
class TinyModel:
    """A tiny model of one family, as ComfyUI's checkpoint loader would hand it out.

    Attributes:
        model: the diffusion model, a ``comfy.model_patcher.ModelPatcher`` (CheckpointLoaderSimple's MODEL).
        clip: the text encoders, a ``comfy.sd.CLIP``.
        vae: a ``comfy.sd.VAE`` (TAESD) with the family's latent channels.
        family: ``"sd2"``, ``"sdxl"``, ``"flux"`` or ``"sd3"``.
    """

    model: Any
    clip: Any
    vae: Any
    family: str


def build(family: str) -> TinyModel:
    """Build the tiny model of ``family`` from ``SEED`` (same weights every call).

    Args:
        family: ``"sd2v"`` (SD2.x, v-prediction), ``"sdxl"``, ``"flux"`` (Flux.1-dev layout) or ``"sd3"``
            (SD3 with its two CLIPs, no T5).

    Returns:
        The model, text encoders and VAE, in float32 on the CPU (ComfyUI moves them to its devices when
        it runs them).

    Raises:
        ValueError: if ``family`` is not one of those.
        RuntimeError: if ComfyUI has not been imported yet (``comfy_env.import_comfy_core``).
    """
    if family not in FAMILIES:
        raise ValueError(f"tiny model family {family!r} unknown; choose one of {sorted(FAMILIES)}")
    if "comfy.cli_args" not in sys.modules:  # what import_comfy_core (and ComfyUI's own start) imports first
        raise RuntimeError("tiny_families.build needs ComfyUI imported first: call comfy_env.import_comfy_core()")
    import torch

    builders = {"sd2v": _build_sd2v, "sdxl": _build_sdxl, "flux": _build_flux, "sd3": _build_sd3}
    # Seed a forked CPU generator: the caller's random stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model, clip, latent_channels = builders[family]()
        vae = _taesd(latent_channels)
    return TinyModel(model=model, clip=clip, vae=vae, family=FAMILIES[family])


def _build_sd2v():
    import comfy.model_base
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip

    config = comfy.supported_models.SD20(SD2_UNET_CONFIG)
    # SD20.model_type tells v-prediction from eps by the spread of a norm in output block 11, which a
    # tiny UNet lacks; BASE.get_model (SD20 keeps it) is this construction with the type it would find.
    model = _model_patcher(
        config, lambda cfg, device: comfy.model_base.BaseModel(cfg, comfy.model_base.ModelType.V_PREDICTION, device)
    )
    clip = _clip(
        comfy.text_encoders.sd2_clip.SD2Tokenizer,
        comfy.text_encoders.sd2_clip.SD2ClipModel,
        {"clip_h_model_config": CLIP_H_CONFIG},
    )
    return model, clip, 4


def _build_sdxl():
    import comfy.sdxl_clip
    import comfy.supported_models

    config = comfy.supported_models.SDXL(SDXL_UNET_CONFIG)
    model = _model_patcher(config, lambda cfg, device: cfg.get_model({}, "", device=device))
    clip = _clip(
        comfy.sdxl_clip.SDXLTokenizer,
        comfy.sdxl_clip.SDXLClipModel,
        {"clip_l_model_config": CLIP_L_CONFIG, "clip_g_model_config": CLIP_G_CONFIG},
    )
    return model, clip, 4


def _build_flux():
    import comfy.supported_models
    import comfy.text_encoders.flux

    from .comfy_compat import flux_unet_config

    config = comfy.supported_models.Flux(flux_unet_config(FLUX_UNET_CONFIG))
    model = _model_patcher(config, lambda cfg, device: cfg.get_model({}, "", device=device))
    clip = _clip(
        comfy.text_encoders.flux.FluxTokenizer,
        comfy.text_encoders.flux.flux_clip(),
        {"clip_l_model_config": CLIP_L_CONFIG, "t5xxl_model_config": T5_CONFIG},
    )
    return model, clip, 16


def _build_sd3():
    import comfy.supported_models
    import comfy.text_encoders.sd3_clip
    import torch

    config = comfy.supported_models.SD3(SD3_UNET_CONFIG)

    def make_model(cfg, device):
        out = cfg.get_model({}, "", device=device)
        # A buffer, not a parameter (real checkpoints carry their sin-cos table): fill it like a learned one.
        with torch.no_grad():
            out.diffusion_model.pos_embed.normal_(0.0, 0.02)
        return out

    model = _model_patcher(config, make_model)
    # No T5: ComfyUI's SD3 text encoder joins T5's tokens to the CLIP ones only at T5-XXL's full width
    # (4096), so a tiny T5 cannot be used; SD3 without T5 is a configuration ComfyUI supports.
    clip = _clip(
        comfy.text_encoders.sd3_clip.SD3Tokenizer,
        comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False),
        {"clip_l_model_config": CLIP_L_CONFIG, "clip_g_model_config": CLIP_G_CONFIG},
    )
    return model, clip, 16


def _model_patcher(model_config, make_model):
    """Build the diffusion model on the CPU in float32, initialise it, wrap it as the loader does."""
    import comfy.model_management
    import torch

    from .comfy_compat import checkpoint_model_patcher_class

    # The loader's choice for a float32 checkpoint on the CPU: float32 weights, no manual cast.
    model_config.set_inference_dtype(torch.float32, None)
    model = make_model(model_config, torch.device("cpu"))
    _initialise(model.diffusion_model)
    _check_buffers(model.diffusion_model, type(model_config).__name__)
    patcher_class = checkpoint_model_patcher_class()
    return patcher_class(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def _clip(tokenizer_class, clip_class, te_configs: dict):
    """A ``comfy.sd.CLIP`` of ``clip_class`` with the text model configs overridden, initialised."""
    import comfy.sd
    import comfy.supported_models_base
    import torch

    target = comfy.supported_models_base.ClipTarget(tokenizer_class, clip_class)
    # Built on the CPU whatever the load device, so the seed gives the same weights on every machine.
    options = {"dtype": torch.float32, "initial_device": torch.device("cpu"), **te_configs}
    clip = comfy.sd.CLIP(target, model_options=options)
    _initialise(clip.cond_stage_model)
    _check_buffers(clip.cond_stage_model, clip_class.__name__)
    return clip


def _taesd(latent_channels: int):
    """A TAESD of ComfyUI's class, initialised, loaded through ``comfy.sd.VAE`` (which reads its channels)."""
    import comfy.sd
    import comfy.taesd.taesd
    import torch

    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    _initialise(taesd)
    # float32 as the rest (ComfyUI would pick bf16 on a GPU that has it).
    return comfy.sd.VAE(sd=taesd.state_dict(), dtype=torch.float32)


def _check_buffers(module, what: str) -> None:
    import torch

    bad = [n for n, b in module.named_buffers() if b.is_floating_point() and not torch.isfinite(b).all()]
    if bad:
        raise RuntimeError(f"tiny {what}: buffers left uninitialised: {bad[:5]}")
