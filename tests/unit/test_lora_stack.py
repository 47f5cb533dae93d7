"""LORA_STACK normalisation from other packs' shapes, our widget rows, and LoRA name resolution."""

from __future__ import annotations

import pytest

from lora_workbench.lora.stack import normalize_stack, resolve_lora_name

AVAILABLE = ["style/ink.safetensors", "char/sks_dog.safetensors", "detail.safetensors", "v2/detail.safetensors"]


@pytest.mark.parametrize(
    ("producer", "items", "expected"),
    [
        ("Comfyroll", [("style\\ink.safetensors", 0.8, 0.6), ("None", 1.0, 1.0)],
         [("style\\ink.safetensors", 0.8, 0.6)]),
        ("Efficiency", [["detail.safetensors", 1, 0.5]], [("detail.safetensors", 1.0, 0.5)]),
        ("LoRA Manager", [("/home/u/ComfyUI/models/loras/char/sks_dog.safetensors", 0.7, 0.7)],
         [("/home/u/ComfyUI/models/loras/char/sks_dog.safetensors", 0.7, 0.7)]),
        ("pair", [("detail.safetensors", 0.4)], [("detail.safetensors", 0.4, 0.4)]),
        ("clip None", [("detail.safetensors", 0.4, None)], [("detail.safetensors", 0.4, 0.4)]),
        ("widget", [{"on": True, "lora": "detail.safetensors", "strength": 0.9, "strength_clip": None},
                    {"on": False, "lora": "style/ink.safetensors", "strength": 1.0},
                    {"on": True, "lora": "None", "strength": 1.0}],
         [("detail.safetensors", 0.9, 0.9)]),
        ("API wrapper", {"__value__": [{"on": True, "lora": "a", "strength": 1, "strength_clip": 0.2}]},
         [("a", 1.0, 0.2)]),
        ("empty", None, []),
    ],
)  # fmt: skip
def test_normalize_stack_shapes(producer, items, expected):
    out = normalize_stack(items)
    assert out == expected, producer
    assert all(isinstance(s, float) for _, a, b in out for s in (a, b))


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([("a", "strong", 1.0)], r"entry 0: .*model strength must be a number, got 'strong'"),
        ([("a", 1.0, 1.0), (3, 1.0)], r"entry 1: .*must start with a LoRA name"),
        ([("a", 1.0, 1.0, 9)], r"4 elements"),
        ([{"on": True, "strength": 1}], r"has no 'lora' name"),
        ([("a", float("nan"))], r"must be finite"),
        ("a.safetensors", r"got a string"),
    ],
)
def test_normalize_stack_errors(items, message):
    with pytest.raises(ValueError, match=message):
        normalize_stack(items)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("style/ink.safetensors", "style/ink.safetensors"),
        ("style\\ink.safetensors", "style/ink.safetensors"),
        ("style/ink", "style/ink.safetensors"),
        ("sks_dog", "char/sks_dog.safetensors"),
        ("/home/u/ComfyUI/models/loras/char/sks_dog.safetensors", "char/sks_dog.safetensors"),
        ("C:\\ComfyUI\\models\\loras\\v2\\detail.safetensors", "v2/detail.safetensors"),
        ("detail", "detail.safetensors"),
    ],
)
def test_resolve_lora_name(name, expected):
    assert resolve_lora_name(name, AVAILABLE) == expected


def test_resolve_unknown_lists_closest():
    with pytest.raises(LookupError, match=r"'sks_dgo' not found.*closest: \['char/sks_dog.safetensors'\]"):
        resolve_lora_name("sks_dgo", AVAILABLE)


def test_resolve_ambiguous_basename():
    with pytest.raises(LookupError, match="ambiguous"):
        resolve_lora_name("detail", ["a/detail.safetensors", "b/detail.safetensors"])
