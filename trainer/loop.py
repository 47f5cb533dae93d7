"""The training loop: DreamBooth-LoRA steps with progress, Cancel and crash-safe checkpoints.

Reproducible and exactly resumable without stored generator positions: the data order, flips, noise,
timesteps and dropout of step ``s`` are drawn from generators seeded by ``(seed, s)``, so a run resumed
from a checkpoint at step ``s`` continues as the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..lora.state import LoraState
from . import checkpoint as ckpt
from . import inject, objective
from .config import TEXT_ENCODER_TARGETS, TrainConfig
from .dataset import ImageDataset, load_class_images

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped on a problem (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclass
class TrainCallbacks:
    """Hooks the caller gives the loop (all optional).

    ``on_step(step, total, loss)`` after each optimizer step; ``should_stop()`` after each step: True stops
    cleanly (a checkpoint is written first), and an exception it raises (ComfyUI's Cancel) propagates after
    the checkpoint is written; ``on_checkpoint(path)`` after each checkpoint.
    """

    on_step: Callable[[int, int, float], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_checkpoint: Callable[[Path], None] | None = None


@dataclass
class TrainResult:
    """What a run produced: the adapter, its loss per step, and how it ended."""

    state: LoraState
    losses: list[float]
    steps_done: int
    stopped_reason: str  # "finished" or "cancelled"
    checkpoint_path: Path | None = None
    resumed_from: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _seeded(seed: int, *parts) -> torch.Generator:
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    warmup, total = config.warmup_steps, config.steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.lr_scheduler in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):
        # Fused AdamW needs a supported device and dtype; the foreach version is the portable fallback.
        return torch.optim.AdamW(groups)


def _enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
        return
    # ComfyUI's ldm UNet has no switch: recompute each transformer block in the backward pass.
    for m in module.modules():
        if type(m).__name__ == "BasicTransformerBlock" and not getattr(m, "_lw_checkpointed", False):
            forward = m.forward

            def checkpointed(*args, _forward=forward, **kwargs):
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            m.forward = checkpointed
            m._lw_checkpointed = True


def _autocast(config: TrainConfig, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    if device.type == "cpu" and dtype is torch.float16:
        return torch.autocast("cpu", enabled=False)  # fp16 autocast on CPU is not supported: train in fp32
    return torch.autocast(device.type, dtype=dtype)


def class_image_latents(model_api, config: TrainConfig, prompt: str, resolution: int, cache_dir: Path | None):
    """Return latents of the class images: from ``config.class_images_dir``, or generated once and cached.

    Generated images are cached as PNG under ``cache_dir/class_images/<key>/`` where the key covers the
    prompt, count, seed, size and the base model's fingerprint, and reused by later runs.
    """
    if config.class_images_dir:
        images = load_class_images(config.class_images_dir, resolution, config.num_class_images, config.seed)
        stacked = torch.stack(images)
    else:
        key = hashlib.sha256(
            f"{prompt}|{config.num_class_images}|{config.seed}|{resolution}|{model_api.fingerprint()}".encode()
        ).hexdigest()[:16]
        folder = Path(cache_dir) / "class_images" / key if cache_dir else None
        files = sorted(folder.glob("*.png")) if folder and folder.is_dir() else []
        if len(files) >= config.num_class_images:
            arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0 for f in files]
            stacked = torch.from_numpy(np.stack(arrays[: config.num_class_images])).permute(0, 3, 1, 2)
        else:
            stacked = model_api.generate(prompt, config.num_class_images, config.seed, resolution).float().cpu()
            if folder:
                folder.mkdir(parents=True, exist_ok=True)
                for i, img in enumerate(stacked):
                    arr = (img.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
                    Image.fromarray(arr).save(folder / f"{i:04d}.png")
                stacked = torch.stack(
                    [
                        torch.from_numpy(
                            np.asarray(Image.open(folder / f"{i:04d}.png"), dtype=np.float32) / 255.0
                        ).permute(2, 0, 1)
                        for i in range(len(stacked))
                    ]
                )
    with torch.no_grad():
        return torch.cat([model_api.encode_images(stacked[i : i + 4]) for i in range(0, len(stacked), 4)])


def train(
    model_api,
    dataset: ImageDataset,
    config: TrainConfig,
    callbacks: TrainCallbacks | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    cache_dir: str | Path | None = None,
    unet_name_map: Callable[[str], str] | None = None,
    keep_layers: bool = False,
) -> TrainResult:
    """Train a LoRA on ``dataset`` and return it.

    Args:
        model_api: the model (see ``trainer.model_api.ModelApi``); LoRA layers are injected into its
            ``unet`` (and ``text_encoder``) and removed again at the end unless ``keep_layers``.
        dataset: from ``trainer.dataset.load_image_folder``.
        config: the settings; validated first.
        callbacks: progress, Cancel and checkpoint hooks.
        checkpoint_dir: where checkpoints go; None disables them.
        resume: continue from the checkpoint in ``checkpoint_dir`` when there is one.
        cache_dir: where generated class images are cached.
        unet_name_map: translates UNet module paths for the exported kohya names.
        keep_layers: leave the trained LoRA layers in the modules (for evaluating them afterwards).

    Returns:
        A ``TrainResult`` (``stopped_reason`` "finished" or "cancelled").

    Raises:
        ValueError: invalid settings (field and value named), or a rank above a layer's size.
        TrainingError: the loss became NaN or infinite; the last good checkpoint is kept.
        Exception: whatever ``should_stop`` raised, after the checkpoint is written.
    """
    config.validate()
    callbacks = callbacks or TrainCallbacks()
    started = time.monotonic()
    device = model_api.device
    alpha = config.effective_alpha
    torch.manual_seed(config.seed)  # peft initialises A from the global generator
    inject.inject_lora(model_api.unet, config.target_modules, config.rank, alpha, config.dropout)
    te = model_api.text_encoder if config.train_text_encoder else None
    try:
        if config.train_text_encoder:
            if te is None:
                raise ValueError("train_text_encoder is on, but the model gives no text encoder to train")
            inject.inject_lora(te, TEXT_ENCODER_TARGETS, config.rank, alpha, config.dropout)
        if config.gradient_checkpointing:
            _enable_gradient_checkpointing(model_api.unet)
        return _run(
            model_api,
            dataset,
            config,
            callbacks,
            checkpoint_dir,
            resume,
            cache_dir,
            unet_name_map,
            te,
            alpha,
            device,
            started,
        )
    finally:
        if not keep_layers:
            inject.remove_lora(model_api.unet)
            if te is not None:
                inject.remove_lora(te)


def _run(
    model_api, dataset, config, callbacks, checkpoint_dir, resume, cache_dir, unet_name_map, te, alpha, device, started
) -> TrainResult:
    unet = model_api.unet
    groups = [{"params": inject.lora_parameters(unet), "lr": config.learning_rate}]
    if te is not None:
        groups.append({"params": inject.lora_parameters(te), "lr": config.text_encoder_lr})
    optimizer = _make_optimizer(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))

    # Encode every image (and its mirror when flipping) once: the VAE is frozen.
    with torch.no_grad():
        latents = [model_api.encode_images(e.pixels[None]) for e in dataset.examples]
        flipped = (
            [model_api.encode_images(e.pixels.flip(-1)[None]) for e in dataset.examples]
            if (dataset.options.flip)
            else latents
        )
    prior_latents = prior_cond = None
    if config.prior_preservation:
        class_prompt = config.class_prompt or dataset.class_prompt
        prior_latents = class_image_latents(
            model_api, config, class_prompt, dataset.examples[0].pixels.shape[-1], cache_dir
        )
        with torch.no_grad():
            prior_cond = model_api.encode_prompts([class_prompt]) if te is None else None
    frozen_cond: dict[str, torch.Tensor] = {}

    def cond_for(prompts: list[str]) -> torch.Tensor:
        if te is not None:
            return model_api.encode_prompts(prompts)
        for p in prompts:
            if p not in frozen_cond:
                with torch.no_grad():
                    frozen_cond[p] = model_api.encode_prompts([p])
        return torch.cat([frozen_cond[p] for p in prompts])

    losses: list[float] = []
    start = 0
    if checkpoint_dir and resume:
        loaded = ckpt.load_checkpoint(checkpoint_dir)
        if loaded is not None:
            start, tensors, state = loaded
            if state.get("config", {}).get("rank") != config.rank:
                raise ValueError(
                    f"checkpoint in {checkpoint_dir} was trained with rank {state['config'].get('rank')}, "
                    f"not {config.rank}; use another run name or the same settings"
                )
            _load_lora_tensors(unet, te, tensors)
            ckpt.restore_optimizer(optimizer, tensors, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            losses = list(state["losses"])
            if "torch_rng" in tensors:
                torch.set_rng_state(tensors["torch_rng"])
    resumed_from = start
    last_checkpoint: Path | None = None

    def write_checkpoint(step: int) -> None:
        nonlocal last_checkpoint
        if not checkpoint_dir:
            return
        tensors = {f"unet.{k}": v for k, v in inject.named_lora_tensors(unet).items()}
        if te is not None:
            tensors.update({f"te.{k}": v for k, v in inject.named_lora_tensors(te).items()})
        opt_tensors, opt_json = ckpt.flatten_optimizer(optimizer)
        tensors.update(opt_tensors)
        tensors["torch_rng"] = torch.get_rng_state()
        state = {
            "config": config.to_dict(),
            "optimizer": opt_json,
            "scheduler": scheduler.state_dict(),
            "losses": losses,
        }
        last_checkpoint = ckpt.save_checkpoint(checkpoint_dir, step, tensors, state)
        if callbacks.on_checkpoint:
            callbacks.on_checkpoint(last_checkpoint)

    unet.train()
    if te is not None:
        te.train()
    params = [p for g in groups for p in g["params"]]
    n_instance = config.batch_size
    for step in range(start, config.steps):
        torch.manual_seed(config.seed * 1_000_003 + step)  # LoRA dropout, reproducible per step
        total = 0.0
        for micro in range(config.grad_accumulation):
            batch = dataset.batch(config.batch_size, config.seed, step * config.grad_accumulation + micro)
            x0 = torch.cat([(flipped if flip else latents)[i] for i, flip, _ in batch]).to(device)
            prompts = ["" if drop else dataset.examples[i].caption for i, _, drop in batch]
            gen = _seeded(config.seed, step, micro)
            with _autocast(config, device):
                cond = cond_for(prompts)
                n_instance = x0.shape[0]
                if prior_latents is not None:
                    # One forward pass over instance + class examples, as diffusers' DreamBooth script does.
                    pick = torch.randint(0, prior_latents.shape[0], (n_instance,), generator=gen)
                    x0 = torch.cat([x0, prior_latents[pick].to(device)])
                    class_cond = (
                        prior_cond
                        if prior_cond is not None
                        else model_api.encode_prompts([config.class_prompt or dataset.class_prompt])
                    )
                    cond = torch.cat([cond, class_cond.expand(n_instance, *class_cond.shape[1:])])
                per_example = objective.per_example_loss(
                    model_api, x0, cond, gen, noise_offset=config.noise_offset, min_snr_gamma=config.min_snr_gamma
                )
                loss, _, _ = objective.dreambooth_loss(per_example, n_instance, config.prior_loss_weight)
            value = float(loss.detach())
            if not math.isfinite(value):
                optimizer.zero_grad(set_to_none=True)
                write_checkpoint(step)
                where = f"; the last good state (step {step}) is in {last_checkpoint}" if last_checkpoint else ""
                raise TrainingError(
                    f"loss became {value} at step {step + 1} (learning rate {scheduler.get_last_lr()[0]:g}){where}. "
                    "Lower the learning rate, or use fp32."
                )
            (loss / config.grad_accumulation).backward()
            total += value / config.grad_accumulation
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        done = step + 1
        if callbacks.on_step:
            callbacks.on_step(done, config.steps, total)
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            write_checkpoint(done)
        try:
            stop = bool(callbacks.should_stop and callbacks.should_stop())
        except BaseException:
            write_checkpoint(done)
            raise
        if stop:
            write_checkpoint(done)
            return _result(
                unet, te, alpha, unet_name_map, losses, done, "cancelled", last_checkpoint, resumed_from, started
            )
    write_checkpoint(config.steps)
    return _result(
        unet, te, alpha, unet_name_map, losses, config.steps, "finished", last_checkpoint, resumed_from, started
    )


def _load_lora_tensors(unet, te, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for prefix, module in (("unet.", unet), ("te.", te)):
            if module is None:
                continue
            for k, p in inject.named_lora_tensors(module).items():
                p.copy_(tensors[prefix + k])


def _result(unet, te, alpha, unet_name_map, losses, steps, reason, path, resumed_from, started) -> TrainResult:
    state = inject.export_state(unet, "lora_unet", alpha, unet_name_map)
    if te is not None:
        state.modules.update(inject.export_state(te, "lora_te", alpha, inject.text_encoder_path).modules)
    return TrainResult(state, losses, steps, reason, path, resumed_from, time.monotonic() - started)
