"""Random but valid kohya-format LoRA files for the tiny model (examples, tests, benchmarks).

Module names come from ComfyUI's own diffusers<->ldm table for the tiny UNet config, so the
files use the diffusers-style kohya names that kohya's scripts write (``lora_unet_down_blocks_
0_attentions_0_...``) and match every attention projection of the tiny model, plus the CLIP-L
attention projections (``lora_te_text_model_encoder_layers_N_self_attn_q_proj``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .tiny_model import UNET_CONFIG

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
CLIP_LAYERS = 12
CLIP_WIDTH = 768


def tiny_unet_attention_shapes() -> dict[str, tuple[int, int]]:
    """Return ``{kohya module name: (out, in)}`` for every attention projection of the tiny UNet.

    Requires ComfyUI imported (``comfy_env.import_comfy_core``); its table names the modules.
    """
    import comfy.utils

    config = dict(UNET_CONFIG)
    config["num_res_blocks"] = list(config["num_res_blocks"])
    shapes = {}
    for diffusers_key in comfy.utils.unet_to_diffusers(config):
        if not diffusers_key.endswith(".weight"):
            continue
        path = diffusers_key[: -len(".weight")]
        if not any(path.endswith("." + p) for p in ATTENTION_PROJECTIONS) or ".attn" not in path:
            continue
        width = _block_width(path)
        fan_in = UNET_CONFIG["context_dim"] if ".attn2." in path and path.endswith(("to_k", "to_v")) else width
        shapes["lora_unet_" + path.replace(".", "_")] = (width, fan_in)
    return shapes


def _block_width(path: str) -> int:
    base, mult = UNET_CONFIG["model_channels"], UNET_CONFIG["channel_mult"]
    parts = path.split(".")
    if parts[0] == "mid_block":
        return base * mult[-1]
    level = int(parts[1])
    return base * (mult[level] if parts[0] == "down_blocks" else mult[len(mult) - 1 - level])


def tiny_clip_attention_shapes() -> dict[str, tuple[int, int]]:
    """Return ``{kohya module name: (out, in)}`` for the CLIP-L attention projections."""
    return {
        f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}": (CLIP_WIDTH, CLIP_WIDTH)
        for i in range(CLIP_LAYERS)
        for p in CLIP_PROJECTIONS
    }


def random_lora_tensors(seed: int, rank: int = 8, alpha: float | None = None, text_encoder: bool = True) -> dict:
    """Return a kohya-format state dict with random factors for the tiny model.

    ``up`` is not zero (a fresh LoRA would change nothing), and its size is chosen so one LoRA at
    strength 1 visibly changes a 4-step 64x64 image without saturating it.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(tiny_unet_attention_shapes())
    if text_encoder:
        shapes.update(tiny_clip_attention_shapes())
    tensors = {}
    for name, (fan_out, fan_in) in sorted(shapes.items()):
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        tensors[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=gen) * (0.5 / rank**0.5)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    return tensors


def write_example_lora(
    path: Path, seed: int, rank: int = 8, trigger: str | None = None, text_encoder: bool = True
) -> Path:
    """Write one random tiny-model LoRA with kohya metadata to ``path`` (temp file + rename); return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": "sd_v1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "ss_output_name": path.stem,
    }
    if trigger:
        metadata["modelspec.trigger_phrase"] = trigger
    tmp = path.with_name(path.name + ".tmp")
    save_file(random_lora_tensors(seed, rank, text_encoder=text_encoder), str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def write_example_set(folder: Path, count: int = 3, rank: int = 8) -> list[Path]:
    """Write ``example_lora_<i>.safetensors`` (i = 1..count) into ``folder`` unless present; return the paths."""
    paths = []
    for i in range(1, count + 1):
        path = Path(folder) / f"example_lora_{i}.safetensors"
        if not path.exists():
            write_example_lora(path, seed=1000 + i, rank=rank, trigger=f"style{i}")
        paths.append(path)
    return paths
