"""One name per layer: canonical kohya module names across formats, and the base family from tensor shapes.

The same layer reaches us under several names: ``lora_te_`` or ``lora_te1_`` for an SD1 text encoder (diffusers'
own kohya converter writes ``lora_te1_``), diffusers-style UNet paths (``lora_unet_down_blocks_0_attentions_0_...``,
what kohya's scripts write) or ldm-style ones (``lora_unet_input_blocks_1_1_...``, what ComfyUI's ``TrainLoraNode``
writes). ComfyUI maps all of them to the same weight, so a merge that kept two names for one layer would have one
of them silently overwritten when loaded. :func:`canonicalize` renames every module to one form:

- UNet: diffusers-style paths (the kohya convention A1111, diffusers and ComfyUI all read);
- text encoder: ``lora_te_`` for single-encoder families (SD1, SD2), ``lora_te1_``/``lora_te2_`` for SDXL.

The family comes from tensor shapes (:func:`family_from_shapes`): the UNet's cross-attention context width (768
SD1, 1024 SD2, 2048 SDXL) and the text encoders present and their widths; metadata is only a hint elsewhere.
"""

from __future__ import annotations

import re
from collections import Counter

from .state import LoraModule, LoraState

# UNet cross-attention context width -> family (attn2 to_k/to_v input features).
_CONTEXT_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# Text-encoder width of a single-encoder file (lora_te_): CLIP-L 768 (SD1), OpenCLIP-H 1024 (SD2).
_TE_WIDTH = {768: "sd1", 1024: "sd2"}
# Families with one text encoder, named lora_te_ (ComfyUI also maps lora_te1_ there, but one name must win).
SINGLE_TEXT_ENCODER = ("sd1", "sd2")
# ldm UNet families whose layout (input/middle/output blocks) the renaming below understands.
LDM_UNET_FAMILIES = ("sd1", "sd2", "sdxl")
# Real SD1, SD2 and SDXL UNets have two res blocks per level; used when the file cannot tell.
DEFAULT_RES_BLOCKS = 2

