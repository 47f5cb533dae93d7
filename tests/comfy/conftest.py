"""One real ComfyUI per test session, with this pack loaded through ComfyUI's custom-node loading,
and one tiny SD1.5-shaped checkpoint (built once, cached on disk, never committed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lora_workbench.headless import comfy_env, runner, tiny_model

# Test helpers beside this file (graphs.py); pytest's importlib mode does not add the folder.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> comfy_env.ComfyRuntime:
    """The imported ComfyUI, its base directory a fresh session folder with the tiny model linked in."""
    base = tmp_path_factory.mktemp("comfy_home")
    comfy_env.import_comfy_core(base)
    model = tiny_model.ensure_tiny_model()
    link = base / "models" / "checkpoints" / model.name
    if not link.exists():
        os.symlink(model, link)
    return comfy_env.import_comfyui(base)


@pytest.fixture(scope="session")
def ckpt_name(comfy) -> str:
    """The tiny checkpoint's name as CheckpointLoaderSimple lists it."""
    return tiny_model.TINY_MODEL_NAME


@pytest.fixture(scope="session")
def loras_dir(comfy) -> Path:
    """The ``models/loras`` folder of the session's ComfyUI."""
    return Path(comfy.base) / "models" / "loras"


@pytest.fixture
def run(comfy):
    """Run an API-format prompt through ComfyUI's executor; returns ``runner.RunResult``."""

    def _run(prompt: dict, **kwargs) -> runner.RunResult:
        return runner.run_prompt(comfy, prompt, echo=False, **kwargs)

    return _run
