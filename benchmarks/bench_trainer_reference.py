"""Our ``trainer.loop.train`` against the diffusers/peft DreamBooth-LoRA reference loop, on the CPU, same work.

The reference is the core of diffusers' ``examples/dreambooth/train_dreambooth_lora.py``: a peft ``LoraConfig``
added to the UNet (``unet.add_adapter``, gaussian init), AdamW on the LoRA parameters, a constant learning-rate
schedule, ``noise_scheduler.add_noise``, MSE on epsilon, gradient clipping at 1.0, and prior preservation by
concatenating the instance and class batches and chunking the prediction. Prompts are encoded once (its
``--pre_compute_text_embeddings``) and, as on our side, images too: the reference caches each image's
``latent_dist`` once and samples it every step, as diffusers' SDXL DreamBooth script does with
``--cache_latents``; ours encodes each image once (the distribution's mode). Neither side's timed steps encode.

Both sides train the same tiny diffusers UNet (``trainer.tiny_models.tiny_parts``: channels (32, 64), fp32),
rank 8, alpha 8, the same four attention projections, the same images. Each repeat runs every configuration in
one fresh process per side (the sides alternate, so drift of a shared machine hits both); seconds per step are
taken between the optimizer steps after a warm-up step (``_common.StepClock``), so set-up and encoding are left
out on both sides. "extra MB" is the peak RSS during training over the RSS once data is encoded (before any LoRA
layer exists), measured in the same process after ``malloc_trim`` (see ``bench_train_memory.py`` for the
memory comparison on ComfyUI models).

Run: ``.venv/bin/python benchmarks/bench_trainer_reference.py [--repeats 3] [--steps 3] [--quick | --full]``
(about 5 minutes on 2 cores; ``--quick``: one small configuration, for development; ``--full``: 8 configurations,
about 15 minutes).
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import time

from _common import MB, PeakMemory, StepClock, fmt_spread, header, ratio_spread, release_freed_memory, settings_table

RANK = 8
LR = 1e-4
WARMUP = 1  # untimed optimizer steps at the start of every run
# (resolution, batch, prior preservation: it doubles the forward batch). The default set keeps the run within about
# 5 minutes on 2 cores; --full adds the batch-4 rows at 128 px and with prior preservation (about 15 minutes).
CONFIGS = [(64, 1, False), (64, 4, False), (128, 1, False), (64, 1, True), (128, 1, True)]
FULL_CONFIGS = [(res, batch, pp) for pp in (False, True) for res in (64, 128) for batch in (1, 4)]
QUICK_CONFIGS = [(64, 1, False)]
ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]

SETTINGS = [
    ("model", "tiny diffusers UNet (32, 64), fp32", "tiny diffusers UNet (32, 64), fp32"),
    ("images", "4 instance (+4 class) drawn images", "4 instance (+4 class) drawn images"),
    ("LoRA targets", "to_q, to_k, to_v, to_out.0", "to_q, to_k, to_v, to_out.0"),
    ("rank / alpha", f"{RANK} / {RANK}", f"{RANK} / {RANK}"),
    ("learning rate", f"{LR:g} constant", f"{LR:g} constant"),
    ("gradient clipping", "1.0", "1.0"),
    ("precision", "fp32", "fp32"),
    ("prompts", "encoded once", "encoded once"),
    ("latents", "encoded once (mode), cached", "latent_dist cached, sampled per step"),
    ("optimizer", "AdamW(fused=True) where supported", "AdamW (torch default: foreach)"),
    ("LoRA init", "peft default (A kaiming, B zero)", "peft gaussian (as the script)"),
    ("noise, timesteps", "per-step seeded generators", "global generator"),
    ("per-step extras", "loss.item() (a sync), LR scheduler step", "LR scheduler step"),
]


def _images(folder, size: int, n: int, seed: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (200 - 10 * ((i + seed) % 3), 210, 220))
        d = ImageDraw.Draw(img)
        o = (i + seed) % 5
        d.ellipse([size // 8 + o, size // 8, size - size // 8 + o, size - size // 8], fill=(230, 120 + 40 * seed, 30))
        img.save(folder / f"{i}.png")


def _run_ours(parts, tmp, res, batch, pp, steps, start) -> None:
    from lora_workbench.trainer.config import TrainConfig
    from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder
    from lora_workbench.trainer.diffusers_backend import DiffusersModelApi
    from lora_workbench.trainer.loop import train

    unet, te, tok, vae, sched = parts
    ds = load_image_folder(tmp / f"subject{res}", DatasetOptions(resolution=res))
    api = DiffusersModelApi(unet, te, tok, vae, sched)
    # The loop calls prepare_for_training (where a model API has it) after encoding every image and prompt and
    # before injecting the LoRA layers: the start of the memory window.
    api.prepare_for_training = lambda _batch: start()
    cfg = TrainConfig(
        steps=WARMUP + steps,
        rank=RANK,
        batch_size=batch,
        learning_rate=LR,
        prior_preservation=pp,
        class_images_dir=str(tmp / f"class{res}") if pp else "",
        num_class_images=4,
    )
    train(api, ds, cfg)


def _run_ref(parts, tmp, res, batch, pp, steps, start, count_flops: bool) -> float | None:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder

    unet, te, tok, vae, sched = parts
    with torch.no_grad():
        ids = tok(
            ["a photo of sks dog", "a photo of dog"], padding="max_length", max_length=16, return_tensors="pt"
        ).input_ids
        emb = te(ids)[0]

        def cached(folder):  # --cache_latents: the latent distribution of each image, encoded once
            examples = load_image_folder(folder, DatasetOptions(resolution=res)).examples
            pixels = torch.stack([e.pixels for e in examples])
            dist = vae.encode(pixels * 2 - 1).latent_dist
            return dist.mean, dist.std

        inst = cached(tmp / f"subject{res}")
        cls = cached(tmp / f"class{res}") if pp else None
    start()
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=ATTENTION))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # get_scheduler("constant")
    unet.train()
    n = inst[0].shape[0]
    scale = vae.config.scaling_factor

    def step(i: int):
        pick = torch.arange(i * batch, (i + 1) * batch) % n
        mean, std = inst[0][pick], inst[1][pick]
        cond = emb[:1].expand(batch, -1, -1)
        if pp:  # the script concatenates instance and class examples into one batch
            mean, std = torch.cat([mean, cls[0][pick]]), torch.cat([std, cls[1][pick]])
            cond = torch.cat([cond, emb[1:].expand(batch, -1, -1)])
        latents = (mean + std * torch.randn_like(mean)) * scale  # latent_dist.sample()
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],))
        pred = unet(sched.add_noise(latents, noise, t), t, cond).sample
        if pp:
            pred, pred_prior = torch.chunk(pred, 2, dim=0)
            noise, noise_prior = torch.chunk(noise, 2, dim=0)
            loss = F.mse_loss(pred, noise) + 1.0 * F.mse_loss(pred_prior, noise_prior)
        else:
            loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad()

    for i in range(WARMUP + steps):
        step(i)
    if not count_flops:
        return None
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:  # one step (forward + backward), after the timed ones
        step(WARMUP + steps)
    return fc.get_total_flops()


def _child(impl: str, configs: list, steps: int, count_flops: bool) -> None:
    """Run every configuration once with ``impl``; print one JSON line per configuration."""
    import tempfile
    from pathlib import Path

    from lora_workbench.trainer.tiny_models import tiny_parts

    tmp = Path(tempfile.mkdtemp(prefix="bench_ref_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    for res in sorted({c[0] for c in configs}):
        _images(tmp / f"subject{res}", res, 4, 0)
        _images(tmp / f"class{res}", res, 4, 1)
    mem = PeakMemory()
    window = {}

    def start():
        window["baseline"] = mem.rss()
        mem.reset()

    def on_step():
        if len(clock.stamps) <= WARMUP + steps:  # not the reference's FLOP-counting step
            window["peak"] = mem.peak_rss()

    clock = StepClock(on_step=on_step)
    for res, batch, pp in configs:
        parts = tiny_parts(sample_size=32)
        release_freed_memory()
        clock.reset()
        window.clear()
        out = {"impl": impl, "res": res, "batch": batch, "pp": pp}
        if impl == "ours":
            _run_ours(parts, tmp, res, batch, pp, steps, start)
        else:
            flops = _run_ref(parts, tmp, res, batch, pp, steps, start, count_flops and batch == 1)
            if flops is not None:
                out["flops"] = flops
            clock.stamps = clock.stamps[: WARMUP + steps]  # the FLOP-counting step is not timed
        out["s_per_step"] = clock.seconds_per_step(WARMUP)
        out["trainable"] = clock.trainable
        out["extra_mb"] = (window["peak"] - window["baseline"]) / MB
        print(json.dumps(out), flush=True)


def _matmul_peak() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t0, n = time.perf_counter(), 5
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after 1 warm-up (default 3)")
    parser.add_argument("--quick", action="store_true", help="one small configuration (development)")
    parser.add_argument("--full", action="store_true", help="all 8 configurations (about 15 minutes)")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "FLOPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS if args.full else CONFIGS
    if args.child:
        _child(args.child[0], configs, args.steps, args.child[1] == "1")
        return

    header(
        "bench_trainer_reference: DreamBooth-LoRA training loop, ours vs the diffusers/peft reference (CPU)",
        "seconds per optimizer step and extra memory of trainer.loop.train (DiffusersModelApi) and of the "
        "reference loop, same model, images, batch, rank, targets and cached latents",
        "diffusers examples/dreambooth/train_dreambooth_lora.py (peft add_adapter + AdamW loop), with latents "
        "cached as its SDXL script's --cache_latents",
        [f"{args.repeats} repeats x (1 warm-up + {args.steps} timed steps) per side and configuration"],
    )
    print("Settings (same on both sides unless marked):")
    settings_table(SETTINGS, "ours", "reference")
    t_start = time.time()
    rows = []
    for rep in range(args.repeats):
        order = ("ours", "ref") if rep % 2 == 0 else ("ref", "ours")
        for impl in order:
            cmd = [sys.executable, __file__, "--child", impl, "1" if rep == 0 else "0", "--steps", str(args.steps)]
            cmd += ["--quick"] if args.quick else ["--full"] if args.full else []
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode:
                sys.stderr.write(r.stderr)
                raise SystemExit(f"child {impl} failed (exit {r.returncode})")
            for line in r.stdout.strip().splitlines():
                if line.startswith("{"):
                    rows.append({**json.loads(line), "rep": rep})
                    print(json.dumps(rows[-1]), flush=True)  # partial results survive an interrupted run
        print(f"repeat {rep + 1}/{args.repeats} done ({time.time() - t_start:.0f} s)", flush=True)
    peak = _matmul_peak()
    print(f"float32 2048^2 matmul here: {peak / 1e9:.1f} GFLOP/s; wall {time.time() - t_start:.0f} s")

    def col(impl, res, batch, pp, key):
        ordered = sorted(rows, key=lambda r: r["rep"])
        return [r[key] for r in ordered if (r["impl"], r["res"], r["batch"], r["pp"]) == (impl, res, batch, pp)]

    print()
    print("s/step: mean (min-max) over the repeats; ours/ref: ratio of the means (range of per-repeat ratios);")
    print("extra MB: peak RSS during training over the RSS after encoding, mean of the repeats; params: trainable.")
    print(
        f"{'res':>4} {'batch':>5} {'prior':>5} | {'ours s/step':>21} {'ref s/step':>21} {'ours/ref':>16} | "
        f"{'ours MB':>7} {'ref MB':>7} | {'params ours/ref':>17} | {'GFLOP/step':>10} {'ref %peak':>9}"
    )
    for res, batch, pp in configs:
        o, f = col("ours", res, batch, pp, "s_per_step"), col("ref", res, batch, pp, "s_per_step")
        om, fm = col("ours", res, batch, pp, "extra_mb"), col("ref", res, batch, pp, "extra_mb")
        op, fp = col("ours", res, batch, pp, "trainable")[0], col("ref", res, batch, pp, "trainable")[0]
        flops = [r["flops"] for r in rows if "flops" in r and (r["res"], r["pp"]) == (res, pp)]
        flops = flops[0] * batch if flops else 0.0  # FLOPs scale with the batch
        mean_ref = sum(f) / len(f)
        print(
            f"{res:>4} {batch:>5} {str(pp):>5} | {fmt_spread(o):>21} {fmt_spread(f):>21} {ratio_spread(o, f):>16} | "
            f"{sum(om) / len(om):>7.1f} {sum(fm) / len(fm):>7.1f} | {f'{op / 1e6:.3f}M/{fp / 1e6:.3f}M':>17} | "
            f"{flops / 1e9:>10.2f} {100 * flops / mean_ref / peak:>8.1f}%"
        )


if __name__ == "__main__":
    main()
