"""Tiny diffusers components built from configs (no download): for tests, benchmarks and library demos."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tiny_tokenizer(words: Sequence[str] = (), merges: Sequence[tuple[str, str]] = (), max_length: int = 16):
    """Return a real CLIPTokenizer over every byte-level character, its end-of-word form, and ``words``.

    ``merges`` are BPE merges; every token a merge produces must be in the vocabulary (``words``).
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + list(words))}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length)


def tiny_parts(tokenizer=None, sample_size: int = 8, vae_scaling_factor: float | None = None, seed: int = 0):
    """Return ``(unet, text_encoder, tokenizer, vae, scheduler)``: a tiny SD-shaped set, frozen, from ``seed``.

    UNet channels (32, 64) with cross-attention dim 32, a 2-layer width-32 CLIP text encoder, a 2-block VAE
    (2x downsampling) and a 1000-step DDPM scheduler. ``vae_scaling_factor`` None keeps diffusers' default.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=16,
            bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1,
            pad_token_id=len(tokenizer) - 1,
        )
    )
    vae_config = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    if vae_scaling_factor is not None:
        vae_config["scaling_factor"] = vae_scaling_factor
    vae = AutoencoderKL(**vae_config)
    for m in (unet, text_encoder, vae):
        m.requires_grad_(False)
    return unet, text_encoder, tokenizer, vae, DDPMScheduler(num_train_timesteps=1000)
