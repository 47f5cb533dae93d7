"""Our Train LoRA node against ComfyUI's own TrainLoraNode, on the tiny SD1.5-shaped model (CPU, fp32).

Same images (examples/train_images), same rank 8, batch 1 and 4, 64x64 and 128x128. Seconds per step are
taken as (t(N2 steps) - t(N1 steps)) / (N2 - N1), so set-up (copying the model, encoding images) cancels out;
peak RSS comes from a fresh subprocess per configuration. Core trains a LoRA on every weight of the UNet
(alpha 1); ours on the attention projections (its default), which is what the table compares: what each node
does with its defaults.

    .venv/bin/python benchmarks/bench_train_vs_comfy.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N1, N2 = 1, 3


def _one(which: str, size: int, batch: int, steps: int) -> float:
    from lora_workbench.headless import comfy_env, examples

    base = comfy_env.import_comfy_core(Path(tempfile.mkdtemp(prefix="bench_train_")))
    examples.prepare_assets(base)
    runtime = comfy_env.import_comfyui(base)
    import numpy as np
    import torch
    from PIL import Image

    nodes = runtime.nodes
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("lora_workbench_tiny_sd15.safetensors")[:3]
    started = time.perf_counter()
    if which == "core":
        images = sorted((base / "input" / examples.DATASET_INPUT_NAME).glob("*.jpg"))
        with torch.inference_mode():
            pixels = [
                torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((size, size)), np.float32) / 255)[None]
                for p in images
            ]
            latents = [{"samples": vae.encode(px)} for px in pixels]
            cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks toy"))
        train = runtime.node_classes["TrainLoraNode"]
        started = time.perf_counter()
        with torch.inference_mode():
            train.execute(
                model=[model],
                latents=latents,
                positive=[cond],
                batch_size=[batch],
                grad_accumulation_steps=[1],
                steps=[steps],
                learning_rate=[1e-4],
                rank=[8],
                optimizer=["AdamW"],
                loss_function=["MSE"],
                seed=[0],
                training_dtype=["fp32"],
                lora_dtype=["fp32"],
                algorithm=["LoRA"],
                gradient_checkpointing=[False],
                existing_lora=["[None]"],
            )
    else:
        folder = runtime.node_classes["LoraWorkbenchImageFolder"]
        dataset = folder.execute(
            examples.DATASET_INPUT_NAME,
            "sks",
            "toy",
            "a photo of {trigger} {class_noun}",
            size,
            "center",
            False,
            False,
            1,
            0.0,
        ).result[0]
        train = runtime.node_classes["LoraWorkbenchTrain"]
        started = time.perf_counter()
        with torch.inference_mode():
            train.execute(
                model=model,
                clip=clip,
                vae=vae,
                dataset=dataset,
                run_name="bench",
                resume=False,
                steps=steps,
                rank=8,
                batch_size=batch,
                learning_rate=1e-4,
            )
    return time.perf_counter() - started


def main() -> None:
    """Run each configuration in subprocesses and print the table."""
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        which, size, batch, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        seconds = _one(which, size, batch, steps)
        print(json.dumps({"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    print(
        f"{'size':>4} {'batch':>5} | {'ours s/step':>11} {'core s/step':>11} {'ratio':>6} | "
        f"{'ours RSS MB':>11} {'core RSS MB':>11} {'ratio':>6}",
        flush=True,
    )
    for size in (64, 128):
        for batch in (1, 4):
            row = {}
            for which in ("ours", "core"):
                runs = []
                for steps in (N1, N2):
                    out = subprocess.run(
                        [sys.executable, __file__, "--one", which, str(size), str(batch), str(steps)],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                row[which] = ((runs[1]["seconds"] - runs[0]["seconds"]) / (N2 - N1), max(r["rss_mb"] for r in runs))
            (os_, orss), (cs, crss) = row["ours"], row["core"]
            print(
                f"{size:>4} {batch:>5} | {os_:>11.3f} {cs:>11.3f} {os_ / cs:>6.2f} | {orss:>11.0f} {crss:>11.0f} "
                f"{orss / crss:>6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
