"""The adapter core imports only torch, safetensors, numpy and the stdlib: never ComfyUI, peft or diffusers."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("comfy", "comfy_api", "folder_paths", "nodes", "server", "execution", "peft", "diffusers", "transformers")
MODULES = ("state", "safeio", "keys", "metadata", "merge", "scale", "stack", "prompt_tags")


def test_lora_package_imports_nothing_forbidden():
    code = (
        "import importlib, json, sys\n"
        f"for m in {MODULES!r}:\n"
        "    importlib.import_module('lora_workbench.lora.' + m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    bad = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert not bad, f"lora/ pulled in {bad}"
    assert "lora_workbench.lora.merge" in loaded
