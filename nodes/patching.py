"""Apply LoRAs through ComfyUI's own patching, with a per-LoRA report of what matched and how.

This is the ComfyUI glue behind Apply LoRA Stack and LoRA Info: ComfyUI's key maps
(``comfy.lora.model_lora_keys_unet/clip``), its format conversion and adapter classes
(``comfy.lora.load_lora``) and ``ModelPatcher.add_patches``, exactly as core
``comfy.sd.load_lora_for_models`` uses them, so every format ComfyUI reads works and the
result equals a chain of core LoraLoader nodes. Where ComfyUI's key map is blind (diffusers/peft
files, ``lora_te1_`` SD1 text encoders, alphas kept in a diffusers header), ``lora.keys`` reads
those modules and they are handed to ComfyUI again under names it maps, so every key of every file
``lora/`` reads is applied. Nothing is copied into the base weights until sampling.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import comfy.lora
import comfy.lora_convert
import comfy.utils

from ..lora import families as lora_families
from ..lora import identity as lora_identity
from ..lora import keys as lora_keys
from ..lora import metadata as lora_metadata
from ..lora import scale as lora_scale
from ..lora import state as lora_state
from .model_family import model_family

log = logging.getLogger(__name__)

_UNMATCHED_PREFIX = "lora key not loaded: "


@dataclass
class LoraToApply:
    """One LoRA to apply: a label (its file name) for messages, its tensors and metadata, and two strengths."""

    label: str
    tensors: dict
    metadata: dict
    strength_model: float
    strength_clip: float


@dataclass
class AppliedLora:
    """What applying one LoRA did: keys patched on the model and on CLIP, keys matching nothing, how it was read.

    ``path`` says which way the file went: ``"ComfyUI"`` (ComfyUI's own key map read every key),
    ``"converted"`` (LoRA Workbench renamed every module to names ComfyUI maps) or ``"ComfyUI + converted"``;
    ``converted`` counts the modules converted and ``warnings`` holds what the user should know (metadata that
    disagrees with the tensors, ...).
    """

    label: str
    strength_model: float
    strength_clip: float | None  # None: no CLIP was given
    model_keys: int = 0
    clip_keys: int = 0
    unmatched: list[str] = field(default_factory=list)
    trigger_words: list[str] = field(default_factory=list)
    path: str = "ComfyUI"
    converted: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Target:
    """What one Apply call patches: ComfyUI's key map, the models holding the weights, and the model's family."""

    key_map: dict
    holders: tuple  # torch modules whose attribute paths are the patch keys (the diffusion model, CLIP's encoder)
    family: str | None

    def shape(self, key: str) -> tuple[int, ...] | None:
        """Return the shape of the weight ``key`` patches, or None when no holder has it.

        Looked up by attribute path, per key: building whole state dicts for it cost every Apply call
        milliseconds (an SDXL UNet has ~2,500 tensors), where most files need a few hundred lookups.
        """
        for holder in self.holders:
            try:
                return tuple(comfy.utils.get_attr(holder, key).shape)
            except AttributeError:
                continue
        return None


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


def _target(model, clip) -> _Target:
    holders = (getattr(model, "model", None), getattr(clip, "cond_stage_model", None))
    holders = tuple(h for h in holders if h is not None)
    return _Target(key_map_for(model, clip), holders, model_family(model) if model is not None else None)


def load_patches(tensors: dict, key_map: dict) -> tuple[dict, list[str]]:
    """Return ComfyUI's patches for a LoRA state dict and the LoRA keys that matched nothing."""
    converted = comfy.lora_convert.convert_lora(tensors)
    with _collect_unmatched() as collector:
        patches = comfy.lora.load_lora(converted, key_map)
    return patches, collector.keys


def _read_state(item: LoraToApply):
    """Return ``(state with the file's own names, None)`` or ``(None, why lora/ cannot read it)``.

    Raises:
        ValueError: for a damaged file (a module missing a factor, factor shapes that do not chain), naming the
            file, the module and the shapes.
    """
    try:
        return lora_keys.state_from_dict(item.tensors, item.metadata, source=item.label, canonical=False), None
    except lora_keys.DamagedLoraError:
        raise
    except ValueError as exc:  # not a LoRA to lora/ (maybe a format only ComfyUI reads, e.g. OFT)
        return None, str(exc)


def _names_comfy_maps(state, key_map: dict) -> dict[str, str]:
    """Return ``{module name: the name of the same layer that ComfyUI's key map knows}`` for the modules it can.

    Tried in order: the name itself, then its canonical name (diffusers-style UNet paths, ``lora_te_`` for a
    single text encoder), then the other text-encoder spelling (``lora_te1_`` <-> ``lora_te_``).
    """
    canonical = lora_identity.canonical_names(state.modules)
    out = {}
    for name in state.modules:
        candidates = [name, canonical[name]]
        for a, b in (("lora_te1_", "lora_te_"), ("lora_te_", "lora_te1_")):
            if name.startswith(a):
                candidates.append(b + name[len(a) :])
        hit = next((c for c in candidates if c in key_map), None)
        if hit is not None:
            out[name] = hit
    return out


def _check_shapes(item: LoraToApply, state, mapped: dict[str, str], target: _Target) -> None:
    """Raise when a module's delta does not fit the weight it patches (a LoRA made for another model).

    Raises:
        ValueError: naming the file, the first modules, both shapes and the families involved.
    """
    bad = []
    for name, lora_name in mapped.items():
        key = target.key_map[lora_name]
        weight = target.shape(key) if isinstance(key, str) else None
        if weight is None:
            continue  # (key, slice) targets patch part of a fused weight; ComfyUI checks those itself
        m = state.modules[name]
        kernel = math.prod(m.mid.shape[2:]) if m.mid is not None else math.prod(m.down.shape[2:])
        out, fan_in = int(m.up.shape[0]), int(m.down.shape[1]) * kernel
        if weight[0] != out or math.prod(weight[1:]) != fan_in:
            bad.append(f"module '{name}' makes a {out} x {fan_in} change for '{key}', which is {weight}")
    if bad:
        theirs = lora_identity.family_from_shapes(state.modules) or "another model"
        ours = target.family or "another kind"
        raise ValueError(
            f"LoRA '{item.label}' does not fit this model: {len(bad)} module(s) have other shapes than the weights "
            f"they patch, e.g. {'; '.join(bad[:3])}. Its shapes are {theirs}'s; the model is {ours}."
        )


def _plan(item: LoraToApply, target: _Target) -> tuple[dict, list[str], AppliedLora]:
    """Return ``(patches, unmatched keys, report)`` for one LoRA: ComfyUI's reading, converted where it is blind.

    ComfyUI reads the file first, exactly as core Load LoRA does. The modules whose keys its key map does not
    know (diffusers/peft UNet names, ``lora_te1_`` text encoders without ``text_model``), and every module of a
    file whose alphas live in diffusers' header (ComfyUI ignores it and applies alpha = rank), are then read by
    ``lora.keys``, renamed to what the key map knows, and given to ComfyUI again as kohya tensors.

    Raises:
        ValueError: a damaged file, a LoRA whose shapes do not fit the model, or a file of which no key applies.
    """
    report = AppliedLora(item.label, item.strength_model, item.strength_clip)
    patches, unmatched = load_patches(item.tensors, target.key_map)
    if patches and not unmatched and _comfy_reading_suffices(item, patches, target):
        return patches, unmatched, report
    state, unreadable = _read_state(item)
    if state is not None:
        warning = lora_families.family_disagreement(state, item.metadata)
        if warning:
            report.warnings.append(warning)
        mapped = _names_comfy_maps(state, target.key_map)
        _check_shapes(item, state, mapped, target)
        every = {lora_keys.module_part(k) for k in item.tensors} - {None}
        convert = {lora_keys.module_part(k) for k in unmatched} - {None}
        if lora_keys.alphas_in_header(item.tensors, item.metadata):
            convert = every
        if convert:
            patches, unmatched, report.converted = _convert(item, convert, mapped, target)
            if report.converted:
                report.path = "converted" if report.converted == len(state.modules) else "ComfyUI + converted"
    if not patches:
        detail = f": {unreadable}" if unreadable else ""
        raise ValueError(
            f"LoRA '{item.label}' applies to nothing: none of its {len(item.tensors)} keys matches a weight of "
            f"this model or CLIP (first keys {sorted(item.tensors)[:3]}){detail}"
        )
    return patches, unmatched, report


def _comfy_reading_suffices(item: LoraToApply, patches: dict, target: _Target) -> bool:
    """Return True when ComfyUI's own reading of a file (every key matched) needs nothing from ``lora/``.

    That is: no alphas in a diffusers header (ComfyUI would ignore them), no metadata claiming another family
    than the model's (the warning is worked out on the slow path), and every LoRA patch's factors chain and make
    a change of its weight's shape, checked on ComfyUI's own adapters. Anything else takes the full path, which
    reads the file with ``lora.keys`` and explains the problem with module names. Skipping that read for the
    common file keeps Apply as fast as core Load LoRA (the read cost ~4 ms per file on the tiny model).
    """
    if lora_keys.alphas_in_header(item.tensors, item.metadata):
        return False
    claimed = lora_families.family_from_metadata(item.metadata)
    if claimed is not None and claimed != target.family:
        return False
    for key, patch in patches.items():
        weights = getattr(patch, "weights", None)
        if getattr(patch, "name", None) != "lora" or not isinstance(key, str) or not isinstance(weights, tuple):
            continue  # other adapters (LoHa, LoKr, diff...) and fused-weight slices: ComfyUI's own checks
        if len(weights) < 6 or weights[5] is not None:
            return False  # a layout this check does not know, or a reshaped weight: the full path decides
        up, down, mid = weights[0], weights[1], weights[3]
        weight = target.shape(key)
        kernel = math.prod(mid.shape[2:]) if mid is not None else math.prod(down.shape[2:])
        chains = up.shape[1] == (mid.shape[0] if mid is not None else down.shape[0])
        if weight is None or not chains or weight[0] != up.shape[0]:
            return False
        if math.prod(weight[1:]) != down.shape[1] * kernel:
            return False
    return True


def _convert(item: LoraToApply, convert: set, mapped: dict[str, str], target: _Target):
    """Return ``(patches, unmatched, modules converted)``: the ``convert`` modules that ``lora.keys`` can name for
    ComfyUI's key map, handed to ComfyUI as kohya tensors under those names, plus ComfyUI's own reading of the
    rest (modules nobody maps stay there, so the report lists their keys as the file writes them)."""
    groups: dict = {}
    for key, tensor in item.tensors.items():
        groups.setdefault(lora_keys.module_part(key), {})[key] = tensor
    keep, renamed, extras = {}, {}, {}
    for part, group in groups.items():
        sub = None
        if part in convert and any(lora_keys.is_factor_key(k) for k in group):
            sub = lora_keys.state_from_dict(group, item.metadata, source=item.label, canonical=False)
            names = {n: mapped.get(n) or _names_comfy_maps(sub, target.key_map).get(n) for n in sub.modules}
        if sub is None or None in names.values():
            keep.update(group)
            continue
        renamed.update((names[n], m) for n, m in sub.modules.items())
        for key, tensor in sub.extras.items():
            mod, _, suffix = key.rpartition(".")
            extras[f"{names.get(mod, mod)}.{suffix}"] = tensor
    patches, unmatched = load_patches(keep, target.key_map) if keep else ({}, [])
    if renamed:
        kohya = lora_keys.to_kohya_dict(lora_state.LoraState(renamed, {}, extras, item.label))
        more, still = load_patches(kohya, target.key_map)
        patches.update(more)
        unmatched += still
    return patches, unmatched, len(renamed)


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
        ValueError: a damaged LoRA, one whose shapes do not fit the model, or one of which no key applies;
            the message names the file.
    """
    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    target = _target(model, clip)
    applied = []
    for item in loras:
        patches, unmatched, report = _plan(item, target)
        report.strength_clip = item.strength_clip if new_clip is not None else None
        report.unmatched = unmatched
        report.trigger_words = lora_metadata.trigger_words(item.metadata)
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
        for warning in report.warnings:
            log.warning("LoRA '%s': %s", item.label, warning)
        applied.append(report)
    return new_model, new_clip, applied


def _path_words(a: AppliedLora) -> str:
    if a.path == "ComfyUI":
        return "ComfyUI's key map"
    if a.path == "converted":
        return f"LoRA Workbench (all {a.converted} modules converted to names ComfyUI maps)"
    return f"ComfyUI's key map, and LoRA Workbench for {a.converted} modules it does not map"


def format_report(applied: list[AppliedLora], total_strength: float, warning: str | None) -> str:
    """Return the human-readable report string of Apply LoRA Stack."""
    lines = [f"{len(applied)} LoRA(s) applied; total model strength {total_strength:.2f}"]
    if warning:
        lines.append(f"WARNING: {warning}")
    for i, a in enumerate(applied, 1):
        lines.append(
            f"{i}. {a.label}: model {a.strength_model:g}, "
            f"clip {'-' if a.strength_clip is None else format(a.strength_clip, 'g')}; "
            f"patched {a.model_keys} model and {a.clip_keys} CLIP weights; read by {_path_words(a)}"
        )
        for w in a.warnings:
            lines.append(f"   WARNING: {w}")
        if a.unmatched:
            shown = ", ".join(a.unmatched[:5]) + (", ..." if len(a.unmatched) > 5 else "")
            lines.append(f"   {len(a.unmatched)} key(s) matched nothing: {shown}")
    return "\n".join(lines)
