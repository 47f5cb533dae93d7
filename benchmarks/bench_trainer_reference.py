"""Our ``trainer.loop.train`` against the diffusers/peft DreamBooth-LoRA reference loop, on the CPU.

The reference is the core of diffusers' ``examples/dreambooth/train_dreambooth_lora.py``: a peft ``LoraConfig``
added to the UNet (``unet.add_adapter``), AdamW on the LoRA parameters, ``noise_scheduler.add_noise``, MSE on
epsilon, and prior preservation by concatenating the instance and class batches and chunking the prediction.
Like that script (without ``--cache_latents``, which it lacks) it VAE-encodes the batch every step; prompts are
encoded once (its ``--pre_compute_text_embeddings``). Ours encodes every image once before the loop.

Each configuration runs in a fresh subprocess so its peak RSS (``getrusage``) is its own. The model is the test
fixture's tiny UNet (channels (32, 64); (64, 128) took 5 s a step at 64 px here, too slow for 16
configurations in 5 minutes), fp32, rank 8, torch's default thread count.
Run: ``.venv/bin/python benchmarks/bench_trainer_reference.py`` (about 3-5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

STEPS = 2  # timed steps per configuration, after one warm-up step (the 2-core machine allows no more in 5 min)
RANK = 8


def _parts():
    from lora_workbench.trainer.tiny_models import tiny_parts

    return tiny_parts(sample_size=32)


def _images(folder, size: int, n: int, seed: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (200 - 10 * ((i + seed) % 3), 210, 220))
        d = ImageDraw.Draw(img)
        o = (i + seed) % 5
        d.ellipse([size // 8 + o, size // 8, size - size // 8 + o, size - size // 8], fill=(230, 120 + 40 * seed, 30))
        img.save(folder / f"{i}.png")


def _child(impl: str, res: int, batch: int, pp: bool) -> dict:
    import resource
    import tempfile
    from pathlib import Path

    import torch

    from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder

    tmp = Path(tempfile.mkdtemp())
    _images(tmp / "subject", res, 4, 0)
    _images(tmp / "class", res, 4, 1)
    unet, te, tok, vae, sched = _parts()
    ds = load_image_folder(tmp / "subject", DatasetOptions(resolution=res))
    out = {"impl": impl, "res": res, "batch": batch, "pp": pp}
    if impl == "ours":
        from lora_workbench.trainer.config import TrainConfig
        from lora_workbench.trainer.diffusers_backend import DiffusersModelApi
        from lora_workbench.trainer.loop import TrainCallbacks, train

        stamps = []
        cfg = TrainConfig(
            steps=STEPS + 1,
            rank=RANK,
            batch_size=batch,
            learning_rate=1e-4,
            prior_preservation=pp,
            class_images_dir=str(tmp / "class") if pp else "",
            num_class_images=4,
        )
        train(
            DiffusersModelApi(unet, te, tok, vae, sched),
            ds,
            cfg,
            TrainCallbacks(on_step=lambda *a: stamps.append(time.perf_counter())),
        )
        out["s_per_step"] = (stamps[-1] - stamps[0]) / STEPS
    else:
        import torch.nn.functional as F
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=RANK,
                lora_alpha=RANK,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        with torch.no_grad():
            ids = tok(
                ["a photo of sks dog", "a photo of dog"], padding="max_length", max_length=16, return_tensors="pt"
            ).input_ids
            emb = te(ids)[0]
        inst = torch.stack([e.pixels for e in ds.examples])
        cls_ds = load_image_folder(tmp / "class", DatasetOptions(resolution=res))
        cls = torch.stack([e.pixels for e in cls_ds.examples])
        unet.train()

        def step(i: int):
            pick = torch.arange(i * batch, (i + 1) * batch) % len(inst)
            pixels = inst[pick]
            cond = emb[:1].expand(batch, -1, -1)
            if pp:  # the script concatenates instance and class examples into one batch
                pixels = torch.cat([pixels, cls[pick]])
                cond = torch.cat([cond, emb[1:].expand(batch, -1, -1)])
            with torch.no_grad():
                latents = vae.encode(pixels * 2 - 1).latent_dist.sample() * vae.config.scaling_factor
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
            opt.zero_grad()

        step(0)
        t0 = time.perf_counter()
        for i in range(1, STEPS + 1):
            step(i)
        out["s_per_step"] = (time.perf_counter() - t0) / STEPS
        if batch == 1:  # FLOPs of one step (forward + backward), counted once per shape
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                step(STEPS + 1)
            out["flops"] = fc.get_total_flops()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _matmul_peak() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t0, n = time.perf_counter(), 5
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - t0)


def main() -> None:
    rows = []
    t_start = time.time()
    for res in (64, 128):
        for batch in (1, 4):
            for pp in (False, True):
                for impl in ("ours", "ref"):
                    r = subprocess.run(
                        [sys.executable, __file__, "--child", impl, str(res), str(batch), str(int(pp))],
                        capture_output=True,
                        text=True,
                        check=True,
                        timeout=300,
                    )
                    rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                    print(json.dumps(rows[-1]), flush=True)  # partial results survive an interrupted run
    peak = _matmul_peak()
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32 2048^2 matmul: {peak / 1e9:.1f} "
        f"GFLOP/s; wall {time.time() - t_start:.0f} s"
    )
    print(
        f"{'res':>4} {'batch':>5} {'prior':>5} | {'ours s/step':>11} {'ref s/step':>10} {'ratio':>6} | "
        f"{'ours MB':>8} {'ref MB':>7} {'ratio':>6} | {'GFLOP/step':>10} {'ref %peak':>9}"
    )
    by = {(r["impl"], r["res"], r["batch"], r["pp"]): r for r in rows}
    for res in (64, 128):
        for batch in (1, 4):
            for pp in (False, True):
                o, f = by["ours", res, batch, pp], by["ref", res, batch, pp]
                flops = by["ref", res, 1, pp].get("flops", 0) * batch  # FLOPs scale with the batch
                print(
                    f"{res:>4} {batch:>5} {str(pp):>5} | {o['s_per_step']:>11.3f} {f['s_per_step']:>10.3f} "
                    f"{o['s_per_step'] / f['s_per_step']:>6.2f} | {o['peak_rss_mb']:>8.0f} {f['peak_rss_mb']:>7.0f} "
                    f"{o['peak_rss_mb'] / f['peak_rss_mb']:>6.2f} | {flops / 1e9:>10.2f} "
                    f"{100 * flops / f['s_per_step'] / peak:>8.1f}%"
                )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), bool(int(sys.argv[5])))))
    else:
        main()
