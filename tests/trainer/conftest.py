"""Tiny diffusers models built from configs (no download), one set per session, and a tiny dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from lora_workbench.trainer.diffusers_backend import DiffusersModelApi

TRIGGER = "sks"


def _tokenizer():
    """A real CLIPTokenizer over a tiny vocabulary: every byte-level character, its end-of-word form, a few words."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    words = ["sk", "sks</w>", "do", "dog</w>", "to", "toy</w>", "ph", "pho", "phot", "photo</w>", "of</w>"]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + words)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [
        ("s", "k"),
        ("sk", "s</w>"),
        ("d", "o"),
        ("do", "g</w>"),
        ("t", "o"),
        ("to", "y</w>"),
        ("p", "h"),
        ("ph", "o"),
        ("pho", "t"),
        ("phot", "o</w>"),
        ("o", "f</w>"),
    ]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """Factory-fresh tiny UNet, CLIP text encoder, tokenizer, VAE and DDPM scheduler (fixed seeds)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        # This random VAE's latents have a std of about 0.23; SD's 0.18215 would shrink them to ~0.04, where the
        # noise hides the images and almost no training signal is left. 4.0 brings them near unit variance, as
        # SD's factor does for SD's own VAE.
        scaling_factor=4.0,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    for m in (unet, text_encoder, vae):
        m.requires_grad_(False).eval()
    return unet, text_encoder, tokenizer, vae, scheduler


@pytest.fixture
def model_api(tiny_parts):
    """A model interface over the session's tiny parts (LoRA layers are removed after each run)."""
    return DiffusersModelApi(*tiny_parts)


def draw_subject(i: int, size: int = 16) -> Image.Image:
    """A small image of a made-up subject: an orange disc with a dark bar, varied a little per index."""
    img = Image.new("RGB", (size, size), (200 - 10 * (i % 3), 210, 220))
    d = ImageDraw.Draw(img)
    o = i % 3
    d.ellipse([2 + o, 2, size - 3 + o - 2, size - 3], fill=(230, 120, 30))
    d.rectangle([4, size - 6, size - 5, size - 4], fill=(30, 30, 30))
    return img


@pytest.fixture
def subject_folder(tmp_path) -> Path:
    """Six subject images; half captioned."""
    folder = tmp_path / "subject"
    folder.mkdir()
    for i in range(6):
        draw_subject(i).save(folder / f"img_{i}.png")
        if i % 2:
            (folder / f"img_{i}.txt").write_text(f"a photo of {TRIGGER} toy")
    return folder


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; more threads only fight other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def draw():
    """The subject drawing function (conftest modules are not importable in importlib mode)."""
    return draw_subject
