"""The tiny SD2-v, SDXL, Flux and SD3 models work with ComfyUI's own sampling, VAE and LoRA key maps."""

from __future__ import annotations

import pytest
import torch

from lora_workbench.headless import comfy_compat, tiny_families

pytestmark = pytest.mark.slow

# Per family: what ComfyUI must see. Sampling names are classes of comfy.model_sampling; the LoRA names
# are the kohya ones trainers write (diffusers-path UNet names for SD2/SDXL, ComfyUI-path ones for the
# transformers; te1/te2 for the first and second text encoder).
EXPECTED = {
    "sd2v": dict(
        family="sd2",
        config="SD20",
        sampling="V_PREDICTION",
        latent_channels=4,
        unet_keys=[
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k",
        ],
        clip_keys=["lora_te_text_model_encoder_layers_0_self_attn_q_proj"],
    ),
    "sdxl": dict(
        family="sdxl",
        config="SDXL",
        sampling="EPS",
        latent_channels=4,
        unet_keys=[
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v",
            "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_2",
        ],
        clip_keys=[
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
        ],
    ),
    "flux": dict(
        family="flux",
        config="Flux",
        sampling="CONST",
        latent_channels=16,
        unet_keys=["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"],
        clip_keys=[
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_encoder_block_0_layer_0_SelfAttention_q",
        ],
    ),
    "sd3": dict(
        family="sd3",
        config="SD3",
        sampling="CONST",
        latent_channels=16,
        unet_keys=["lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_transformer_transformer_blocks_0_attn_to_q"],
        clip_keys=[
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
        ],
    ),
}
# "Tiny": a ceiling per part, far below any real model (the smallest real UNet has 860M parameters).
MAX_PARAMETERS = 10_000_000
SIZE = 64  # pixels; latents are 8x8


@pytest.fixture(scope="session", params=list(EXPECTED))
def tiny(request, comfy) -> tuple[str, tiny_families.TinyModel]:
    """Each family built once per session (pytest groups the tests by family)."""
    return request.param, tiny_families.build(request.param)


def _encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _sample(model, positive, negative, channels: int) -> torch.Tensor:
    import comfy.sample

    latent = torch.zeros(1, channels, SIZE // 8, SIZE // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    return comfy.sample.sample(model, noise, 2, 1.0, "euler", "normal", positive, negative, latent)


def test_model_is_what_the_checkpoint_loader_returns(tiny):
    import comfy.model_sampling

    name, m = tiny
    want = EXPECTED[name]
    assert m.family == want["family"]
    assert isinstance(m.model, comfy_compat.checkpoint_model_patcher_class())
    assert type(m.model.model.model_config).__name__ == want["config"]
    sampling = getattr(comfy.model_sampling, want["sampling"])
    assert isinstance(m.model.model.model_sampling, sampling), type(m.model.model.model_sampling).__mro__
    assert m.vae.latent_channels == want["latent_channels"]
    assert m.model.model.latent_format.latent_channels == want["latent_channels"]


def test_every_weight_is_initialised_and_float32(tiny):
    name, m = tiny
    parts = {"model": m.model.model, "clip": m.clip.cond_stage_model, "vae": m.vae.first_stage_model}
    for part, module in parts.items():
        params = dict(module.named_parameters())
        count = sum(p.numel() for p in params.values())
        assert 0 < count <= MAX_PARAMETERS, f"{name} {part}: {count} parameters"
        bad = [k for k, p in params.items() if not torch.isfinite(p).all()]
        assert not bad, f"{name} {part}: non-finite {bad[:5]}"
        dtypes = {p.dtype for p in params.values()}
        assert dtypes == {torch.float32}, f"{name} {part}: {dtypes}"


def test_conditioning_has_the_widths_the_model_takes(tiny):
    name, m = tiny
    unet = m.model.model.model_config.unet_config
    with torch.inference_mode():
        [[cond, extra]] = _encode(m.clip, "a photo")
    pooled = extra["pooled_output"]
    if name in ("sd2v", "sdxl"):
        assert cond.shape[-1] == unet["context_dim"]
    elif name == "flux":
        assert cond.shape[-1] == unet["context_in_dim"]
        assert pooled.shape[-1] == unet["vec_in_dim"]
    else:
        assert cond.shape[-1] == unet["context_embedder_config"]["params"]["in_features"]
        assert pooled.shape[-1] == unet["adm_in_channels"]
    if name == "sdxl":
        # model_base.SDXL appends six 256-wide size embeddings to the pooled CLIP-G output.
        assert pooled.shape[-1] + 6 * 256 == unet["adm_in_channels"]
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()


def test_comfy_sampling_gives_finite_latents_that_follow_the_prompt(tiny):
    name, m = tiny
    channels = EXPECTED[name]["latent_channels"]
    # Under inference mode, as ComfyUI's executor runs nodes.
    with torch.inference_mode():
        negative = _encode(m.clip, "")
        photo = _sample(m.model, _encode(m.clip, "a photo"), negative, channels)
        cat = _sample(m.model, _encode(m.clip, "a cat"), negative, channels)
    assert photo.shape == (1, channels, SIZE // 8, SIZE // 8)
    assert torch.isfinite(photo).all()
    # Different prompts, different latents: the conditioning reaches the model.
    assert not torch.equal(photo, cat)


def test_vae_decodes_and_encodes_64_pixels(tiny):
    name, m = tiny
    channels = EXPECTED[name]["latent_channels"]
    latent_in = torch.randn(1, channels, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        image = m.vae.decode(latent_in)
        latent = m.vae.encode(image[..., :3])
    assert image.shape == (1, SIZE, SIZE, 3)
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    assert latent.shape == (1, channels, SIZE // 8, SIZE // 8)
    assert torch.isfinite(latent).all()


def test_comfy_lora_key_maps_hold_the_kohya_names(tiny):
    import comfy.lora

    name, m = tiny
    unet_map = comfy.lora.model_lora_keys_unet(m.model.model, {})
    clip_map = comfy.lora.model_lora_keys_clip(m.clip.cond_stage_model, {})
    unet_sd, clip_sd = m.model.model.state_dict(), m.clip.cond_stage_model.state_dict()
    for key in EXPECTED[name]["unet_keys"]:
        assert key in unet_map, f"{name}: {key} not in ComfyUI's UNet key map"
        target = unet_map[key]
        # SD3's diffusers names map to (weight key, slice) tuples for the fused qkv.
        target = target[0] if isinstance(target, tuple) else target
        assert target in unet_sd, f"{name}: {key} -> {target}, which the model lacks"
    for key in EXPECTED[name]["clip_keys"]:
        assert key in clip_map, f"{name}: {key} not in ComfyUI's text encoder key map"
        assert clip_map[key] in clip_sd


def test_build_is_a_function_of_the_seed_and_leaves_the_callers_rng_alone(comfy):
    # Flux only: the cheapest build, and every family goes through the same seeded path.
    torch.manual_seed(1)
    a = tiny_families.build("flux")
    after = torch.rand(4)
    torch.manual_seed(2)
    b = tiny_families.build("flux")
    torch.manual_seed(1)
    assert torch.equal(torch.rand(4), after), "build consumed or reseeded the caller's random stream"
    for part in ("model", "clip"):
        sa = getattr(a, part).get_sd() if part == "clip" else a.model.model.state_dict()
        sb = getattr(b, part).get_sd() if part == "clip" else b.model.model.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{part} differs between two builds"


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="'sd15'"):
        tiny_families.build("sd15")
