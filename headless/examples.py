"""The main job: run the example workflows headless on the tiny model and say where the files went.

``python -m lora_workbench.headless.examples [--output DIR]`` (what ``scripts/run_example.sh``
calls) prepares what the examples need in the ComfyUI base directory (the tiny checkpoint, random
example LoRAs, the drawn training images) and executes each example through ComfyUI's executor.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from .comfy_env import CACHE_DIR, REPO_ROOT

EXAMPLES_DIR = REPO_ROOT / "examples"
TRAIN_IMAGES = EXAMPLES_DIR / "train_images"
DATASET_INPUT_NAME = "lora_workbench_example"
MAIN_EXAMPLES = ("stack_loras.json", "train_then_stack.json")


def prepare_assets(base: Path) -> None:
    """Put the tiny checkpoint, the example LoRAs and the training images into ComfyUI's folders.

    Requires ComfyUI imported (``comfy_env.import_comfy_core``): the example LoRAs are named
    after its UNet table.
    """
    from .example_loras import write_example_set
    from .tiny_model import ensure_tiny_model

    model = ensure_tiny_model()
    link = base / "models" / "checkpoints" / model.name
    if not link.exists():
        os.symlink(model, link)
    write_example_set(base / "models" / "loras")
    images = base / "input" / DATASET_INPUT_NAME
    if not images.exists():
        shutil.copytree(TRAIN_IMAGES, images)


def main(argv: list[str] | None = None) -> int:
    """Run the main examples; print each written file. Exit code 1 when a workflow fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("output"), help="where to copy the results")
    parser.add_argument("--base", type=Path, default=CACHE_DIR / "comfy_home", help="ComfyUI base directory")
    parser.add_argument("examples", nargs="*", default=list(MAIN_EXAMPLES), help="example file names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from . import comfy_env, runner, ui_format
    from .cli import collect_outputs

    base = comfy_env.import_comfy_core(args.base)
    prepare_assets(base)
    runtime = comfy_env.import_comfyui(base)
    status = 0
    for name in args.examples:
        path = EXAMPLES_DIR / name
        if not path.is_file():
            print(f"{name}: no such example in {EXAMPLES_DIR}", file=sys.stderr)
            status = 2
            continue
        print(f"running {path.relative_to(REPO_ROOT)}", file=sys.stderr)
        prompt = ui_format.load_workflow(path, runtime.node_classes)
        try:
            result = runner.run_prompt(runtime, prompt)
        except runner.WorkflowError as e:
            print(f"{name}: {e}", file=sys.stderr)
            status = 1
            continue
        output_root = Path(runtime.folder_paths.get_output_directory())
        for written in collect_outputs(result.ui_outputs, output_root, args.output / path.stem):
            print(written)
        # Nodes that write elsewhere (Save LoRA into models/loras) report their path as text.
        for node_output in result.ui_outputs.values():
            for text in node_output.get("text", []):
                if str(text).endswith(".safetensors"):
                    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
