"""Peak extra memory of LoRA training steps over the loaded model: ours, ComfyUI core's TrainLoraNode, diffusers/peft.

Every side runs in a fresh process: load the model (ComfyUI's loaders under ``torch.inference_mode``, as its
executor runs nodes), encode the data, then train a few steps. Measured:

- **extra (steps)**: the peak RSS from the start of training until the end of the last optimizer step, minus the
  RSS at that start. The start is after the model is loaded and the data encoded, before anything of training
  exists: ours at ``ComfyModelApi.prepare_for_training`` (inside the Train node, after it encoded images and
  prompts), core just before ``TrainLoraNode.execute`` (its inputs are encoded latents and conditioning), the
  reference before ``unet.add_adapter``. So it holds LoRA layers, optimizer state, gradients, activations and
  whatever copy of the weights a side makes (core's adapted weights ``W + BA``; ours makes none: its
  autograd-safe stand-ins for ComfyUI's inference-mode weights share their memory).
- **set-up**: the peak reached before the first forward pass (a forward pre-hook on the UNet), over the same
  start: LoRA layers, optimizer, weight swaps, before any activation.
- **call**: the same for the whole node call including encoding, over the RSS after loading (ComfyUI sides);
  **kept**: RSS after the call minus after loading (what the call leaves behind, e.g. the adapter).
- On a GPU (``--device cuda``; the path is written for machines with CUDA, not measured here): the same windows
  as ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, over ``memory_allocated`` at the start
  (the UNet is loaded onto the GPU before the call). Models ComfyUI moves off the GPU inside a window lower its
  figure.

RSS peaks come from ``VmHWM`` after writing "5" to ``/proc/self/clear_refs`` (or a 1 ms sampling thread where
that is refused); freed heap memory is returned to the OS (``malloc_trim``) before each baseline.

Sides (same model, resolution, batch, steps, rank 8, fp32 on the CPU, no gradient checkpointing):

- ours: our Train LoRA node, default targets (attention projections);
- ours-core-layers: our node with core's layers as ``custom_targets`` (every Linear/Conv2d but those smaller than
  the rank), the like-for-like row for core;
- core: ComfyUI core's TrainLoraNode (LoRA on every weight of 2+ dims, diffs of 1-D weights and biases; fp32
  training and LoRA dtype, checkpointing off, as ours);
- reference: diffusers' DreamBooth-LoRA loop (``train_dreambooth_lora.py``: peft ``add_adapter`` on the attention
  projections, AdamW) on a diffusers ``UNet2DConditionModel`` of the same shape (same parameter count, printed),
  on random latents and text embeddings of the sizes the ComfyUI sides encode (memory does not depend on the
  values).

Models: ``sd15``, the tiny SD1.5 checkpoint (UNet 107 M parameters, CLIP-L full size, TAESD; via
CheckpointLoaderSimple); ``sdxl``, an SDXL-shaped UNet of ComfyUI's SDXL class widened to 320 channels
(130 M parameters; ``headless.tiny_families`` with model_channels 320 and transformer depth 2), with its tiny
text encoders.

    .venv/bin/python benchmarks/bench_train_memory.py [--models sd15,sdxl] [--size 64] [--batch 1] [--steps 3]
        [--repeats 3] [--device cpu|cuda]

About 7-8 minutes on 2 quiet cores with 3 repeats, 2.5 with ``--repeats 1`` (``--quick``: sd15 only, one step).
``import_runtime``, ``example_dataset`` and ``train_comfy_side`` also serve ``bench_train_gpu.py`` (real-size models).
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

from _common import MB, PeakMemory, core_layers, header, release_freed_memory, settings_table

RANK = 8
LR = 1e-4
SIDES = ("ours", "ours-core-layers", "core", "reference")
CHECKPOINT = "lora_workbench_tiny_sd15.safetensors"
# The SDXL-shaped model: ComfyUI's SDXL class, 320 channels at two levels (no attention at the first, as SDXL),
# two transformer blocks per attention level and in the middle.
SDXL_WIDE = dict(model_channels=320, transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2])
SDXL_WIDE["transformer_depth_middle"] = 2
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def _diffusers_unet(model: str):
    """Return a diffusers UNet2DConditionModel of the shape of the ComfyUI model ``model`` (random weights) and the
    width of its cross-attention conditioning, pooled text embedding (SDXL) or None."""
    from diffusers import UNet2DConditionModel

    if model == "sd15":
        from lora_workbench.headless.tiny_model import UNET_CONFIG as c

        unet = UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            block_out_channels=[c["model_channels"] * m for m in c["channel_mult"]],
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2,
            cross_attention_dim=c["context_dim"],
            attention_head_dim=c["num_heads"],  # diffusers' SD1 configs name the head count so
            use_linear_projection=c["use_linear_in_transformer"],
        )
        return unet, c["context_dim"], None
    from lora_workbench.headless import tiny_families as tf

    pooled = tf.CLIP_G_CONFIG["hidden_size"]
    context = tf.CLIP_L_CONFIG["hidden_size"] + pooled
    width = SDXL_WIDE["model_channels"]
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=context,
        attention_head_dim=(width // 64, 2 * width // 64),  # 64-channel heads, as SDXL (head counts, diffusers' way)
        transformer_layers_per_block=(1, SDXL_WIDE["transformer_depth"][1]),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=pooled + tf.SDXL_SIZE_EMBEDDINGS,
    )
    return unet, context, pooled


def import_runtime(cuda: bool, prefix: str = "bench_mem_", checkpoint: bool = True):
    """Import ComfyUI with this pack and the example assets into a temporary base folder (removed at exit).

    ``cuda``: let ComfyUI use the GPU (without it ComfyUI runs with ``--cpu``, as on machines without one).
    ``checkpoint``: all the example assets (the tiny checkpoint, built once into the cache, and the example LoRAs);
    without it only the training images.
    """
    from lora_workbench.headless import comfy_env, examples

    base = comfy_env.import_comfy_core(Path(tempfile.mkdtemp(prefix=prefix)), cpu=not cuda)
    atexit.register(shutil.rmtree, base, ignore_errors=True)  # its models, inputs, checkpoints
    if checkpoint:
        examples.prepare_assets(base)
    else:
        shutil.copytree(examples.TRAIN_IMAGES, base / "input" / examples.DATASET_INPUT_NAME)
    return comfy_env.import_comfyui(base)


def _load_comfy(model: str, cuda: bool):
    """Import ComfyUI with this pack; return (runtime, MODEL, CLIP, VAE) loaded as ComfyUI's executor would."""
    runtime = import_runtime(cuda)
    import torch

    with torch.inference_mode():
        if model == "sd15":
            m, clip, vae = runtime.nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)[:3]
        else:
            from lora_workbench.headless import tiny_families as tf

            tf.SDXL_UNET_CONFIG = {**tf.SDXL_UNET_CONFIG, **SDXL_WIDE}
            tiny = tf.build("sdxl")
            m, clip, vae = tiny.model, tiny.clip, tiny.vae
    return runtime, m, clip, vae


