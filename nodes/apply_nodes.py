"""Apply LoRA Stack: MODEL + CLIP + stack (+ an in-graph adapter) -> patched MODEL and CLIP."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..lora import metadata as lora_metadata
from ..lora import scale as lora_scale
from ..lora.stack import normalize_stack
from .adapter_dict import metadata_of, source_of
from .files import read_lora
from .model_family import model_family
from .patching import LoraToApply, apply_loras, format_report
from .types import CATEGORY_INFERENCE, LoraModel, LoraStack

log = logging.getLogger(__name__)

# Labels of the adapter's strength widgets, short enough that Nodes 2.0 does not cut them (input names stay).
ADAPTER_LABELS = {"adapter_strength": "adapter", "adapter_strength_clip": "adapter CLIP"}


class ApplyLoraStackNode(io.ComfyNode):
    """Patches MODEL and CLIP with every LoRA of a stack through ComfyUI's own LoRA mechanism."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraWorkbenchApplyStack",
            display_name="Apply LoRA Stack (LoRA Workbench)",
            category=CATEGORY_INFERENCE,
            description="Applies each LoRA of the stack (and an optional in-graph adapter) exactly as a chain "
            "of core Load LoRA nodes would, and reports per LoRA what matched.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (its weights stay unchanged until sampling)."),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder to patch; without it only MODEL is."),
                LoraStack.Input(
                    "lora_stack",
                    optional=True,
                    tooltip="The LoRAs to apply, from LoRA Stack, Prompt LoRA Tags or another pack's stack node.",
                ),
                LoraModel.Input("adapter", optional=True, tooltip="An in-graph adapter, e.g. from Train LoRA."),
                io.Float.Input(
                    "adapter_strength",
                    display_name=ADAPTER_LABELS["adapter_strength"],
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    optional=True,
                    tooltip="Strength of the adapter on the MODEL (1: as trained, 0: off).",
                ),
                io.Float.Input(
                    "adapter_strength_clip",
                    display_name=ADAPTER_LABELS["adapter_strength_clip"],
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    optional=True,
                    tooltip="Strength of the adapter on the CLIP text encoder (1: as trained, 0: off).",
                ),
                io.Float.Input(
                    "scale",
                    display_name="scale all",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    optional=True,
                    tooltip="Multiplies every strength.",
                ),
                io.String.Input(
                    "block_weights",
                    display_name="block weights",
                    default="",
                    optional=True,
                    tooltip="Per-block weights: a preset name (ALL, INS, MIDD, OUTD, ...) or a comma list in "
                    "the LoRA Block Weight order (17 values for SD1, 12 for SDXL; the first is the text "
                    "encoder). Empty: all 1.",
                ),
                io.Boolean.Input(
                    "allow_pickle",
                    display_name="allow pickle",
                    default=False,
                    optional=True,
                    tooltip="Also read .ckpt/.pt/.bin LoRAs. Pickle files can run code when loaded.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with every LoRA applied."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder with every LoRA applied."),
                io.String.Output(
                    display_name="trigger_words",
                    tooltip="The applied LoRAs' trigger words, comma-separated: add them to your prompt.",
                ),
                io.String.Output(
                    display_name="report", tooltip="Per LoRA: strengths and what matched; a warning above 2.0 total."
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip=None,
        lora_stack=None,
        adapter=None,
        adapter_strength=1.0,
        adapter_strength_clip=1.0,
        scale=1.0,
        block_weights="",
        allow_pickle=False,
    ) -> io.NodeOutput:
        loras = []
        for name, strength_model, strength_clip in normalize_stack(list(lora_stack or [])):
            if strength_model == 0 and strength_clip == 0:
                continue  # as core LoraLoader does: nothing to patch
            _, tensors, metadata = read_lora(name, allow_pickle=allow_pickle)
            loras.append(LoraToApply(name, tensors, metadata, strength_model * scale, strength_clip * scale))
        if adapter is not None:
            loras.append(
                LoraToApply(
                    source_of(adapter),
                    dict(adapter),
                    metadata_of(adapter),
                    adapter_strength * scale,
                    adapter_strength_clip * scale,
                )
            )
        weights = None
        if block_weights.strip():
            weights = lora_scale.parse_block_weights(block_weights, model_family(model) or "sd1")
        model, clip, applied = apply_loras(model, clip, loras, weights)
        total = lora_scale.total_strength([a.strength_model for a in applied])
        warning = lora_scale.strength_warning(total)
        if warning:
            log.warning("Apply LoRA Stack: %s", warning)
        trigger_words = ", ".join(lora_metadata.dedupe_words(w for a in applied for w in a.trigger_words))
        report = format_report(applied, total, warning)
        return io.NodeOutput(model, clip, trigger_words, report, ui={"text": [report]})
