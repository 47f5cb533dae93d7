"""LoRA layers in a model through peft, export to ``lora.LoraState``, and removal afterwards.

The module we inject into may belong to someone else (ComfyUI's MODEL lives in the user's graph), so
``inject_lora`` records what it changes (each parameter's ``requires_grad``, whether ``peft_config`` existed) and
``remove_adapter`` puts every original layer object back and restores those flags: the base weights are never
merged into or written to, so after removal the module has the same parameters, names and values as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from ..lora import keys as lora_keys
from ..lora.state import LoraModule, LoraState

ADAPTER = "default"
# Attribute under which inject_lora keeps what remove_adapter must restore (a plain dict: not a submodule).
_SAVED = "_lora_workbench_saved"


def _targets(module: torch.nn.Module, suffixes: Iterable[str]) -> dict[str, torch.nn.Module]:
    suffixes = tuple(suffixes)
    return {
        name: m
        for name, m in module.named_modules()
        if any(name == s or name.endswith("." + s) for s in suffixes)
        and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }


def inject_lora(
    module: torch.nn.Module,
    target_modules: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    device: torch.device | str | None = None,
) -> list[str]:
    """Add trainable float32 LoRA layers (peft) to every matching layer and freeze everything else.

    The LoRA layers go on ``device`` (the compute device) when given, else beside each layer's weight: a layer
    whose weight a low-VRAM load left in CPU memory still trains its LoRA on the GPU.

    Matching follows peft's ``target_modules`` rule: a layer's dotted path equals an entry or ends with
    ``"." + entry``; only ``nn.Linear`` and ``nn.Conv2d`` layers are wrapped. peft draws ``lora_A`` from torch's
    global generator (``lora_B`` starts at zero, so the model's output is unchanged until training): seed it first
    for reproducible runs.

    Returns:
        The sorted module paths that got a LoRA layer.

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
    if not hasattr(module, _SAVED):
        setattr(
            module,
            _SAVED,
            {
                "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
                "had_peft_config": hasattr(module, "peft_config"),
            },
        )
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(targets), bias="none")
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    for p in lora_parameters(module):
        # peft gives the LoRA layers the base layer's dtype; they train in float32 whatever the base's (fp16,
        # bf16, fp8), and peft casts their input and result around them.
        p.data = p.data.to(device=device, dtype=torch.float32)
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
    module: torch.nn.Module,
    prefix: str | Callable[[str], str],
    name_map: Callable[[str], str] | Mapping[str, str] | None = None,
    alpha: float | None = None,
) -> LoraState:
    """Return the trained factors as a ``LoraState`` with kohya names ``<prefix>_<path with . -> _>``.

    Args:
        module: a module with injected LoRA layers.
        prefix: ``lora_unet`` or ``lora_te``, or a function giving the prefix of a module path (SDXL's two text
            encoders: ``lora_te1`` and ``lora_te2``); with a ``lora_te...`` prefix the path is also put into the
            kohya/A1111 text-encoder form ``text_model.encoder.layers.N...`` (``lora.keys.kohya_name``).
        name_map: translates a module path first (a function or a dict; paths missing from a dict stay as they
            are), e.g. ComfyUI's ldm UNet paths to the diffusers paths kohya names are built from.
        alpha: the alpha to record; None takes the alpha peft was configured with (the config's, never the rank).

    Returns:
        The adapter with float32 CPU copies of ``down`` (``lora_A``, ``(r, in)``) and ``up`` (``lora_B``,
        ``(out, r)``); the metadata is empty.

    Raises:
        ValueError: ``module`` has no LoRA layers, or two paths map to the same kohya name.
    """
    layers = lora_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no LoRA layers to export (inject_lora first)")
    mapper: Callable[[str], str]
    if name_map is None:
        mapper = lambda path: path  # noqa: E731
    elif isinstance(name_map, Mapping):
        mapper = lambda path: name_map.get(path, path)  # noqa: E731
    else:
        mapper = name_map
    modules = {}
    for path, layer in sorted(layers.items()):
        down = layer.lora_A[ADAPTER].weight.detach().float().cpu().clone()
        up = layer.lora_B[ADAPTER].weight.detach().float().cpu().clone()
        mapped = mapper(path)
        name = lora_keys.kohya_name(prefix(path) if callable(prefix) else prefix, mapped)
        if name in modules:
            raise ValueError(f"two LoRA layers map to the kohya name '{name}' (the second is '{path}')")
        layer_alpha = float(alpha) if alpha is not None else float(layer.lora_alpha[ADAPTER])
        modules[name] = LoraModule(down, up, layer_alpha)
    return LoraState(modules)


def remove_adapter(module: torch.nn.Module) -> None:
    """Put every wrapped layer's original back and restore ``requires_grad``, leaving ``module`` as before injection.

    The original layer objects (with their untouched weight tensors) are re-attached, so the base weights are
    bit-identical and any outside reference to them stays valid. A module without LoRA layers is left alone.
    """
    for name, layer in sorted(lora_layers(module).items(), key=lambda kv: -kv[0].count(".")):
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    saved = module.__dict__.pop(_SAVED, None)
    if saved is None:
        return
    if not saved["had_peft_config"] and hasattr(module, "peft_config"):
        del module.peft_config
    for n, p in module.named_parameters():
        if n in saved["requires_grad"]:
            p.requires_grad_(saved["requires_grad"][n])


remove_lora = remove_adapter  # the earlier name, kept for callers written against it
