"""Image Folder Dataset and Train LoRA (DreamBooth): the trainer behind two thin ComfyUI nodes."""

from __future__ import annotations

import os
from dataclasses import fields

import folder_paths
import torch
from comfy_api.latest import io

from ..headless.comfy_compat import mark_advanced
from ..lora import keys as lora_keys
from ..lora import metadata as lora_metadata
from ..trainer import loop, paths
from ..trainer.config import RATE_FIELDS, TrainConfig, parse_rates
from ..trainer.dataset import DEFAULT_TEMPLATE, DatasetOptions, folder_signature, load_image_folder
from ..trainer.loss_plot import plot_losses
from .adapter_dict import LoraTensors
from .comfy_backend import ComfyModelApi
from .patching import LoraToApply, apply_loras
from .preview_nodes import validation_report, watch_training
from .progress import TrainingProgress
from .types import CATEGORY_TRAINING, Dataset, LoraModel, Previews


def data_folder(name: str, what: str) -> str:
    """Return the absolute folder for a dataset or class-image folder name typed in a workflow.

    Relative names are read inside ComfyUI's input folder; absolute ones must lie inside the input or output
    folder, or a folder the server's owner listed in ``$LORA_WORKBENCH_DATA_ROOTS``.

    Raises:
        trainer.paths.PathNotAllowedError: the name leaves those folders.
    """
    return paths.resolve_data_folder(name, _data_roots(), what)


def _data_roots() -> dict[str, str]:
    return {"input": folder_paths.get_input_directory(), "output": folder_paths.get_output_directory()}


def workbench_output() -> str:
    """Return ``<output>/lora_workbench``, where checkpoints and cached class images go."""
    return os.path.join(folder_paths.get_output_directory(), "lora_workbench")


def checkpoint_dir(run_name: str) -> str:
    """Return ``<output>/lora_workbench/checkpoints/<run_name>`` (a run name may have '/'-separated parts).

    Raises:
        ValueError: a part of the run name is empty, starts with '.', or has characters other than letters,
            digits, ``_ . -``.
    """
    return str(paths.run_folder(os.path.join(workbench_output(), "checkpoints"), run_name))


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_STEPS = {
    "alpha": 0.5,
    "prior_loss_weight": 0.05,
    "min_snr_gamma": 0.5,
    "noise_offset": 0.01,
}


# Labels for the Train node's inputs (the input names stay: workflows and prompts use them), short enough that
# neither rendering cuts them (tests/browser/test_train_labels.py measures it); the tooltip says the rest.
LABELS = {
    "learning_rate": "learning rate",
    "batch_size": "batch size",
    "train_text_encoder": "train CLIP",
    "prior_preservation": "prior loss",
    "class_prompt": "class prompt",
    "num_class_images": "class images",
    "prior_loss_weight": "prior weight",
    "class_images_dir": "class folder",
    "gradient_checkpointing": "save memory",
    "checkpoint_every": "save every",
    "run_name": "run name",
    "lr_scheduler": "LR schedule",
    "warmup_steps": "warmup steps",
    "grad_accumulation": "accumulate",
    "min_snr_gamma": "min SNR γ",
    "noise_offset": "noise offset",
    "timestep_sampling": "timesteps",
    "te_learning_rate": "CLIP rate",
    "custom_targets": "custom layers",
}


def rate_text(rate: float) -> str:
    """Return a learning rate as the Train node shows it: ``1e-4`` for 0.0001, ``0`` for 0."""
    if not rate:
        return "0"
    mantissa, exponent = f"{rate:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _setting(name: str, optional: bool = False):
    """Return the widget of a ``TrainConfig`` field: its default, range, options and help text as the tooltip.

    Learning rates are text ("1e-4"): number widgets of some frontends show or store values this small wrongly
    (frontend 1.32's Nodes 2.0 shows 1e-4 as "0"). ``trainer.config.parse_rate`` reads them, numbers of older
    workflows included.
    """
    f = _FIELDS[name]
    meta = f.metadata
    common = dict(default=f.default, tooltip=meta["help"], optional=optional, display_name=LABELS.get(name))
    if name in RATE_FIELDS:
        widget = io.String.Input(name, **{**common, "default": rate_text(f.default)})
    elif "options" in meta:
        widget = io.Combo.Input(name, options=list(meta["options"]), **common)
    elif f.type == "bool":
        widget = io.Boolean.Input(name, **common)
    elif f.type == "str":
        widget = io.String.Input(name, **common)
    else:
        number = io.Int.Input if f.type == "int" else io.Float.Input
        limits = {k: meta[k] for k in ("min", "max") if k in meta}
        if name in _STEPS:
            limits["step"] = _STEPS[name]
        widget = number(name, **common, **limits)
    return mark_advanced(widget) if name in ADVANCED else widget


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
    "timestep_sampling",
    "te_learning_rate",
    "custom_targets",
    "offload",
)


