"""LoRA layers in a model through peft, export to ``lora.LoraState``, and removal afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from ..lora.state import LoraModule, LoraState

ADAPTER = "default"


def _targets(module: torch.nn.Module, suffixes: Iterable[str]) -> dict[str, torch.nn.Module]:
    suffixes = tuple(suffixes)
    return {
        name: m
        for name, m in module.named_modules()
        if any(name == s or name.endswith("." + s) for s in suffixes)
        and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }


def inject_lora(
    module: torch.nn.Module, target_modules: Iterable[str], rank: int, alpha: float, dropout: float = 0.0
) -> list[str]:
    """Add trainable LoRA layers to every matching layer; freeze everything else. Return the layer names.

    Raises:
        ValueError: no layer matches, or the rank exceeds a layer's ``min(in, out)`` (the update could not
            be low-rank; peft would accept it silently).
    """
    targets = _targets(module, target_modules)
    if not targets:
        raise ValueError(f"no layer of {type(module).__name__} matches the target modules {list(target_modules)}")
    for name, layer in targets.items():
        w = layer.weight
        limit = min(w.shape[0], w[0].numel())
        if rank > limit:
            raise ValueError(
                f"rank {rank} is above the size of layer '{name}' ({tuple(w.shape)}: at most {limit}); "
                f"use a rank of {limit} or less"
            )
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(targets), bias="none")
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    for p in lora_parameters(module):
        p.requires_grad_(True)
    return sorted(targets)


def lora_layers(module: torch.nn.Module) -> dict[str, LoraLayer]:
    """Return the peft LoRA layers of ``module`` by module path."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Return the LoRA A and B parameters of ``module``, in a stable order."""
    params = []
    for _, layer in sorted(lora_layers(module).items()):
        params += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
    return params


def named_lora_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return ``{"<path>.lora_A" / "<path>.lora_B": tensor}`` (for checkpoints)."""
    out = {}
    for name, layer in lora_layers(module).items():
        out[f"{name}.lora_A"] = layer.lora_A[ADAPTER].weight
        out[f"{name}.lora_B"] = layer.lora_B[ADAPTER].weight
    return out


def export_state(
    module: torch.nn.Module, prefix: str, alpha: float, name_map: Callable[[str], str] | None = None
) -> LoraState:
    """Return the trained factors as a ``LoraState`` with kohya names ``<prefix>_<path with _>``.

    Args:
        module: a module with injected LoRA layers.
        prefix: ``lora_unet`` or ``lora_te``.
        alpha: the configured alpha (written as is, never replaced by the rank).
        name_map: translates a module path first (e.g. ComfyUI's ldm path to the diffusers path).
    """
    modules = {}
    for path, layer in sorted(lora_layers(module).items()):
        down = layer.lora_A[ADAPTER].weight.detach().float().cpu().clone()
        up = layer.lora_B[ADAPTER].weight.detach().float().cpu().clone()
        mapped = name_map(path) if name_map else path
        modules[f"{prefix}_{mapped.replace('.', '_')}"] = LoraModule(down, up, float(alpha))
    return LoraState(modules)


def remove_lora(module: torch.nn.Module) -> None:
    """Put every wrapped layer's original back, leaving ``module`` as it was before ``inject_lora``."""
    for name, layer in sorted(lora_layers(module).items(), key=lambda kv: -kv[0].count(".")):
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config


def text_encoder_path(path: str) -> str:
    """Return the kohya/A1111 text-encoder path (``text_model.encoder.layers.N...``) of a module path.

    transformers 5 dropped ``text_model.`` from CLIPTextModel's module names and ComfyUI adds its own
    prefixes (``clip_l.transformer.``); the convention starts at ``text_model.encoder``.
    """
    index = path.find("encoder.layers.")
    return "text_model." + path[index:] if index >= 0 else path
