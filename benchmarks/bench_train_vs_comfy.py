"""Our Train LoRA node against ComfyUI core's TrainLoraNode, like for like, on the tiny SD1.5 checkpoint (CPU).

Both nodes get the same MODEL (CheckpointLoaderSimple, called under ``torch.inference_mode`` as ComfyUI's
executor calls every node), the same images at the same crops with their own captions (examples/train_images,
through our Image Folder Dataset; core gets them VAE-encoded and CLIP-encoded by this script, as a workflow's
VAE Encode and CLIP Text Encode nodes would), and the same resolution, batch, rank, alpha, learning rate,
optimizer (AdamW; ours fused where torch supports it), steps, dtype (fp32) and gradient checkpointing (off).
Targets: core puts a LoRA on every weight of the UNet with two or more dimensions and trains a full difference of
every 1-D weight (norms) and bias; it has no setting to narrow that. Ours gets those same layers as
``custom_targets`` (every Linear and Conv2d), except the ones whose size is below the rank (ours refuses a rank
above a layer's size; core accepts it); it trains no norm or bias differences. ``--ours-targets attention``
compares our default (attention projections) instead. The script prints every setting that differs, and the
trainable parameter count of each side.

Core's step at batch b runs the UNet on b * b items (ComfyUI 0.3.75): its sampler applies the conditioning of
each of the b picked captions to every latent of the batch and averages the predictions; that is core's own work
and is left as it is (the "items" column shows the UNet batch of each side).

Seconds per step are the time between optimizer steps after one warm-up step (``_common.StepClock``: set-up,
encoding and the first step's one-time costs are out on both sides); "call s" is the whole node call including
the encoding of images and prompts on both sides (ours encodes inside the node; core's encoding is timed here).
Each repeat runs every configuration in one fresh process per side, the sides alternating.

    .venv/bin/python benchmarks/bench_train_vs_comfy.py [--repeats 3] [--steps 3] [--ours-targets core|attention]

About 3-4 minutes on 2 quiet cores; ``--quick`` runs one small configuration once (development). Peak memory of the
same comparison: ``bench_train_memory.py``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import StepClock, core_layers, fmt_spread, header, ratio_spread, settings_table
from bench_train_memory import train_comfy_side

RANK = 8
ALPHA = 1.0  # core fixes alpha 1.0 for a new LoRA; ours takes it as a setting
LR = 1e-4
WARMUP = 1
CONFIGS = [(64, 1), (64, 4), (128, 1)]
QUICK_CONFIGS = [(64, 1)]
CHECKPOINT = "lora_workbench_tiny_sd15.safetensors"


def _settings(targets: str, ours_layers: int, skipped: list[str], core_lora_layers: int, core_1d: int, biases: int):
    ours_t = (
        f"LoRA on {ours_layers} Linear/Conv2d layers (core's set, custom_targets)"
        if targets == "core"
        else "LoRA on attention projections (to_q/k/v/out.0, our default)"
    )
    core_t = f"LoRA on {core_lora_layers} layers + diffs of {core_1d} 1-D weights and {biases} biases"
    return [
        ("model", "tiny SD1.5 checkpoint, fp32 on CPU", "tiny SD1.5 checkpoint, fp32 on CPU"),
        ("images, captions", "8 example images, their captions", "8 example images, their captions"),
        ("resolution, batch, steps", "as in the table", "as in the table"),
        ("rank / alpha", f"{RANK} / {ALPHA:g} (alpha set; default = rank)", f"{RANK} / {ALPHA:g} (fixed)"),
        ("learning rate", f"{LR:g} (our default)", f"{LR:g} (core default 0.0005)"),
        ("optimizer", "AdamW (fused where supported)", "AdamW (torch default: foreach)"),
        ("dtype", "fp32 (precision default)", "fp32 (training_dtype and lora_dtype, defaults bf16)"),
        ("gradient checkpointing", "off (our default)", "off (core default on)"),
        ("encoding", "inside the node (VAE, CLIP)", "outside (VAE Encode, CLIP Text Encode)"),
        ("targets", ours_t, core_t + (f"; ours cannot: {', '.join(skipped)}" if skipped else "")),
        ("objective", "MSE on the model's output (epsilon)", "MSE on the denoised x0"),
        ("noise levels", "uniform DDPM steps", "uniform percent -> sigma"),
        ("gradient clipping", "1.0 (fixed)", "none"),
        ("UNet items per step", "batch (one caption per image)", "0.3.75: batch^2, each caption x every latent"),
        ("per-step extras", "loss.item(), progress", "loss.item(), progress bar"),
    ]


def _child(side: str, configs: list, steps: int, targets: str) -> None:
    """Run every configuration once for ``side``; print one JSON line per configuration."""
    from lora_workbench.headless import comfy_env, examples

    base = comfy_env.import_comfy_core(Path(tempfile.mkdtemp(prefix="bench_train_")))
    atexit.register(shutil.rmtree, base, ignore_errors=True)  # its models, inputs, checkpoints
    examples.prepare_assets(base)
    runtime = comfy_env.import_comfyui(base)
    import torch

    with torch.inference_mode():  # as ComfyUI's executor runs every node
        model, clip, vae = runtime.nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)[:3]
    layers, skipped = core_layers(model.model.diffusion_model, RANK)
    dm = model.model.diffusion_model
    info = {
        "ours_layers": len(layers),
        "skipped": skipped,
        "core_lora_layers": len(layers) + len(skipped),
        "core_1d": sum(1 for n, p in dm.named_parameters() if n.endswith("weight") and p.dim() < 2),
        "biases": sum(1 for n, p in dm.named_parameters() if n.endswith("bias")),
    }
    print(json.dumps({"info": info}), flush=True)
    clock = StepClock()
    items = []  # the batch size of each UNet call: the work a step really does
    dm.register_forward_pre_hook(lambda _m, args: items.append(args[0].shape[0]))
    folder = runtime.node_classes["LoraWorkbenchImageFolder"]
    for size, batch in configs:
        dataset = folder.execute(
            examples.DATASET_INPUT_NAME, "sks", "toy", "a photo of {trigger} {class_noun}", size, "center", False,
            False, 1, 0.0,
        ).result[0]  # fmt: skip
        clock.reset()
        items.clear()
        started = time.perf_counter()
        # Both nodes run as the memory benchmark runs them (core gets encoded latents and conditioning, one per image).
        train_comfy_side(
            runtime,
            side,
            model,
            clip,
            vae,
            dataset,
            steps=WARMUP + steps,
            rank=RANK,
            batch=batch,
            on_start=lambda: None,
            lr=LR,
            alpha=ALPHA,
            custom_targets=",".join(layers) if side != "core" and targets == "core" else "",
            run_name=f"bench_{size}_{batch}",
        )
        call = time.perf_counter() - started
        out = {"side": side, "size": size, "batch": batch, "s_per_step": clock.seconds_per_step(WARMUP)}
        out.update(call_s=call, trainable=clock.trainable, unet_items=max(items))
        print(json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after 1 warm-up (default 3)")
    parser.add_argument(
        "--ours-targets",
        choices=("core", "attention"),
        default="core",
        help="our layers: core's (like for like, default) or our default attention projections",
    )
    parser.add_argument("--quick", action="store_true", help="one small configuration (development)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    if args.child:
        _child(args.child, configs, args.steps, args.ours_targets)
        return

    header(
        "bench_train_vs_comfy: Train LoRA (DreamBooth) node vs ComfyUI core's Train LoRA node (CPU)",
        "seconds per optimizer step and per node call, like-for-like settings, tiny SD1.5 checkpoint "
        "(UNet 107 M parameters)",
        "ComfyUI core TrainLoraNode (comfy_extras/nodes_train.py) of the ComfyUI imported here",
        [
            f"{args.repeats} repeats x (1 warm-up + {args.steps} timed steps) per side and configuration; "
            f"our targets: {args.ours_targets}"
        ],
    )
    t_start = time.time()
    rows, info = [], None
    for rep in range(args.repeats):
        order = ("ours", "core") if rep % 2 == 0 else ("core", "ours")
        for side in order:
            cmd = [sys.executable, __file__, "--child", side, "--steps", str(args.steps)]
            cmd += ["--ours-targets", args.ours_targets] + (["--quick"] if args.quick else [])
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if r.returncode:
                sys.stderr.write(r.stderr[-5000:])
                raise SystemExit(f"child {side} failed (exit {r.returncode})")
            for line in r.stdout.splitlines():
                if line.startswith("{"):
                    row = json.loads(line)
                    if "info" in row:
                        info = row["info"]
                    else:
                        rows.append({**row, "rep": rep})
                        print(json.dumps(rows[-1]), flush=True)  # partial results survive an interrupted run
        print(f"repeat {rep + 1}/{args.repeats} done ({time.time() - t_start:.0f} s)", flush=True)

    print("Settings (same on both sides unless marked):")
    settings_table(_settings(args.ours_targets, **info), "ours", "core")

    def col(side, size, batch, key):
        ordered = sorted(rows, key=lambda r: r["rep"])
        return [r[key] for r in ordered if (r["side"], r["size"], r["batch"]) == (side, size, batch)]

    print()
    print(f"wall {time.time() - t_start:.0f} s. Values: mean (min-max) over {args.repeats} repeats; ours/core: ratio")
    print("of the means (range of the per-repeat ratios). call s: the whole node call for 1 + steps steps, with")
    print("encoding; params: trainable elements (what the optimizer updates); items: the batch of the UNet's forward")
    print("pass in a training step (core applies each picked caption's conditioning to every latent of the batch).")
    print(
        f"{'size':>4} {'batch':>5} | {'ours s/step':>21} {'core s/step':>21} {'ours/core':>16} | "
        f"{'ours call s':>21} {'core call s':>21} {'ours/core':>16} | {'params ours / core':>19} | {'items':>7}"
    )
    for size, batch in configs:
        o, c = col("ours", size, batch, "s_per_step"), col("core", size, batch, "s_per_step")
        oc, cc = col("ours", size, batch, "call_s"), col("core", size, batch, "call_s")
        op, cp = col("ours", size, batch, "trainable")[0], col("core", size, batch, "trainable")[0]
        oi, ci = col("ours", size, batch, "unet_items")[0], col("core", size, batch, "unet_items")[0]
        print(
            f"{size:>4} {batch:>5} | {fmt_spread(o):>21} {fmt_spread(c):>21} {ratio_spread(o, c):>16} | "
            f"{fmt_spread(oc, 2):>21} {fmt_spread(cc, 2):>21} {ratio_spread(oc, cc):>16} | "
            f"{f'{op / 1e6:.3f}M / {cp / 1e6:.3f}M':>19} | {f'{oi} / {ci}':>7}"
        )


if __name__ == "__main__":
    main()
