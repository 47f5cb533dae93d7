"""Strength and per-block weights in the A1111 LoRA Block Weight convention.

Block ids and vectors follow hako-mikan's sd-webui-lora-block-weight (also used by the Inspire pack's LBW
nodes): https://github.com/hako-mikan/sd-webui-lora-block-weight. ``BASE`` is the text encoder, ``INnn`` the
UNet ``input_blocks.nn``, ``MID`` the ``middle_block`` (that tool's newer versions call it ``M00``; both are
accepted) and ``OUTnn`` the ``output_blocks.nn``. Blocks a vector does not list (for SD1's 17-value form:
IN00, IN03, IN06, IN09-IN11, OUT00-OUT02, which hold no attention) get weight 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

BLOCKS: dict[str, list[str]] = {
    "sd1": [
        "BASE",
        "IN01",
        "IN02",
        "IN04",
        "IN05",
        "IN07",
        "IN08",
        "MID",
        "OUT03",
        "OUT04",
        "OUT05",
        "OUT06",
        "OUT07",
        "OUT08",
        "OUT09",
        "OUT10",
        "OUT11",
    ],
    "sd1_full": ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)],
    "sdxl": ["BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"],
    "sdxl_full": ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["MID"] + [f"OUT{i:02d}" for i in range(9)],
}
_FAMILY_ALIASES = {"sd2": "sd1", "sd15": "sd1", "sd1.5": "sd1", "sd2_full": "sd1_full"}

_SD1_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}
# SDXL has no shallow 320-channel attention blocks; these follow the SD1 presets level by level (INS = the
# first input level with attention, IND = the deeper one, OUTD = the deep half of the outputs...).
_SDXL_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
    "OUTD": "1,0,0,0,0,0,1,1,1,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,1,1,1",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 12),
}
PRESETS: dict[str, dict[str, list[float]]] = {
    "sd1": {k: [float(x) for x in v.split(",")] for k, v in _SD1_PRESETS.items()},
    "sdxl": {k: [float(x) for x in v.split(",")] for k, v in _SDXL_PRESETS.items()},
}


def _family_key(family: str) -> str:
    f = family.lower()
    f = _FAMILY_ALIASES.get(f, f)
    if f not in BLOCKS:
        raise ValueError(f"no block layout for family '{family}'; expected one of {sorted(BLOCKS)} (sd2 = sd1)")
    return f


def parse_block_weights(spec: str | Iterable[float], family: str) -> dict[str, float]:
    """Parse a preset name or a comma-separated vector into per-block weights.

    Args:
        spec: a preset name from :data:`PRESETS` (case-insensitive), or values such as
            ``"1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"`` (17 for sd1, 26 for the full sd1 form, 12 for sdxl, 20 for
            the full sdxl form), or a sequence of numbers.
        family: ``"sd1"``, ``"sd2"`` (same layout) or ``"sdxl"``.

    Returns:
        Block id -> weight; blocks not listed by the form are absent (weight 1).

    Raises:
        ValueError: for an unknown family, an unknown preset, a value that is not a number, or a vector whose
            length matches no form of the family (naming the length and the expected ones).
    """
    fam = _family_key(family)
    base = fam.removesuffix("_full")
    if isinstance(spec, str):
        text = spec.strip()
        preset = {k.upper(): v for k, v in PRESETS.get(base, {}).items()}.get(text.upper())
        if preset is not None:
            values = list(preset)
        else:
            if not re.search(r"[\d.]\s*,|^\s*-?[\d.]+\s*$", text):
                raise ValueError(
                    f"unknown block-weight preset '{spec}' for {base}; presets: {sorted(PRESETS.get(base, {}))}, "
                    f"or give comma-separated numbers"
                )
            values = []
            for i, item in enumerate(text.split(",")):
                try:
                    values.append(float(item.strip()))
                except ValueError:
                    raise ValueError(f"block weight {i + 1} of '{spec}' is not a number: '{item.strip()}'") from None
    else:
        values = [float(v) for v in spec]
    forms = [fam] if fam.endswith("_full") else [base, f"{base}_full"]
    for form in forms:
        if len(values) == len(BLOCKS[form]):
            return dict(zip(BLOCKS[form], values))
    expected = " or ".join(f"{len(BLOCKS[f])} ({f})" for f in forms)
    raise ValueError(f"block weights '{spec}' have {len(values)} values; {base} expects {expected}")


_LDM = re.compile(r"(?:^|[._])(input_blocks|middle_block|output_blocks)[._](\d+)?")
_DIFFUSERS = re.compile(
    r"(?:^|[._])(down_blocks|up_blocks)[._](\d+)[._](attentions|resnets|downsamplers|upsamplers)[._](\d+)"
)
_TE = re.compile(
    r"^(clip_[lg]\.|transformer\.|text_model|text_encoders?[._]|lora_te\d?_|te\d?_|conditioner\.|cond_stage_model\.)"
)


def block_id(model_key: str) -> str | None:
    """Return the LBW block id of a model key, or None for UNet keys outside the numbered blocks (weight 1).

    Understands ComfyUI/ldm keys (``diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight`` ->
    ``IN04``, ``middle_block`` -> ``MID``, ``output_blocks.N`` -> ``OUTnn``), kohya names in either naming
    (``lora_unet_down_blocks_1_attentions_0_...`` -> ``IN04``: SD1 and SDXL both have 3 input slots per level),
    and text-encoder keys (``clip_l.``, ``clip_g.``, ``transformer.``, ``text_model``, ``lora_te*``) -> ``BASE``.

    Returns:
        ``"BASE"``, ``"INnn"``, ``"MID"``, ``"OUTnn"`` or None.
    """
    key = model_key
    if key.startswith("diffusion_model."):
        key = key[len("diffusion_model.") :]
    elif key.startswith("model.diffusion_model."):
        key = key[len("model.diffusion_model.") :]
    elif key.startswith("lora_unet_"):
        key = key[len("lora_unet_") :]
    elif _TE.match(key):
        return "BASE"
    m = _LDM.match(key)
    if m:
        kind, num = m.group(1), m.group(2)
        if kind == "middle_block":
            return "MID"
        if num is None:
            return None
        return f"{'IN' if kind == 'input_blocks' else 'OUT'}{int(num):02d}"
    if key.startswith(("mid_block.", "mid_block_")):
        return "MID"
    m = _DIFFUSERS.match(key)
    if m:
        level, kind, j = int(m.group(2)), m.group(3), int(m.group(4))
        if m.group(1) == "down_blocks":
            return f"IN{3 * (level + 1):02d}" if kind == "downsamplers" else f"IN{3 * level + j + 1:02d}"
        return f"OUT{3 * level + 2:02d}" if kind == "upsamplers" else f"OUT{3 * level + j:02d}"
    return None


def block_weight(model_key: str, weights: dict[str, float]) -> float:
    """Return the weight for a model key under parsed block weights (1.0 when its block is not listed).

    Returns:
        The weight.
    """
    bid = block_id(model_key)
    if bid is None:
        return 1.0
    if bid == "MID" and "MID" not in weights and "M00" in weights:
        return weights["M00"]
    return weights.get(bid, 1.0)


def total_strength(strengths: Iterable[float]) -> float:
    """Return the sum of absolute model strengths of the active LoRAs.

    Returns:
        ``sum(|s|)``.
    """
    return float(sum(abs(float(s)) for s in strengths))


def strength_warning(total: float, limit: float = 2.0) -> str | None:
    """Return a warning when the summed strength passes ``limit``, else None.

    Returns:
        The message, or None.
    """
    if total <= limit:
        return None
    return (
        f"Total LoRA strength is {total:.2f}, above {limit:.1f}: stacked LoRAs add up, and past about {limit:.1f} "
        f"images tend to burn or break. Lower the strengths (0.5-1.0 each usually works) or use fewer LoRAs."
    )
