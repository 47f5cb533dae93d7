"""Prepare a ComfyUI base directory for the browser tests (run in a subprocess).

Usage: ``python make_fixtures.py BASE``. Lays out BASE with this pack in ``custom_nodes``, links the
tiny SD1.5-shaped checkpoint (built once into the cache), writes small kohya-format LoRAs for it
into ``models/loras`` and copies the example training images (``examples/train_images``) to
``input/lora_workbench_example``. A subprocess, because building them imports ComfyUI, which must not be
imported into the pytest process with another base directory (the ``tests/comfy`` suite does that).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from lora_workbench.headless import comfy_env, example_loras, tiny_model

REPO = Path(__file__).resolve().parents[2]
DATASET = "lora_workbench_example"
# name -> (seed, rank, trigger phrase or None). One in a subfolder, one without trigger words.
LORAS = {
    "lw_style.safetensors": (11, 4, "sks style, watercolor"),
    "lw_plain.safetensors": (12, 4, None),
    "chars/lw_char.safetensors": (13, 8, "ohwx person"),
}


def main(base: Path) -> dict:
    base = base.resolve()
    comfy_env.prepare_base_directory(base)
    comfy_env.import_comfy_core(base)
    model = tiny_model.ensure_tiny_model()
    link = base / "models" / "checkpoints" / model.name
    if not link.exists():
        os.symlink(model, link)
    for name, (seed, rank, trigger) in LORAS.items():
        path = base / "models" / "loras" / name
        if not path.exists():
            example_loras.write_example_lora(path, seed=seed, rank=rank, trigger=trigger, text_encoder=True)
    # The shipped example's training images, where examples/train_then_stack.json looks for them.
    dataset = base / "input" / DATASET
    if not dataset.exists():
        shutil.copytree(REPO / "examples" / "train_images", dataset)
    return {"checkpoint": model.name, "loras": sorted(LORAS), "dataset": DATASET}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
