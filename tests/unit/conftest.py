"""Fixtures for the unit tests: small random LoRA states with SD1-like module names."""

from __future__ import annotations

import pytest
import torch

from lora_workbench.lora.state import LoraModule, LoraState

# (kohya name, out, in, kernel) of a handful of SD1-shaped modules: attention, cross-attention (in=768),
# a conv and a text-encoder projection.
SD1_MODULES = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320, None),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768, None),
    ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0", 64, 48, None),
    ("lora_unet_down_blocks_0_resnets_0_conv1", 32, 16, (3, 3)),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 96, 768, None),
]


def random_state(
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    modules=SD1_MODULES,
    metadata: dict[str, str] | None = None,
    source: str = "",
) -> LoraState:
    """Return a LoraState with random factors (down ~ N(0,1)/sqrt(in), up ~ N(0,1)) for ``modules``."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, out, inp, kernel in modules:
        if kernel is None:
            down = torch.randn(rank, inp, generator=g) / inp**0.5
            up = torch.randn(out, rank, generator=g)
        else:
            down = torch.randn(rank, inp, *kernel, generator=g) / inp**0.5
            up = torch.randn(out, rank, 1, 1, generator=g)
        mods[name] = LoraModule(down=down, up=up, alpha=alpha)
    return LoraState(modules=mods, metadata=dict(metadata or {}), source=source)


@pytest.fixture
def make_state():
    """Factory for random states (see ``random_state``)."""
    return random_state
