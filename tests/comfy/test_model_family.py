"""The ComfyUI model-class -> base family table, against the running ComfyUI's own model classes."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest

from lora_workbench.lora import families
from lora_workbench.nodes import model_family

pytestmark = pytest.mark.slow


def _model_of(config_class) -> SimpleNamespace:
    """A stand-in MODEL (ModelPatcher) whose ``model.model_config`` is an instance of ``config_class``."""
    return SimpleNamespace(model=SimpleNamespace(model_config=config_class.__new__(config_class)))


def test_every_class_named_is_a_comfyui_model_class_of_a_known_family(comfy):
    supported = importlib.import_module("comfy.supported_models")
    for name, family in model_family._FAMILY_BY_MODEL_CLASS.items():
        assert family in families.FAMILIES, name
        cls = getattr(supported, name, None)
        assert cls is not None, f"ComfyUI has no model class '{name}'"
        assert model_family.model_family(_model_of(cls)) == family


@pytest.mark.parametrize(
    ("name", "family"),
    [("SD20", "sd2"), ("SD21UnclipH", "sd2"), ("SD3", "sd3"), ("Flux", "flux"), ("FluxInpaint", "flux"),
     ("Flux2", None), ("Chroma", None)],
)  # fmt: skip
def test_other_architectures_have_no_family(comfy, name, family):
    # Flux.2 and Chroma are not Flux.1: a "flux" LoRA's layers do not fit them.
    cls = getattr(importlib.import_module("comfy.supported_models"), name, None)
    if cls is None:
        pytest.skip(f"this ComfyUI has no '{name}'")
    assert model_family.model_family(_model_of(cls)) == family


def test_no_model_or_no_config_is_unknown():
    assert model_family.model_family(None) is None
    assert model_family.model_family(SimpleNamespace(model=None)) is None
