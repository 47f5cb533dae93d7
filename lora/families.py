"""Base model families ("sd1", "sd2", "sdxl", "sd3", "flux"): the names other tools write for them, and telling a
LoRA's family from its tensor shapes and its metadata.

Shapes decide (:func:`identity.family_from_shapes`); metadata (ours, kohya's ``ss_*``, the SAI model spec's
``modelspec.*``) is only a hint, because shared files often carry wrong metadata.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import identity, keys
from .state import LoraState

# Our own metadata key for the family (``metadata.OURS + "base_family"``).
FAMILY_KEY = "lora_workbench.base_family"

# family -> (kohya ss_base_model_version, modelspec architecture, modelspec implementation, resolution)
FAMILIES: dict[str, tuple[str, str, str, str]] = {
    "sd1": ("sd_v1", "stable-diffusion-v1", "diffusers", "512x512"),
    "sd2": ("sd_v2", "stable-diffusion-v2-512", "diffusers", "512x512"),
    "sdxl": (
        "sdxl_base_v1-0",
        "stable-diffusion-xl-v1-base",
        "https://github.com/Stability-AI/generative-models",
        "1024x1024",
    ),
    "sd3": ("sd3", "stable-diffusion-3-medium", "https://github.com/Stability-AI/SD3.5", "1024x1024"),
    "flux": ("flux1", "flux-1-dev", "https://github.com/black-forest-labs/flux", "1024x1024"),
}

# Prefix tests on lower-cased values, most specific first.
_SS_VERSION_TO_FAMILY = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("sd3", "sd3"), ("flux", "flux"))
_ARCH_TO_FAMILY = (
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-3", "sd3"),
    ("flux", "flux"),
)


def family_metadata(family: str) -> dict[str, str]:
    """Return the metadata keys that name ``family`` (kohya's, the model spec's and ours), as other tools read them.

    Raises:
        KeyError: for a family not in :data:`FAMILIES`.
    """
    ss_version, arch, impl, res = FAMILIES[family]
    return {
        "ss_base_model_version": ss_version,
        "ss_v2": str(family == "sd2"),
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": impl,
        "modelspec.resolution": res,
        FAMILY_KEY: family,
    }


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """Return the base family a file's metadata claims (ours, kohya's, the model spec's), or None."""
    ours = metadata.get(FAMILY_KEY)
    if ours in FAMILIES:
        return ours
    ver = (metadata.get("ss_base_model_version") or "").lower()
    for lead, fam in _SS_VERSION_TO_FAMILY:
        if ver.startswith(lead):
            return fam
    arch = (metadata.get("modelspec.architecture") or "").lower()
    for lead, fam in _ARCH_TO_FAMILY:
        if arch.startswith(lead):
            return fam
    if (metadata.get("ss_v2") or "").lower() == "true":
        return "sd2"
    return None


def base_family(sd: LoraState | Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str | None:
    """Return the base model family of a LoRA: from its tensor shapes, else from what its metadata claims.

    Shapes decide (:func:`identity.family_from_shapes`: cross-attention context width, the text encoders and their
    widths, Flux/SD3 block names); shared files often carry wrong metadata, so it is only a hint, used when the
    shapes cannot tell (e.g. a UNet-only file without cross-attention modules).

    Returns:
        ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sd3"``, ``"flux"`` or None when it cannot be told.
    """
    meta = metadata if metadata is not None else (sd.metadata if isinstance(sd, LoraState) else {})
    return family_from_tensors(sd) or family_from_metadata(meta)


def family_from_tensors(sd: LoraState | Mapping[str, torch.Tensor]) -> str | None:
    """Return the family told by a LoRA's tensor shapes alone, or None (also for a dict that is no readable LoRA)."""
    if not isinstance(sd, LoraState):
        try:
            sd = keys.state_from_dict(sd, canonical=False)
        except ValueError:
            return None
    return identity.family_from_shapes(sd.modules)


def family_disagreement(sd: LoraState | Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str | None:
    """Return a warning when the metadata claims another family than the tensor shapes show, else None."""
    claimed, shown = family_from_metadata(metadata), family_from_tensors(sd)
    if claimed and shown and claimed != shown:
        return f"its metadata says {claimed}, but its tensor shapes are {shown}'s; the shapes are used"
    return None
