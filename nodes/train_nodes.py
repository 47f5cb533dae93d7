"""Image Folder Dataset and Train LoRA (DreamBooth): the trainer behind two thin ComfyUI nodes."""

from __future__ import annotations

import os
import re
from dataclasses import fields

import folder_paths
import torch
from comfy_api.latest import io

from ..lora import keys as lora_keys
from ..lora import metadata as lora_metadata
from ..trainer import loop
from ..trainer.config import TrainConfig
from ..trainer.dataset import DEFAULT_TEMPLATE, DatasetOptions, load_image_folder
from ..trainer.loss_plot import plot_losses
from .adapter_dict import LoraTensors
from .comfy_backend import ComfyModelApi, ldm_to_diffusers_names
from .patching import LoraToApply, apply_loras
from .progress import TrainingProgress
from .types import CATEGORY_TRAINING, Dataset, LoraModel

RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def dataset_folder(folder: str) -> str:
    """Return the absolute dataset folder: as given, or relative to ComfyUI's input directory."""
    folder = folder.strip()
    return folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder)


def checkpoint_dir(run_name: str) -> str:
    """Return ``<output>/lora_workbench/checkpoints/<run_name>``.

    Raises:
        ValueError: the run name has characters other than letters, digits, ``_ . -``.
    """
    if not RUN_NAME.match(run_name):
        raise ValueError(f"run_name '{run_name}': use letters, digits, '_', '.' and '-' only")
    return os.path.join(folder_paths.get_output_directory(), "lora_workbench", "checkpoints", run_name)


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_STEPS = {
    "alpha": 0.5,
    "learning_rate": 1e-6,
    "prior_loss_weight": 0.05,
    "min_snr_gamma": 0.5,
    "noise_offset": 0.01,
    "te_learning_rate": 1e-6,
}


def _setting(name: str, optional: bool = False):
    """Return the widget of a ``TrainConfig`` field: its default, range, options and help text as the tooltip."""
    f = _FIELDS[name]
    meta = f.metadata
    common = dict(default=f.default, tooltip=meta["help"], optional=optional)
    if "options" in meta:
        return io.Combo.Input(name, options=list(meta["options"]), **common)
    if f.type == "bool":
        return io.Boolean.Input(name, **common)
    if f.type == "str":
        return io.String.Input(name, **common)
    number = io.Int.Input if f.type == "int" else io.Float.Input
    limits = {k: meta[k] for k in ("min", "max") if k in meta}
    if name in _STEPS:
        limits["step"] = _STEPS[name]
    return number(name, **common, **limits)


REQUIRED_SETTINGS = (
    "steps",
    "rank",
    "alpha",
    "learning_rate",
    "batch_size",
    "target",
    "train_text_encoder",
    "prior_preservation",
    "class_prompt",
    "num_class_images",
    "prior_loss_weight",
    "class_images_dir",
    "seed",
    "precision",
    "gradient_checkpointing",
    "checkpoint_every",
)
OPTIONAL_SETTINGS = (
    "lr_scheduler",
    "warmup_steps",
    "grad_accumulation",
    "min_snr_gamma",
    "noise_offset",
    "te_learning_rate",
    "custom_targets",
)