# Shown up front: what a first run needs. Everything else sits behind the node's "Show advanced" (frontends that
# support it); the order of inputs stays as it was, since saved workflows list widget values in that order.
ADVANCED = {
    "alpha",
    "target",
    "class_prompt",
    "num_class_images",
    "prior_loss_weight",
    "class_images_dir",
    "precision",
    "gradient_checkpointing",
    "checkpoint_every",
    *OPTIONAL_SETTINGS,
}


class ImageFolderDatasetNode(io.ComfyNode):
    """A folder of images (+ same-name .txt captions) -> a training set and a report of what was used."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraWorkbenchImageFolder",
            display_name="Image Folder Dataset (LoRA Workbench)",
            category=CATEGORY_TRAINING,
            description="Reads a folder of images (png, jpg, webp...) and their same-name .txt captions into a "
            "training set for Train LoRA. Images without a caption get the caption template, filled with the "
            "trigger and class noun. Unreadable files are named in the report.",
            inputs=[
                io.String.Input(
                    "folder",
                    default="",
                    tooltip="A folder inside ComfyUI's input folder (e.g. 'my_dog'), or an absolute path inside the "
                    "input or output folder (others only if the server allows them: LORA_WORKBENCH_DATA_ROOTS).",
                ),
                io.String.Input("trigger", default="sks", tooltip="The rare token that will name your subject."),
                io.String.Input(
                    "class_noun",
                    display_name="class noun",
                    default="dog",
                    tooltip="What the subject is: dog, person, style...",
                ),
                io.String.Input(
                    "caption_template",
                    display_name="template",
                    default=DEFAULT_TEMPLATE,
                    tooltip="Caption of images without a .txt file: {trigger} and {class_noun} are filled in.",
                ),
                io.Int.Input(
                    "resolution",
                    default=512,
                    min=16,
                    max=2048,
                    step=8,
                    tooltip="Training size in pixels: images are scaled and cropped to resolution x resolution "
                    "(with buckets: about that many pixels, aspect kept). 512 for SD1, 1024 for SDXL and Flux.",
                ),
                io.Combo.Input(
                    "crop",
                    options=["center", "random"],
                    default="center",
                    tooltip="Which part of an image that does not fit is kept: the center, or a new random part "
                    "each time it is used.",
                ),
                io.Boolean.Input("buckets", default=False, tooltip="Keep aspect ratios (buckets of ~resolution^2)."),
                io.Boolean.Input("flip", default=False, tooltip="Random horizontal flips."),
                io.Int.Input(
                    "repeats", default=1, min=1, max=1000, tooltip="How many times each image counts per epoch."
                ),
                io.Float.Input(
                    "caption_dropout",
                    display_name="drop caption",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Probability of using an empty caption for an image (helps the LoRA work without the "
                    "trigger); 0 turns it off.",
                ),
                io.Boolean.Input(
                    "recursive",
                    default=True,
                    optional=True,
                    tooltip="Use images in sub-folders too. A kohya-style folder '10_sks dog' repeats its images "
                    "10 times and captions those without a .txt file 'sks dog'. Off: sub-folders are listed in "
                    "the report, not used.",
                ),
            ],
            outputs=[
                Dataset.Output(display_name="dataset", tooltip="The images and captions, for Train LoRA."),
                io.String.Output(
                    display_name="report", tooltip="How many images and captions were used, and what was skipped."
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, **_):
        # Images added, removed or edited in the folder must re-run the node: key on names, sizes and times.
        try:
            return folder_signature(data_folder(folder, "dataset folder"))
        except ValueError:
            return folder  # execute reports the problem

    @classmethod
    def execute(
        cls,
        folder,
        trigger,
        class_noun,
        caption_template,
        resolution,
        crop,
        buckets,
        flip,
        repeats,
        caption_dropout,
        recursive=True,
    ) -> io.NodeOutput:
        recursive = True if recursive is None else recursive  # an absent optional input may arrive as None
        options = DatasetOptions(
            trigger, class_noun, caption_template, resolution, crop, buckets, flip, repeats, caption_dropout, recursive
        )
        label = paths.display_name(folder, _data_roots())
        dataset = load_image_folder(data_folder(folder, "dataset folder"), options, label=label)
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
                io.Model.Input("model", tooltip="The base model to train on; it is left unchanged."),
                io.Clip.Input(
                    "clip", tooltip="The model's text encoder: encodes the captions (trained too with train CLIP on)."
                ),
                io.Vae.Input("vae", tooltip="Encodes the dataset's images to latents, once, before training."),
                Dataset.Input("dataset", tooltip="The training images and captions, from Image Folder Dataset."),
                *(_setting(name) for name in REQUIRED_SETTINGS),
                io.String.Input(
                    "run_name",
                    display_name=LABELS["run_name"],
                    default="my_lora",
                    tooltip="Names this run's checkpoint folder in output/lora_workbench/checkpoints ('/' makes "
                    "sub-folders; letters, digits, '_', '.', '-').",
                ),
                io.Boolean.Input(
                    "resume",
                    default=True,
                    tooltip="Continue this run's checkpoint when it is the same run (same images, captions, base "
                    "model and settings; steps may grow). A checkpoint of another run is renamed aside, never "
                    "overwritten, and training starts fresh.",
                ),
                *(_setting(name, optional=True) for name in OPTIONAL_SETTINGS),
                Previews.Input(
                    "previews",
                    optional=True,
                    tooltip="From Training Previews: a held-out validation loss and preview images every N steps, "
                    "shown beside the loss curve. Unconnected: none.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The input MODEL with the trained LoRA applied."),
                io.Clip.Output(
                    display_name="CLIP", tooltip="The input CLIP with the trained LoRA applied (if train CLIP is on)."
                ),
                LoraModel.Output(
                    display_name="adapter",
                    tooltip="The trained LoRA (ComfyUI's LORA_MODEL): to Save LoRA, or Apply LoRA Stack's adapter.",
                ),
                io.Image.Output(display_name="loss_curve", tooltip="The loss per step, plotted as an image."),
                io.String.Output(
                    display_name="summary", tooltip="How the run ended, its final loss, settings and checkpoint."
                ),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, run_name, resume, previews=None, **settings) -> io.NodeOutput:
        config = TrainConfig(**parse_rates(settings))
        run_dir = checkpoint_dir(run_name)
        class_dir = data_folder(config.class_images_dir, "class_images_dir") if config.class_images_dir else None
        progress = TrainingProgress(
            cls.hidden.unique_id if cls.hidden else None, config.steps, run_dir=run_dir, run_name=run_name
        )
        callbacks = loop.TrainCallbacks(
            on_step=progress.on_step,
            should_stop=progress.should_stop,
            on_checkpoint=progress.on_checkpoint,
            on_class_images=progress.on_class_images,
        )
        # The executor runs nodes under torch.inference_mode; training needs autograd.
        with torch.inference_mode(False), torch.enable_grad(), progress.reporting_failures():
            api = ComfyModelApi(model, clip, vae, train_text_encoder=config.train_text_encoder, offload=config.offload)
            names = api.unet_name_map
            validation, callbacks.on_validation = watch_training(previews, api, dataset, progress, progress.node_id)
            result = loop.train(
                api,
                dataset,
                config,
                callbacks,
                checkpoint_dir=run_dir,
                resume=resume,
                cache_dir=workbench_output(),
                unet_name_map=lambda path: names.get(path, path),
                class_images_dir=class_dir,
                validation=validation,
            )
        state = result.state
        validation_line, validation_settings = validation_report(previews, result)
        state.metadata.update(
            lora_metadata.build_metadata(
                state,
                output_name=run_name,
                base_family=api.family,
                trigger_words=[dataset.options.trigger],
                training_settings={
                    **config.to_dict(),
                    "class_images_dir": paths.display_name(config.class_images_dir, _data_roots()),
                    # What was trained on, without the server's paths: the folder as the user named it.
                    "dataset": dataset.report().splitlines()[0],
                    "steps_done": result.steps_done,
                    **validation_settings,
                },
            )
        )
        adapter = LoraTensors(lora_keys.to_kohya_dict(state), state.metadata)
        new_model, new_clip, _ = apply_loras(model, clip, [LoraToApply(run_name, adapter, state.metadata, 1.0, 1.0)])
        curve = torch.from_numpy(plot_losses(result.losses, f"{run_name} loss"))[None]
        summary = _summary(result, config, run_name, len(state.modules)) + validation_line
        progress.done(result)
        return io.NodeOutput(new_model, new_clip, adapter, curve, summary, ui={"text": [summary]})


def _summary(result: loop.TrainResult, config: TrainConfig, run_name: str, modules: int) -> str:
    """Return the Train node's summary: how the run ended, said plainly, then its numbers."""
    if result.stopped_reason == "already finished":
        head = (
            f"already finished: the checkpoint of run '{run_name}' is at step {result.steps_done} of "
            f"{config.steps}, so nothing was trained and this is that run's LoRA (turn resume off, raise "
            f"steps or change run_name to train again)"
        )
    else:
        head = f"{result.stopped_reason} after {result.steps_done}/{config.steps} steps in {result.seconds:.1f} s" + (
            f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
        )
    loss = f"final loss {result.losses[-1]:.4f}" if result.losses else "no loss recorded"
    where = f"checkpoints/{run_name}" if result.checkpoint_path else "no checkpoint"
    notes = "".join(f"\n{note}" for note in result.notes)
    return (
        f"{head}; {loss}; rank {config.rank}, alpha {config.effective_alpha:g}; {modules} modules; "
        f"checkpoint {where}{notes}"
    )