_LDM_BLOCK = re.compile(r"^lora_unet_(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_LDM_MIDDLE = re.compile(r"^lora_unet_middle_block_(\d+)_(.+)$")
# ldm resnet layer -> diffusers resnet layer (suffixes of the underscored path).
_RESNET_PARTS = {
    "in_layers_0": "norm1",
    "in_layers_2": "conv1",
    "emb_layers_1": "time_emb_proj",
    "out_layers_0": "norm2",
    "out_layers_3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP_LEVEL = {
    "lora_unet_input_blocks_0_0": "lora_unet_conv_in",
    "lora_unet_time_embed_0": "lora_unet_time_embedding_linear_1",
    "lora_unet_time_embed_2": "lora_unet_time_embedding_linear_2",
    "lora_unet_label_emb_0_0": "lora_unet_add_embedding_linear_1",
    "lora_unet_label_emb_0_2": "lora_unet_add_embedding_linear_2",
    "lora_unet_out_0": "lora_unet_conv_norm_out",
    "lora_unet_out_2": "lora_unet_conv_out",
}


def _in_width(m: LoraModule) -> int:
    return int(m.down.shape[1])


def _out_width(m: LoraModule) -> int:
    return int(m.up.shape[0])


def family_from_shapes(modules: dict[str, LoraModule]) -> str | None:
    """Return the base family told by module names and tensor shapes, or None when they cannot tell.

    Evidence, strongest first: Flux (``double_blocks``/``single_blocks``) and SD3 (``joint_blocks``) names; the
    UNet cross-attention context width (attn2 ``to_k``/``to_v`` input: 768 SD1, 1024 SD2, 2048 SDXL); a second
    text encoder (``lora_te2_``, 1280 wide) for SDXL; a single text encoder's width (768 SD1, 1024 SD2). A
    ``lora_te1_`` prefix alone is no evidence: diffusers' kohya converter writes it for SD1 too.

    Returns:
        ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sd3"``, ``"flux"`` or None.
    """
    names = list(modules)
    if any("double_blocks" in n or "single_blocks" in n or "single_transformer_blocks" in n for n in names):
        return "flux"
    if any("joint_blocks" in n for n in names):
        return "sd3"
    widths = Counter(
        _in_width(m)
        for n, m in modules.items()
        if n.startswith("lora_unet_") and "attn2" in n and n.endswith(("to_k", "to_v"))
    )
    if widths:
        return _CONTEXT_WIDTH.get(widths.most_common(1)[0][0])
    if any(n.startswith("lora_te2_") for n in names):
        return "sdxl"
    te_widths = Counter(_in_width(m) for n, m in modules.items() if n.startswith("lora_te") and "self_attn" in n)
    if te_widths:
        width = te_widths.most_common(1)[0][0]
        if width == 1280:
            return "sdxl"
        if any(n.startswith("lora_te_") for n in names):
            return _TE_WIDTH.get(width)
        # Only lora_te1_: CLIP-L is the first encoder of SDXL as well as SD1's only one.
        return "sd2" if width == 1024 else None
    return None


def infer_res_blocks(modules: dict[str, LoraModule]) -> int:
    """Return the UNet's res blocks per level, as told by the block indices where the channel width changes.

    Each level of an ldm UNet holds ``n + 1`` input blocks (n res blocks and a downsampler) and ``n + 1`` output
    blocks, and the channel width changes from one level to the next; so the distance between the first blocks of
    two widths is ``n + 1``. Diffusers-style names give it directly: up blocks hold ``n + 1`` attentions.

    Returns:
        n; :data:`DEFAULT_RES_BLOCKS` when the file covers too few levels to tell.
    """
    up_slot = re.compile(r"^lora_unet_up_blocks_\d+_(?:attentions|resnets)_(\d+)_")
    ups = [int(m.group(1)) for n in modules if (m := up_slot.match(n))]
    if ups:
        return max(max(ups), 1)
    for kind in ("input_blocks", "output_blocks"):
        first: dict[int, int] = {}
        for n, m in modules.items():
            hit = _LDM_BLOCK.match(n)
            if hit and hit.group(1) == kind and hit.group(3) == "1" and "transformer_blocks" in n and "attn1" in n:
                index, width = int(hit.group(2)), _out_width(m)
                first[width] = min(first.get(width, index), index)
        starts = sorted(first.values())
        steps = {b - a for a, b in zip(starts, starts[1:])}
        if len(steps) == 1 and next(iter(steps)) >= 2:
            return next(iter(steps)) - 1
    return DEFAULT_RES_BLOCKS


def ldm_to_diffusers_name(name: str, res_blocks: int) -> str | None:
    """Return the diffusers-style kohya name of an ldm-style UNet module name, or None when it has none.

    ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`` -> ``lora_unet_down_blocks_0_attentions_0_
    transformer_blocks_0_attn1_to_q`` for ``res_blocks`` = 2. Names outside the ldm layout return None.
    """
    for ldm, diff in _TOP_LEVEL.items():
        if name == ldm:
            return diff
    per_level = res_blocks + 1
    hit = _LDM_BLOCK.match(name)
    if hit:
        kind, index, part, rest = hit.group(1), int(hit.group(2)), int(hit.group(3)), hit.group(4)
        if kind == "input_blocks":
            if index == 0:
                return None
            level, slot = divmod(index - 1, per_level)
            if slot == res_blocks:  # the level's downsampler
                return f"lora_unet_down_blocks_{level}_downsamplers_0_conv" if (part, rest) == (0, "op") else None
            block = f"lora_unet_down_blocks_{level}"
        else:
            level, slot = divmod(index, per_level)
            block = f"lora_unet_up_blocks_{level}"
            if rest == "conv" and part >= 1:  # the level's upsampler, after the resnet (and attention)
                return f"{block}_upsamplers_0_conv"
        if part == 0:
            layer = _RESNET_PARTS.get(rest)
            return f"{block}_resnets_{slot}_{layer}" if layer else None
        if part == 1:
            return f"{block}_attentions_{slot}_{rest}"
        return None
    hit = _LDM_MIDDLE.match(name)
    if hit:
        part, rest = int(hit.group(1)), hit.group(2)
        if part == 1:
            return f"lora_unet_mid_block_attentions_0_{rest}"
        layer = _RESNET_PARTS.get(rest)
        if layer and part in (0, 2):
            return f"lora_unet_mid_block_resnets_{part // 2}_{layer}"
    return None


def canonical_names(
    modules: dict[str, LoraModule], family: str | None = None, res_blocks: int | None = None
) -> dict[str, str]:
    """Return ``{name: canonical name}`` for every module name (see the module docstring for the forms).

    Args:
        modules: modules keyed by kohya name.
        family: the base family; None: :func:`family_from_shapes`.
        res_blocks: the UNet's res blocks per level; None: :func:`infer_res_blocks`.

    Returns:
        The renaming; names already canonical map to themselves.
    """
    rule = _Renaming(modules, family, res_blocks)
    return {name: rule(name) for name in modules}


class _Renaming:
    """The renaming rule of one state: its family, encoder count and UNet layout, decided once."""

    def __init__(self, modules: dict[str, LoraModule], family: str | None, res_blocks: int | None):
        self.family = family or family_from_shapes(modules)
        self.single_te = self.family in SINGLE_TEXT_ENCODER and not any(n.startswith("lora_te2_") for n in modules)
        self.ldm = self.family in LDM_UNET_FAMILIES or self.family is None
        self.res_blocks = res_blocks if res_blocks is not None else infer_res_blocks(modules)

    def __call__(self, name: str) -> str:
        if self.single_te and name.startswith("lora_te1_"):
            return "lora_te_" + name[len("lora_te1_") :]
        if self.family == "sdxl" and name.startswith("lora_te_"):
            return "lora_te1_" + name[len("lora_te_") :]
        if self.ldm and name.startswith("lora_unet_"):
            return ldm_to_diffusers_name(name, self.res_blocks) or name
        return name


def canonicalize(state: LoraState, family: str | None = None, res_blocks: int | None = None) -> LoraState:
    """Return the state with canonical module names (extras renamed alike); the input is not modified.

    Args:
        state: the adapter.
        family: the base family when known from elsewhere (e.g. the other inputs of a merge); None: from shapes.
        res_blocks: the UNet's res blocks per level; None: inferred from the names and shapes.

    Returns:
        The renamed state (the same object when nothing changes).

    Raises:
        ValueError: when two modules of the state name the same layer (e.g. ``lora_te_x`` and ``lora_te1_x``):
            ComfyUI would apply only one of them, so the file is ambiguous; both names are given.
    """
    rule = _Renaming(state.modules, family, res_blocks)
    rename = {name: rule(name) for name in state.modules}
    extras = {}
    for key, tensor in state.extras.items():
        mod, _, suffix = key.rpartition(".")
        extras[f"{rule(mod)}.{suffix}"] = tensor
    if all(k == v for k, v in rename.items()) and extras.keys() == state.extras.keys():
        return state
    modules: dict[str, LoraModule] = {}
    first: dict[str, str] = {}
    for old, new in rename.items():
        if new in modules:
            where = f"'{state.source}'" if state.source else "the adapter"
            raise ValueError(
                f"{where} names one layer twice: modules '{first[new]}' and '{old}' are both '{new}'; ComfyUI "
                f"would apply only one of them"
            )
        modules[new] = state.modules[old]
        first[new] = old
    return LoraState(modules=modules, metadata=dict(state.metadata), extras=extras, source=state.source)