def example_dataset(runtime, size: int):
    """Return the example training images (examples/train_images) at ``size`` px, through our Image Folder node."""
    from lora_workbench.headless import examples

    folder = runtime.node_classes["LoraWorkbenchImageFolder"]
    return folder.execute(
        examples.DATASET_INPUT_NAME, "sks", "toy", "a photo of {trigger} {class_noun}", size, "center", False,
        False, 1, 0.0,
    ).result[0]  # fmt: skip


def train_comfy_side(
    runtime,
    side: str,
    m,
    clip,
    vae,
    dataset,
    *,
    steps: int,
    rank: int,
    batch: int,
    on_start,
    lr: float = LR,
    precision: str = "fp32",
    training_dtype: str = "fp32",
    lora_dtype: str = "fp32",
    gradient_checkpointing: bool = False,
    custom_targets: str = "",
    alpha: float | None = None,
    run_name: str = "bench_memory",
) -> None:
    """Train ``steps`` steps with ComfyUI core's TrainLoraNode (``side`` "core") or our Train LoRA node (any other
    side), under ``torch.inference_mode`` as ComfyUI's executor runs nodes.

    ``on_start()`` is called where training starts: for core after this function encoded the images (VAE) and
    captions (CLIP), as a workflow's encode nodes would, just before the node; for ours at
    ``ComfyModelApi.prepare_for_training``, after the node encoded them. ``precision``, ``alpha`` (None: our default,
    alpha = rank) and ``custom_targets`` are ours; ``training_dtype`` and ``lora_dtype`` core's.
    """
    import torch

    if side == "core":
        node = runtime.node_classes["TrainLoraNode"]
        from lora_workbench.headless import comfy_compat

        with torch.inference_mode():
            latents = [{"samples": vae.encode(e.pixels.movedim(0, -1)[None])} for e in dataset.examples]
            positive = [clip.encode_from_tokens_scheduled(clip.tokenize(e.caption)) for e in dataset.examples]
            inputs = comfy_compat.input_defaults(node)
            inputs.update(
                batch_size=batch,
                grad_accumulation_steps=1,
                steps=steps,
                learning_rate=lr,
                rank=rank,
                seed=0,
                training_dtype=training_dtype,
                lora_dtype=lora_dtype,
                gradient_checkpointing=gradient_checkpointing,
            )
            on_start()
            node.execute(model=[m], latents=latents, positive=positive, **{k: [v] for k, v in inputs.items()})
        return
    node = runtime.node_classes["LoraWorkbenchTrain"]
    api_class = sys.modules[node.__module__].ComfyModelApi
    prepare = api_class.prepare_for_training

    def prepare_measured(self, *args, **kwargs):
        on_start()
        return prepare(self, *args, **kwargs)

    api_class.prepare_for_training = prepare_measured
    settings = {} if alpha is None else {"alpha": alpha}
    try:
        with torch.inference_mode():
            node.execute(
                model=m,
                clip=clip,
                vae=vae,
                dataset=dataset,
                run_name=run_name,
                resume=False,
                steps=steps,
                rank=rank,
                batch_size=batch,
                learning_rate=lr,
                precision=precision,
                gradient_checkpointing=gradient_checkpointing,
                seed=0,
                custom_targets=custom_targets,
                **settings,
            )
    finally:
        api_class.prepare_for_training = prepare


