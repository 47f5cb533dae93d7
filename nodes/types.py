"""Socket types in one place: the shared ones other packs use, and our own (prefixed)."""

from __future__ import annotations

from comfy_api.latest import io

# The list of (lora_name, strength_model, strength_clip) tuples that Comfyroll, Efficiency
# Nodes and LoRA Manager emit; we accept and emit exactly that shape.
LoraStack = io.Custom("LORA_STACK")
# ComfyUI's own in-graph adapter (a dict of tensors), as core TrainLoraNode emits.
LoraModel = io.LoraModel
Dataset = io.Custom("LORA_WORKBENCH_DATASET")

CATEGORY_INFERENCE = "LoRA Workbench/inference"
CATEGORY_FILES = "LoRA Workbench/files"
CATEGORY_TRAINING = "LoRA Workbench/training"
# Training Previews' settings (nodes.preview_nodes.PreviewSettings) for Train LoRA's optional input.
Previews = io.Custom("LORA_WORKBENCH_PREVIEWS")
