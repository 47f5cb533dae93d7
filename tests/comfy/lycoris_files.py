"""LyCORIS files written by the ``lycoris-lora`` package itself, and their deltas computed independently.

:func:`write_lycoris_file` builds a LyCORIS network (LoHa or LoKr) on a diffusers UNet of the tiny model's shape
(320/640 channels, one res block per level, context 768), fills every parameter with random non-zero values and
saves it with LyCORIS' own ``save_weights``. :func:`expected_deltas` recomputes each module's change in float64
from the file's tensors with the formulas LyCORIS documents (not through ``lora/``):

- LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank``, ``rank = w1_b.shape[0]``;
- LoKr: ``kron(w1, w2_a @ w2_b) * alpha / rank``, ``rank = w2_b.shape[0]`` (``w1`` full at these sizes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from tool_files import tiny_unet

RANK, ALPHA = 4, 2.0  # scale 0.5: an ignored alpha shows as a factor 2
# Attention and feed-forward linears plus the resnets' convs (3x3, stored flattened by LyCORIS).
TARGET_MODULES = ["Transformer2DModel", "ResnetBlock2D"]


def write_lycoris_file(path: Path, algo: str, seed: int = 0, metadata: dict | None = None, **kwargs) -> Path:
    """Write a LyCORIS ``algo`` network on :func:`tiny_unet` with LyCORIS' own ``save_weights``; return the path."""
    from lycoris import LycorisNetwork, create_lycoris

    unet = tiny_unet(seed)
    LycorisNetwork.apply_preset({"target_module": TARGET_MODULES})
    net = create_lycoris(
        unet, 1.0, linear_dim=RANK, linear_alpha=ALPHA, conv_dim=RANK, conv_alpha=ALPHA, algo=algo, **kwargs
    )
    net.apply_to()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            # Random, non-zero, and small enough that products stay near 1 (LoHa multiplies four factors).
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + 0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    net.save_weights(str(path), torch.float32, dict(metadata or {}))
    net.restore()
    return path


def expected_deltas(path: Path) -> dict[str, torch.Tensor]:
    """LyCORIS module name -> its float64 weight change (flattened conv kernels as the file stores them)."""
    sd = {k: v.double() for k, v in load_file(str(path)).items()}
    out = {}
    for name in sorted({k.split(".")[0] for k in sd}):
        alpha = float(sd[f"{name}.alpha"])
        if f"{name}.hada_w1_a" in sd:
            w1 = sd[f"{name}.hada_w1_a"] @ sd[f"{name}.hada_w1_b"]
            w2 = sd[f"{name}.hada_w2_a"] @ sd[f"{name}.hada_w2_b"]
            out[name] = w1 * w2 * (alpha / sd[f"{name}.hada_w1_b"].shape[0])
        else:
            w2 = sd[f"{name}.lokr_w2_a"] @ sd[f"{name}.lokr_w2_b"]
            out[name] = torch.kron(sd[f"{name}.lokr_w1"], w2) * (alpha / sd[f"{name}.lokr_w2_b"].shape[0])
    return out


def comfy_key(name: str, unet_map: dict[str, str]) -> str:
    """``lycoris_down_blocks_0_..._to_q`` -> ComfyUI's model key, through ComfyUI's own diffusers->ldm table."""
    by_underscored = {d.replace(".", "_"): ldm for d, ldm in unet_map.items()}
    return by_underscored[name[len("lycoris_") :]]
