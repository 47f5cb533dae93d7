"""The layers below nodes/ never import ComfyUI; the adapter core not even peft or diffusers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

COMFY = ("comfy", "comfy_api", "comfy_execution", "folder_paths", "nodes", "server", "execution")
LIBRARIES = ("peft", "diffusers", "transformers")
LORA_MODULES = ("state", "safeio", "keys", "metadata", "merge", "scale", "stack", "prompt_tags")
TRAINER_MODULES = (
    "config",
    "dataset",
    "inject",
    "objective",
    "loop",
    "checkpoint",
    "loss_plot",
    "model_api",
    "diffusers_backend",
)


def _loaded_after_importing(modules: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "package, modules, forbidden",
    [("lora", LORA_MODULES, COMFY + LIBRARIES), ("trainer", TRAINER_MODULES, COMFY)],
)
def test_layer_imports_nothing_forbidden(package, modules, forbidden):
    loaded = _loaded_after_importing([f"lora_workbench.{package}.{m}" for m in modules])
    bad = [m for m in loaded if m.split(".")[0] in forbidden]
    assert not bad, f"{package}/ pulled in {bad}"
    assert f"lora_workbench.{package}.{modules[-1]}" in loaded, "the import itself must have happened"
