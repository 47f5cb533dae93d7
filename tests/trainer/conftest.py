"""Tiny diffusers models built from configs (no download), one set per session, and a tiny dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from lora_workbench.trainer import tiny_models
from lora_workbench.trainer.diffusers_backend import DiffusersModelApi

TRIGGER = "sks"


# Whole words (and the pieces their merges pass through) so the prompts tokenize as words, not characters.
WORDS = ["sk", "sks</w>", "do", "dog</w>", "to", "toy</w>", "ph", "pho", "phot", "photo</w>", "of</w>"]
MERGES = [
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


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """Factory-fresh tiny UNet, CLIP text encoder, tokenizer, VAE and DDPM scheduler (fixed seeds)."""
    # This random VAE's latents have a std of about 0.23; SD's 0.18215 would shrink them to ~0.04, where the
    # noise hides the images and almost no training signal is left. 4.0 brings them near unit variance, as
    # SD's factor does for SD's own VAE.
    unet, text_encoder, tokenizer, vae, scheduler = tiny_models.tiny_parts(
        tiny_models.tiny_tokenizer(WORDS, MERGES), vae_scaling_factor=4.0
    )
    for m in (unet, text_encoder, vae):
        m.eval()
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


def _blue(i: int):
    """A class image: the subject's layout with red and blue swapped (a blue disc: 'a toy', not 'sks toy')."""
    import numpy as np

    return Image.fromarray(np.asarray(draw_subject(i))[..., ::-1].copy())


def _square(i: int):
    img = Image.new("RGB", (16, 16), (40, 160, 60))
    ImageDraw.Draw(img).rectangle([3 + i % 3, 3, 11 + i % 3, 12], fill=(250, 250, 250))
    return img


@pytest.fixture(scope="session")
def pretrained(tiny_parts, tmp_path_factory):
    """A tiny model that already knows its classes: the UNet fully trained for 150 steps on blue discs
    ("a photo of toy") and green squares ("a photo of dog"), and the folders of subject and class images.

    DreamBooth's effects only show on a base model that fits its class: a random UNet's loss is ~1.1 and any
    training mostly fixes that, whatever the prompt or the prior loss. After this its class loss is ~0.09.
    Returns ``(parts, subject_folder, class_folder)``; built once per session (~10 s on one core).
    """
    import copy

    from lora_workbench.trainer import objective

    base = tmp_path_factory.mktemp("pretrained")
    folders = {}
    for name, fn in (("subject", draw_subject), ("class", _blue), ("dog", _square)):
        folders[name] = base / name
        folders[name].mkdir()
        for i in range(6):
            fn(i).save(folders[name] / f"{name}_{i}.png")
    unet, text_encoder, tokenizer, vae, scheduler = tiny_parts
    unet = copy.deepcopy(unet)
    api = DiffusersModelApi(unet, text_encoder, tokenizer, vae, scheduler)

    def pixels(folder):
        return torch.stack(
            [
                torch.from_numpy(__import__("numpy").asarray(Image.open(p), dtype="float32") / 255).permute(2, 0, 1)
                for p in sorted(folder.glob("*.png"))
            ]
        )

    with torch.no_grad():
        x = torch.cat([api.encode_images(pixels(folders["class"])), api.encode_images(pixels(folders["dog"]))])
        cond = api.encode_prompts(["a photo of toy"] * 6 + ["a photo of dog"] * 6)
    unet.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        objective.per_example_loss(api, x, cond, gen).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    unet.requires_grad_(False).eval()
    return (unet, text_encoder, tokenizer, vae, scheduler), folders["subject"], folders["class"]