def _child(model: str, side: str, size: int, batch: int, steps: int, cuda: bool) -> dict:
    import torch

    out = {"model": model, "side": side}
    mem: PeakMemory | None = None
    window: dict = {}

    def start_steps():
        """The start of training: remember the call's peak so far, then start the steps' peak."""
        window["call_peak"] = mem.peak_rss()
        window["call_gpu_peak"] = mem.gpu_peak()
        window["base"], window["gpu_base"] = mem.rss(), mem.gpu_now()
        mem.reset()

    def first_forward(*_):
        """The first forward pass of training: the peak of the set-up (LoRA layers, optimizer, weight swaps)."""
        if "base" in window and "setup" not in window:
            window["setup"], window["gpu_setup"] = mem.peak_rss(), mem.gpu_peak()

    def on_step(optimizer, *_):
        window["peak"], window["gpu_peak"] = mem.peak_rss(), mem.gpu_peak()
        window["steps"] = window.get("steps", 0) + 1
        if window["steps"] == 1:
            window["trainable"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(on_step)
    device = torch.device("cuda" if cuda else "cpu")

    if side == "reference":
        import torch.nn.functional as F
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        unet, context, pooled = _diffusers_unet(model)
        unet.register_forward_pre_hook(first_forward)
        out["base_bytes"] = sum(p.numel() * p.element_size() for p in unet.parameters())
        out["base_params"] = sum(p.numel() for p in unet.parameters())
        # fp32 on the CPU as ComfyUI loads there; on a GPU fp16 weights + fp32 LoRA under fp16 autocast, as the
        # script with --mixed_precision fp16.
        dtype = torch.float16 if cuda else torch.float32
        unet.requires_grad_(False)
        if cuda:
            unet.to(device, dtype)
        sched = DDPMScheduler(num_train_timesteps=1000)
        g = torch.Generator().manual_seed(0)
        n, lat = 8, size // 8
        latents = torch.randn(n, 4, lat, lat, generator=g).to(device)
        cond = torch.randn(n, 77, context, generator=g).to(device)
        added = {}
        if pooled is not None:
            added = {
                "text_embeds": torch.randn(n, pooled, generator=g).to(device),
                "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * n, dtype=torch.float32).to(device),
            }
        release_freed_memory()
        mem = PeakMemory(cuda)
        start_steps()
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=ATTENTION))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # cast_training_params(unet, dtype=torch.float32)
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR)
        unet.train()
        for i in range(steps):
            pick = torch.arange(i * batch, (i + 1) * batch) % n
            x0 = latents[pick]
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (batch,), device=device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                extra = {"added_cond_kwargs": {k: v[pick] for k, v in added.items()}} if added else {}
                pred = unet(sched.add_noise(x0, noise, t), t, cond[pick], **extra).sample
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
        out["after"] = None
    else:
        runtime, m, clip, vae = _load_comfy(model, cuda)
        dm = m.model.diffusion_model
        dm.register_forward_pre_hook(first_forward)
        out["base_bytes"] = sum(p.numel() * p.element_size() for p in dm.parameters())
        out["base_params"] = sum(p.numel() for p in dm.parameters())
        dataset = example_dataset(runtime, size)
        if cuda:
            import comfy.model_management

            comfy.model_management.load_models_gpu([m])
        release_freed_memory()
        mem = PeakMemory(cuda)
        loaded, loaded_gpu = mem.rss(), mem.gpu_now()
        mem.reset()
        layers = core_layers(dm, RANK)[0] if side == "ours-core-layers" else []
        train_comfy_side(
            runtime, side, m, clip, vae, dataset, steps=steps, rank=RANK, batch=batch, on_start=start_steps,
            # ours: our default precision (the base stays in ComfyUI's dtype, the LoRA in fp32)
            training_dtype="bf16" if cuda else "fp32", custom_targets=",".join(layers),
        )  # fmt: skip
        window["call_peak"] = max(window["call_peak"], mem.peak_rss())
        out["call_extra"] = window["call_peak"] - loaded
        release_freed_memory()
        out["after"] = mem.rss() - loaded
        if cuda:
            out["gpu_call_extra"] = max(window["call_gpu_peak"], mem.gpu_peak()) - loaded_gpu
    if window.get("steps") != steps:
        raise RuntimeError(f"{side}: {window.get('steps')} optimizer steps seen, {steps} expected")
    out["extra"] = window["peak"] - window["base"]
    out["setup"] = window["setup"] - window["base"]
    out["baseline"] = window["base"]
    out["trainable"] = window["trainable"]
    out["method"] = mem.method
    if cuda:
        out["gpu_extra"] = window["gpu_peak"] - window["gpu_base"]
        out["gpu_setup"] = window["gpu_setup"] - window["gpu_base"]
    return out


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _mb_spread(rows: list[dict], key: str) -> str:
    """Return ``mean (min-max)`` in MB of ``key`` over the repeats, or '-' where the side has no such figure."""
    values = [r[key] / MB for r in rows if r.get(key) is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.0f} ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else f"{mean:.0f}"


