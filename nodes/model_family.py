"""The base family ("sd1", "sdxl", ...) of a ComfyUI MODEL, told by its model class.

ComfyUI glue: the keys are class names from ``comfy/supported_models.py`` (the type of
``model.model.model_config``), the values the family names ``lora.families`` uses. Only classes whose
LoRA key naming is the family's own are listed: SD 3.5 loads as ``SD3``; ``FluxInpaint`` (Flux.1 Fill) is
Flux.1 with a wider input; ``Flux2`` (Flux.2) and ``Chroma`` are other architectures, so they are not "flux".
"""

from __future__ import annotations

# ComfyUI model classes (model_config) -> the family names lora.families uses.
_FAMILY_BY_MODEL_CLASS = {
    "SD15": "sd1",
    "SD15_instructpix2pix": "sd1",
    # SD20 covers SD 2.x, eps and v-prediction alike (ComfyUI picks the model type per checkpoint).
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
    # SD3 covers SD 3 medium and SD 3.5 (large, medium, turbo).
    "SD3": "sd3",
    "Flux": "flux",
    "FluxSchnell": "flux",
    "FluxInpaint": "flux",
}


def model_family(model) -> str | None:
    """Return the base family ("sd1", "sdxl", ...) of a ComfyUI MODEL, or None when unknown."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return _FAMILY_BY_MODEL_CLASS.get(type(config).__name__) if config is not None else None
