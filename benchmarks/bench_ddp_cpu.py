"""Data-parallel training on the CPU: step time and scaling efficiency of 2 processes (gloo) against 1.

Every side trains the same job with ``trainer.loop.train`` on the tiny diffusers parts
(``trainer.tiny_models.tiny_parts``): the same global batch, images, noise and timesteps per step (N processes
with batch b draw what 1 process with batch N x b draws), so the sides do the same arithmetic and differ only in
how it is spread. Sides, each launched by ``torchrun`` as a user would launch it:
  1 proc x 1 thread    the unit of work one core does
  1 proc x 2 threads   what one process makes of both cores without torch.distributed
  2 procs x 1 thread   torch.distributed, gloo, batch split in two, LoRA gradients all-reduced each step
Seconds per step are taken on rank 0 between the end of the first (warm-up) step and the end of the last, so
process start, imports, data encoding and set-up are left out. Speed-up = (1 proc x 1 thread) / (2 procs);
scaling efficiency = speed-up / 2 (1.0 is linear). The sides alternate within each repeat, so drift of a shared
machine hits all of them; the spread is the range over the repeats.

Run: ``.venv/bin/python benchmarks/bench_ddp_cpu.py [--repeats 3] [--steps 8] [--batch 8] [--resolution 32]``
(about 3 minutes on 2 cores). On a multi-GPU machine ``--gpus N`` times ``lora-workbench``'s engine with NCCL
instead (1 process vs N, one GPU each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import fmt_spread, header

WORDS = ["sk", "sks</w>", "to", "toy</w>", "ph", "pho", "phot", "photo</w>", "of</w>"]
MERGES = [("s", "k"), ("sk", "s</w>"), ("t", "o"), ("to", "y</w>"), ("p", "h"), ("ph", "o"), ("pho", "t")]
MERGES += [("phot", "o</w>"), ("o", "f</w>")]


def _images(folder: Path, n: int, size: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (200 - 10 * (i % 3), 210, 220))
        d = ImageDraw.Draw(img)
        d.ellipse([2 + i % 3, 2, size - 5 + i % 3, size - 3], fill=(230, 120, 30))
        img.save(folder / f"img_{i}.png")


def worker(args: argparse.Namespace) -> None:
    """One rank: train ``--steps`` steps; rank 0 prints ``{"seconds_per_step": ...}`` as the last stdout line."""
    import torch
    import torch.distributed as dist

    from lora_workbench.trainer import loop, tiny_models
    from lora_workbench.trainer.config import TrainConfig
    from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder
    from lora_workbench.trainer.diffusers_backend import DiffusersModelApi

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = args.gpus > 0
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    torch.set_num_threads(args.threads)
    parts = tiny_models.tiny_parts(tiny_models.tiny_tokenizer(WORDS, MERGES), sample_size=args.resolution // 2)
    api = DiffusersModelApi(*parts, device="cuda" if cuda else "cpu") if cuda else DiffusersModelApi(*parts)
    dataset = load_image_folder(
        args.folder, DatasetOptions(trigger="sks", class_noun="toy", resolution=args.resolution)
    )
    stamps: list[float] = []

    def on_step(step, total, loss):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    config = TrainConfig(steps=args.steps, rank=8, learning_rate=1e-4, batch_size=args.batch // world, seed=0)
    loop.train(api, dataset, config, loop.TrainCallbacks(on_step=on_step), checkpoint_dir="")
    if world > 1:
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"seconds_per_step": (stamps[-1] - stamps[0]) / (len(stamps) - 1)}), flush=True)


def _side(args: argparse.Namespace, folder: Path, procs: int, threads: int) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", __file__]
    cmd += ["--worker", "--folder", str(folder), "--threads", str(threads), "--steps", str(args.steps)]
    cmd += ["--batch", str(args.batch), "--resolution", str(args.resolution), "--gpus", str(args.gpus)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{procs} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--batch", type=int, default=8, help="the global batch (split over the processes)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--gpus", type=int, default=0, help="compare 1 GPU with this many (NCCL) instead of CPUs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    n = args.gpus or 2
    if args.gpus:
        sides = {"1 GPU": (1, 1), f"{n} GPUs": (n, 1)}
    else:
        sides = {"1 proc x 1 thread": (1, 1), "1 proc x 2 threads": (1, 2), "2 procs x 1 thread": (2, 1)}
    header(
        "LoRA Workbench: data-parallel training (torch.distributed), step time and scaling",
        f"{n} processes ({'NCCL' if args.gpus else 'gloo, CPU'}), global batch {args.batch} split between them",
        "1 process with the whole batch (same images, noise, timesteps per step)",
        [f"tiny diffusers UNet, resolution {args.resolution}, rank 8, {args.steps} steps, {args.repeats} repeats"],
    )
    times: dict[str, list[float]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        _images(folder, max(8, args.batch), args.resolution)
        for repeat in range(args.repeats):
            for name, (procs, threads) in sides.items():
                times[name].append(_side(args, folder, procs, threads))
                print(f"repeat {repeat + 1}: {name}: {times[name][-1]:.3f} s/step", flush=True)
    print("-" * 100)
    for name, values in times.items():
        print(f"{name:<20} s/step {fmt_spread(values)}")
    base, many = list(times)[0], list(times)[-1]
    speedups = [a / b for a, b in zip(times[base], times[many])]
    print(
        f"speed-up {many} vs {base}: {sum(speedups) / len(speedups):.2f} ({min(speedups):.2f}-{max(speedups):.2f}); "
        f"scaling efficiency {sum(speedups) / len(speedups) / n:.2f} (1.00 = linear)"
    )
    if not args.gpus:
        vs_threads = [a / b for a, b in zip(times["1 proc x 2 threads"], times[many])]
        print(f"speed-up {many} vs 1 proc x 2 threads: {sum(vs_threads) / len(vs_threads):.2f}")


if __name__ == "__main__":
    main()