def _table(model: str, rows: list[dict], prefix: str, what: str) -> None:
    """Print one model's table for the RSS figures (``prefix`` "") or the GPU ones ("gpu_")."""
    by = {side: [r for r in rows if r["side"] == side] for side in SIDES}
    ours, ref = by["ours"], by["reference"]
    ours_extra, ref_extra = _mean(ours, prefix + "extra"), _mean(ref, prefix + "extra")
    base = ours[0]["base_bytes"]
    print(f"\n{model}, {what}:")
    print(
        f"{'side':<17} {'params':>8} | {'extra MB':>16} {'/ ours':>6} {'x base':>6} | {'set-up MB':>13} | "
        f"{'call MB':>16} {'kept MB':>11}"
    )
    for side in SIDES:
        extra = _mean(by[side], prefix + "extra")
        print(
            f"{side:<17} {by[side][0]['trainable'] / 1e6:>7.3f}M | {_mb_spread(by[side], prefix + 'extra'):>16} "
            f"{extra / ours_extra:>6.2f} {extra / by[side][0]['base_bytes']:>6.2f} | "
            f"{_mb_spread(by[side], prefix + 'setup'):>13} | {_mb_spread(by[side], prefix + 'call_extra'):>16} "
            f"{_mb_spread(by[side], 'after') if not prefix else '':>11}"
        )
    verdict = "met" if ours_extra <= ref_extra else "NOT met"
    print(
        f"target (issue 9) ours extra <= reference extra: {verdict} (ours/reference {ours_extra / ref_extra:.2f}; "
        f"ours {ours_extra / base:.2f} x base, reference {ref_extra / ref[0]['base_bytes']:.2f} x base)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl (default both)")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="training steps per side (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side and model (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="sd15 only, one step, one repeat (development)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.models, args.steps, args.repeats = "sd15", 1, 1
    if args.child:
        row = _child(*args.child, args.size, args.batch, args.steps, args.device == "cuda")
        print(json.dumps(row), flush=True)
        return

    models = args.models.split(",")
    header(
        "bench_train_memory: peak extra memory of LoRA training steps over the loaded model",
        "ours (Train LoRA node), core TrainLoraNode, diffusers/peft reference; same model shape, resolution, "
        "batch, steps and (ours vs reference) targets",
        "diffusers examples/dreambooth/train_dreambooth_lora.py loop (peft add_adapter, AdamW) on a diffusers UNet "
        "of the same shape",
        [
            f"{args.size}x{args.size} px, batch {args.batch}, {args.steps} steps, rank {RANK}, device {args.device}, "
            f"{args.repeats} repeats (fresh processes, sides alternating)"
        ],
    )
    settings_table(
        [
            ("model", "ComfyUI's (loader, inference mode)", "diffusers UNet2DConditionModel, same shape"),
            ("data", "example images, VAE + CLIP encoded", "random latents / embeddings, same sizes"),
            ("targets", "attention projections", "attention projections"),
            ("rank / alpha", f"{RANK} / {RANK}", f"{RANK} / {RANK}"),
            ("optimizer", "AdamW (fused where supported)", "AdamW (torch default: foreach)"),
            ("dtype (CPU)", "fp32 weights, fp32 LoRA", "fp32 weights, fp32 LoRA"),
            ("dtype (GPU)", "ComfyUI's weights (fp16), fp32 LoRA", "fp16 weights, fp32 LoRA, fp16 autocast"),
            ("checkpointing", "off", "off"),
        ],
        "ours",
        "reference",
    )
    print("core: LoRA on every 2+-dim weight + diffs of 1-D weights and biases (its only choice), fp32 (GPU: bf16)")
    print("training dtype, fp32 LoRA, checkpointing off; ours-core-layers: ours on core's LoRA layers.", flush=True)
    t_start = time.time()
    rows = []
    for rep in range(args.repeats):
        for model in models:
            for side in SIDES if rep % 2 == 0 else SIDES[::-1]:
                cmd = [sys.executable, __file__, "--child", model, side, "--size", str(args.size)]
                cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device]
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                if r.returncode:
                    sys.stderr.write(r.stderr[-5000:])
                    raise SystemExit(f"child {model} {side} failed (exit {r.returncode})")
                rows.append({**json.loads(r.stdout.strip().splitlines()[-1]), "rep": rep})
                print(json.dumps(rows[-1]), flush=True)  # partial results survive an interrupted run
        print(f"repeat {rep + 1}/{args.repeats} done ({time.time() - t_start:.0f} s)", flush=True)
    print(f"\nwall {time.time() - t_start:.0f} s; RSS peaks: {rows[0]['method']}")
    print("extra: peak during training - memory at its start, MB, mean (min-max) over the repeats; / ours: ratio of")
    print("the means to ours; x base: mean extra / the UNet's parameter bytes; set-up: the peak reached before the")
    print("first forward pass (LoRA layers, optimizer, weight swaps); call: peak of the whole node call incl.")
    print("encoding - RSS after loading; kept: RSS after the call (after malloc_trim) - after loading; params:")
    print("trainable elements.")
    for model in models:
        mrows = [r for r in rows if r["model"] == model]
        ours = next(r for r in mrows if r["side"] == "ours")
        ref = next(r for r in mrows if r["side"] == "reference")
        print(
            f"\n{model}: UNet {ours['base_params'] / 1e6:.1f} M parameters, {ours['base_bytes'] / MB:.0f} MB as "
            f"loaded (reference UNet: {'same' if ref['base_params'] == ours['base_params'] else 'DIFFERENT'}, "
            f"{ref['base_params'] / 1e6:.1f} M); RSS at the start of training (ours) {ours['baseline'] / MB:.0f} MB"
        )
        _table(model, mrows, "", "RSS (CPU)")
        if args.device == "cuda":
            _table(model, mrows, "gpu_", "torch.cuda.max_memory_allocated")


if __name__ == "__main__":
    main()