class ImageFolderDatasetNode(io.ComfyNode):
    """A folder of images (+ same-name .txt captions) -> a training set and a report of what was used."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraWorkbenchImageFolder",
            display_name="Image Folder Dataset (LoRA Workbench)",
            category=CATEGORY_TRAINING,
            inputs=[
                io.String.Input("folder", default="", tooltip="Absolute path, or a folder inside ComfyUI's input."),
                io.String.Input("trigger", default="sks", tooltip="The rare token that will name your subject."),
                io.String.Input("class_noun", default="dog", tooltip="What the subject is: dog, person, style..."),
                io.String.Input(
                    "caption_template", default=DEFAULT_TEMPLATE, tooltip="Caption of images without a .txt file."
                ),
                io.Int.Input("resolution", default=512, min=16, max=2048, step=8),
                io.Combo.Input("crop", options=["center", "random"], default="center"),
                io.Boolean.Input("buckets", default=False, tooltip="Keep aspect ratios (buckets of ~resolution^2)."),
                io.Boolean.Input("flip", default=False, tooltip="Random horizontal flips."),
                io.Int.Input("repeats", default=1, min=1, max=1000),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01),
            ],
            outputs=[Dataset.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(
        cls, folder, trigger, class_noun, caption_template, resolution, crop, buckets, flip, repeats, caption_dropout
    ) -> io.NodeOutput:
        options = DatasetOptions(
            trigger, class_noun, caption_template, resolution, crop, buckets, flip, repeats, caption_dropout
        )
        dataset = load_image_folder(dataset_folder(folder), options)
        return io.NodeOutput(dataset, dataset.report())


class TrainLoraNode(io.ComfyNode):
    """DreamBooth-LoRA training in the ComfyUI process, on the graph's own MODEL, CLIP and VAE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraWorkbenchTrain",
            display_name="Train LoRA (DreamBooth) (LoRA Workbench)",
            category=CATEGORY_TRAINING,
            description="Trains a LoRA on the dataset with the graph's MODEL, CLIP and VAE (left unchanged), "
            "with optional prior preservation and text-encoder LoRA. Writes resumable checkpoints to "
            "output/lora_workbench/checkpoints/<run_name>; Cancel keeps the last one.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                Dataset.Input("dataset"),
                *(_setting(name) for name in REQUIRED_SETTINGS),
                io.String.Input("run_name", default="my_lora", tooltip="Names the checkpoint folder of this run."),
                io.Boolean.Input("resume", default=True, tooltip="Continue from this run's checkpoint if present."),
                *(_setting(name, optional=True) for name in OPTIONAL_SETTINGS),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Clip.Output(display_name="CLIP"),
                LoraModel.Output(display_name="adapter"),
                io.Image.Output(display_name="loss_curve"),
                io.String.Output(display_name="summary"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, run_name, resume, **settings) -> io.NodeOutput:
        config = TrainConfig(**settings)
        progress = TrainingProgress(cls.hidden.unique_id if cls.hidden else None, config.steps)
        # The executor runs nodes under torch.inference_mode; training needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            api = ComfyModelApi(model, clip, vae, train_text_encoder=config.train_text_encoder)
            names = ldm_to_diffusers_names(model)
            result = loop.train(
                api,
                dataset,
                config,
                loop.TrainCallbacks(on_step=progress.on_step, should_stop=progress.should_stop),
                checkpoint_dir=checkpoint_dir(run_name),
                resume=resume,
                cache_dir=os.path.join(folder_paths.get_output_directory(), "lora_workbench"),
                unet_name_map=lambda path: names.get(path, path),
            )
        state = result.state
        state.metadata.update(
            lora_metadata.build_metadata(
                state,
                output_name=run_name,
                trigger_words=[dataset.options.trigger],
                training_settings={
                    **config.to_dict(),
                    "dataset": dataset.report().splitlines()[0],
                    "steps_done": result.steps_done,
                },
            )
        )
        adapter = LoraTensors(lora_keys.to_kohya_dict(state), state.metadata)
        new_model, new_clip, _ = apply_loras(model, clip, [LoraToApply(run_name, adapter, state.metadata, 1.0, 1.0)])
        curve = torch.from_numpy(plot_losses(result.losses, f"{run_name} loss"))[None]
        summary = (
            f"{result.stopped_reason} after {result.steps_done}/{config.steps} steps in {result.seconds:.1f} s"
            + (f" (resumed at step {result.resumed_from})" if result.resumed_from else "")
            + f"; final loss {result.losses[-1]:.4f}; rank {config.rank}, alpha {config.effective_alpha:g}; "
            f"{len(state.modules)} modules; checkpoint {result.checkpoint_path}"
        )
        progress.done(result.steps_done, str(result.checkpoint_path) if result.checkpoint_path else None)
        return io.NodeOutput(new_model, new_clip, adapter, curve, summary, ui={"text": [summary]})
