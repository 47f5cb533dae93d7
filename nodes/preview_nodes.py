"""Training Previews: the settings of "watch it learn" (validation loss and preview images) for Train LoRA.

The node only gathers settings; Train LoRA computes the held-out validation loss (``trainer.validation``) every N
steps and, at the same moments, samples the preview prompt with and without the trigger through ComfyUI's sampler
on the model as it trains (its LoRA layers are live in the diffusion model), saving the images in ComfyUI's temp
folder for the node's view.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

from ..trainer.validation import DEFAULT_DRAWS, ValidationConfig
from .types import CATEGORY_TRAINING, Previews


@dataclass(frozen=True)
class PreviewSettings:
    """What the Training Previews node passes to Train LoRA (``LORA_WORKBENCH_PREVIEWS``)."""

    validation: ValidationConfig
    prompt: str = ""  # empty: the dataset's caption template with the trigger
    seed: int = 0
    steps: int = 12
    cfg: float = 6.0
    size: int = 256  # 0: no preview images, only the validation loss


def preview_prompts(prompt: str, trigger: str, template_prompt: str) -> tuple[str, str]:
    """Return ``(with trigger, without trigger)`` for the previews.

    ``prompt`` empty means ``template_prompt`` (the dataset's template filled with its trigger and class). The
    prompt without the trigger is the same text with the trigger word taken out; a prompt that lacks the trigger
    gets it in front for the first image.
    """
    text = " ".join((prompt or template_prompt).split())
    words = text.split(" ")
    if trigger and trigger in words:
        return text, " ".join(w for w in words if w != trigger)
    return (f"{trigger} {text}".strip() if trigger else text), text


def sample_previews(api, prompts: list[str], settings: PreviewSettings) -> torch.Tensor:
    """Return images ``(len(prompts), H, W, 3)`` in [0, 1] sampled by ComfyUI on the model as it is now.

    Same sampler path as class images (``ComfyModelApi.sample_images``), on the training ModelPatcher, whose
    diffusion model holds the live LoRA layers, with the fixed ``settings.seed``: two previews differ only by the
    LoRA. The prompts go through ``api.encode_prompts``, so a training text encoder's LoRA takes part too.
    """

    def conditioning(text):
        cond = dict(api.encode_prompts([text]))
        return [[cond.pop("cross_attn"), cond]]

    negative = conditioning("")
    images = [
        api.sample_images(
            api.source, conditioning(text), negative, 1, settings.seed, settings.size, settings.steps, settings.cfg
        ).cpu()
        for text in prompts
    ]
    return torch.cat(images)


def save_temp_images(images: torch.Tensor, prefix: str) -> list[dict]:
    """Save ``images (N, H, W, 3)`` as PNG in ComfyUI's temp folder; return ``{filename, subfolder, type}`` each
    (what ComfyUI's ``/view`` route serves)."""
    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    out = []
    for i, image in enumerate(images):
        name = f"{prefix}_{i}.png"
        arr = (image.numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, name), compress_level=1)
        out.append({"filename": name, "subfolder": "", "type": "temp"})
    return out


class PreviewWatcher:
    """``TrainCallbacks.on_validation`` for Train LoRA: samples the previews and sends them with the loss.

    The loop calls it with the model in eval mode, under ``torch.no_grad``, with the global generators forked, so
    sampling here leaves training as it would have been.
    """

    def __init__(self, api, settings: PreviewSettings, prompts: tuple[str, str], progress, node_id):
        self.api, self.settings, self.prompts, self.progress = api, settings, prompts, progress
        self.node_id = node_id
        self.seconds = 0.0  # spent sampling previews, in all

    def __call__(self, step: int, loss: float) -> None:
        images = []
        if self.settings.size:
            started = time.monotonic()
            batch = sample_previews(self.api, list(self.prompts), self.settings)
            prefix = f"lora_workbench_preview_{self.node_id or 'node'}_{step:06d}"
            images = save_temp_images(batch, prefix)
            for image, label, text in zip(images, ("with trigger", "without trigger"), self.prompts):
                image["label"], image["prompt"] = label, text
            self.seconds += time.monotonic() - started
        self.progress.on_validation(step, loss, images)


class TrainingPreviewsNode(io.ComfyNode):
    """Settings for watching a training run learn: held-out validation loss and preview images every N steps."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraWorkbenchTrainingPreviews",
            display_name="Training Previews (LoRA Workbench)",
            category=CATEGORY_TRAINING,
            description="Connect to Train LoRA's 'previews' input: every N steps it computes the loss on held-out "
            "images (fixed noise and timesteps) and samples the prompt with and without the trigger, shown in the "
            "Train node beside the loss curve.",
            inputs=[
                io.Int.Input("every", default=50, min=1, max=100000, tooltip="Evaluate and preview every N steps."),
                io.Int.Input(
                    "hold_out",
                    default=1,
                    min=0,
                    max=1000,
                    tooltip="Images held out of training to measure the validation loss on (always the same files "
                    "for a folder). 0: measure on up to 4 training images (trains exactly as without previews).",
                ),
                io.String.Input(
                    "prompt",
                    default="",
                    tooltip="Preview prompt; empty: the dataset's caption template with its trigger. It is also "
                    "sampled without the trigger word.",
                ),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip="Seed of the previews' noise."),
                io.Int.Input("sampler_steps", default=12, min=1, max=100, tooltip="Sampler steps per preview."),
                io.Float.Input("cfg", default=6.0, min=1.0, max=30.0, step=0.5, tooltip="Guidance of the previews."),
                io.Int.Input(
                    "size", default=256, min=0, max=1024, step=8, tooltip="Preview side in pixels; 0: no images."
                ),
            ],
            outputs=[
                Previews.Output(
                    display_name="previews", tooltip="To Train LoRA's 'previews' input (these settings, nothing else)."
                )
            ],
        )

    @classmethod
    def execute(cls, every, hold_out, prompt, seed, sampler_steps, cfg, size) -> io.NodeOutput:
        validation = ValidationConfig(every=every, hold_out=hold_out, draws=DEFAULT_DRAWS, seed=seed)
        return io.NodeOutput(PreviewSettings(validation, prompt, seed, sampler_steps, cfg, size))


def watch_training(previews: PreviewSettings | None, api, dataset, progress, node_id):
    """Return ``(validation settings, on_validation callback)`` for Train LoRA, or ``(None, None)`` without
    Training Previews (training exactly as before)."""
    if previews is None:
        return None, None
    opts = dataset.options
    template = opts.caption_template.format(trigger=opts.trigger, class_noun=opts.class_noun)
    prompts = preview_prompts(previews.prompt, opts.trigger, template)
    return previews.validation, PreviewWatcher(api, previews, prompts, progress, node_id)


def validation_report(previews: PreviewSettings | None, result) -> tuple[str, dict]:
    """Return the summary's validation line and the metadata's validation settings (empty without previews)."""
    if previews is None:
        return "", {}
    v = previews.validation
    held = ", ".join(result.held_out) if result.held_out else "none (evaluated on training images)"
    losses = result.validation
    trend = (
        f"{losses[0][1]:.4f} at step {losses[0][0]} -> {losses[-1][1]:.4f} at step {losses[-1][0]}" if losses else "-"
    )
    line = (
        f"\nvalidation loss {trend} (every {v.every} steps, {v.draws} fixed draws per image; "
        f"{result.validation_seconds:.1f} s with previews); held out: {held}"
    )
    return line, {"validation_every": v.every, "validation_held_out": held}
