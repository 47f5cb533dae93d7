"""Apply LoRAs through ComfyUI's own patching, with a per-LoRA report of what matched.

This is the ComfyUI glue behind Apply LoRA Stack and LoRA Info: ComfyUI's key maps
(``comfy.lora.model_lora_keys_unet/clip``), its format conversion and adapter classes
(``comfy.lora.load_lora``) and ``ModelPatcher.add_patches``, exactly as core
``comfy.sd.load_lora_for_models`` uses them, so every format ComfyUI reads works and the
result equals a chain of core LoraLoader nodes. Nothing is copied into the base weights until
sampling.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import comfy.lora
import comfy.lora_convert

from ..lora import metadata as lora_metadata
from ..lora import scale as lora_scale

log = logging.getLogger(__name__)

# ComfyUI model classes (model_config) -> the family names lora.metadata uses.
_FAMILY_BY_MODEL_CLASS = {
    "SD15": "sd1",
    "SD15_instructpix2pix": "sd1",
    "SD20": "sd2",
    "SD21UnclipL": "sd2",
    "SD21UnclipH": "sd2",
    "SDXL": "sdxl",
    "SDXLRefiner": "sdxl",
    "SDXL_instructpix2pix": "sdxl",
    "SSD1B": "sdxl",
    "Segmind_Vega": "sdxl",
    "KOALA_700M": "sdxl",
    "KOALA_1B": "sdxl",
    "SD3": "sd3",
    "Flux": "flux",
    "FluxSchnell": "flux",
}
_UNMATCHED_PREFIX = "lora key not loaded: "


@dataclass
class LoraToApply:
    """One LoRA to apply: a label for messages, its tensors and metadata, and two strengths."""

    label: str
    tensors: dict
    metadata: dict
    strength_model: float
    strength_clip: float


@dataclass
class AppliedLora:
    """What applying one LoRA did: keys patched on the model and on CLIP, keys matching nothing."""

    label: str
    strength_model: float
    strength_clip: float | None  # None: no CLIP was given
    model_keys: int = 0
    clip_keys: int = 0
    unmatched: list[str] = field(default_factory=list)
    trigger_words: list[str] = field(default_factory=list)


def model_family(model) -> str | None:
    """Return the base family ("sd1", "sdxl", ...) of a ComfyUI MODEL, or None when unknown."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return _FAMILY_BY_MODEL_CLASS.get(type(config).__name__) if config is not None else None


def check_family(label: str, tensors: dict, metadata: dict, model) -> None:
    """Raise ValueError when a LoRA was made for another base family than ``model``.

    Unknown families on either side pass: only a known mismatch is an error.
    """
    theirs = lora_metadata.base_family(tensors, metadata)
    ours = model_family(model) if model is not None else None
    if theirs and ours and theirs != ours:
        raise ValueError(
            f"LoRA '{label}' was made for {theirs}, but the model is {ours}: it would patch nothing or the "
            f"wrong layers. Pick a LoRA for {ours} or a {theirs} checkpoint."
        )


class _CollectUnmatched(logging.Filter):
    """Collects ComfyUI's per-key "lora key not loaded" warnings instead of printing hundreds."""

    def __init__(self):
        super().__init__()
        self.keys: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_UNMATCHED_PREFIX):
            self.keys.append(message[len(_UNMATCHED_PREFIX) :])
            return False
        return True


@contextlib.contextmanager
def _collect_unmatched():
    collector = _CollectUnmatched()
    root = logging.getLogger()
    root.addFilter(collector)
    try:
        yield collector
    finally:
        root.removeFilter(collector)


def key_map_for(model, clip) -> dict:
    """Return ComfyUI's LoRA key map (LoRA module name -> model weight key) for MODEL and CLIP."""
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def load_patches(tensors: dict, key_map: dict) -> tuple[dict, list[str]]:
    """Return ComfyUI's patches for a LoRA state dict and the LoRA keys that matched nothing."""
    converted = comfy.lora_convert.convert_lora(tensors)
    with _collect_unmatched() as collector:
        patches = comfy.lora.load_lora(converted, key_map)
    return patches, collector.keys


def _block_groups(patches: dict, block_weights: dict[str, float] | None) -> dict[float, dict]:
    """Split patches by per-block weight; one group of weight 1.0 when there are none."""
    if not block_weights:
        return {1.0: patches}
    groups: dict[float, dict] = {}
    for key, patch in patches.items():
        name = key if isinstance(key, str) else key[0]
        block = lora_scale.block_id(name)
        weight = 1.0 if block is None else block_weights.get(block, 1.0)
        groups.setdefault(weight, {})[key] = patch
    return groups


def apply_loras(model, clip, loras: list[LoraToApply], block_weights: dict[str, float] | None = None):
    """Patch MODEL and CLIP with each LoRA in order, as a chain of core LoraLoader nodes would.

    Args:
        model: a ComfyUI MODEL (ModelPatcher) or None.
        clip: a ComfyUI CLIP or None.
        loras: the LoRAs with their strengths, in stacking order.
        block_weights: optional per-block multipliers (``lora.scale`` block ids); text-encoder
            keys use the "BASE" weight.

    Returns:
        ``(model, clip, applied)``: clones carrying the patches (inputs are not modified) and
        one ``AppliedLora`` per LoRA.

    Raises:
        ValueError: a LoRA was made for another base family than the model.
    """
    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    key_map = key_map_for(model, clip)
    applied = []
    for item in loras:
        check_family(item.label, item.tensors, item.metadata, model)
        patches, unmatched = load_patches(item.tensors, key_map)
        report = AppliedLora(
            item.label,
            item.strength_model,
            item.strength_clip if new_clip is not None else None,
            unmatched=unmatched,
            trigger_words=lora_metadata.trigger_words(item.metadata),
        )
        patched: set = set()
        for weight, group in _block_groups(patches, block_weights).items():
            if new_model is not None:
                model_keys = new_model.add_patches(group, item.strength_model * weight)
                report.model_keys += len(model_keys)
                patched.update(model_keys)
            if new_clip is not None:
                clip_keys = new_clip.add_patches(group, item.strength_clip * weight)
                report.clip_keys += len(clip_keys)
                patched.update(clip_keys)
        # Patches that found a LoRA key mapping but no weight (e.g. a CLIP part with no CLIP given).
        report.unmatched += [str(k) for k in patches if k not in patched]
        if report.unmatched:
            log.warning(
                "LoRA '%s': %d keys matched nothing in the model or CLIP (first: %s)",
                item.label,
                len(report.unmatched),
                ", ".join(report.unmatched[:3]),
            )
        applied.append(report)
    return new_model, new_clip, applied


def format_report(applied: list[AppliedLora], total_strength: float, warning: str | None) -> str:
    """Return the human-readable report string of Apply LoRA Stack."""
    lines = [f"{len(applied)} LoRA(s) applied; total model strength {total_strength:.2f}"]
    if warning:
        lines.append(f"WARNING: {warning}")
    for i, a in enumerate(applied, 1):
        lines.append(
            f"{i}. {a.label}: model {a.strength_model:g}, "
            f"clip {'-' if a.strength_clip is None else format(a.strength_clip, 'g')}; "
            f"patched {a.model_keys} model and {a.clip_keys} CLIP weights"
        )
        if a.unmatched:
            shown = ", ".join(a.unmatched[:5]) + (", ..." if len(a.unmatched) > 5 else "")
            lines.append(f"   {len(a.unmatched)} key(s) matched nothing: {shown}")
    return "\n".join(lines)
