"""LoRA Merge: several LoRAs (a stack and/or in-graph adapters) -> one adapter and a report."""

from __future__ import annotations

import json

from comfy_api.latest import io

from ..lora import keys as lora_keys
from ..lora import lycoris
from ..lora import merge as lora_merge
from ..lora.stack import normalize_stack
from .adapter_dict import LoraTensors, metadata_of, source_of
from .files import read_lora
from .types import CATEGORY_FILES, LoraModel, LoraStack


def format_merge_report(report: lora_merge.MergeReport) -> str:
    """Return the merge report as text: method, inputs, output ranks and the errors made."""
    ranks = sorted(set(report.ranks.values()))
    worst = sorted(report.module_errors.items(), key=lambda kv: -kv[1])[:3]
    lines = [
        f"method {report.method}: {len(report.sources)} LoRA(s) -> rank {ranks[0] if len(ranks) == 1 else ranks}",
        "inputs: " + ", ".join(f"{s} x{w:g}" for s, w in zip(report.sources, report.weights)),
        f"relative error (Frobenius, all modules): {report.overall_error:.3e}",
    ]
    if worst and worst[0][1] > 0:
        lines.append("largest module errors: " + ", ".join(f"{n} {e:.3e}" for n, e in worst))
    return "\n".join(lines)


class LoraMergeNode(io.ComfyNode):
    """Merge a stack of LoRA files and up to two in-graph adapters into one adapter."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraWorkbenchMerge",
            display_name="LoRA Merge (LoRA Workbench)",
            category=CATEGORY_FILES,
            description="concat: exact, ranks add up. svd: re-factors the exact sum to a rank (or an energy "
            "share) and reports the error it made. linear: the naive same-rank average other tools use, kept "
            "for comparison, with its true error. A weight w reproduces stacking that LoRA at strength w.",
            inputs=[
                io.Combo.Input(
                    "method",
                    options=list(lora_merge.METHODS),
                    default="concat",
                    tooltip="concat: exact (ranks add up). svd: exact sum re-factored to a rank, error reported. "
                    "linear: same-rank average (approximate, for comparison).",
                ),
                io.Int.Input(
                    "rank", default=0, min=0, max=4096, tooltip="svd target rank; 0 = the largest input rank."
                ),
                io.Float.Input(
                    "energy",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="svd: keep the smallest rank holding this share of each module's energy; 0 = off.",
                ),
                LoraStack.Input("lora_stack", optional=True, tooltip="Files with model and CLIP strengths."),
                LoraModel.Input("adapter_1", optional=True, tooltip="An in-graph adapter, e.g. from Train LoRA."),
                io.Float.Input(
                    "adapter_1_strength",
                    display_name="adapter 1",
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    optional=True,
                    tooltip="Weight of adapter_1 in the merge (as its strength when stacked).",
                ),
                LoraModel.Input("adapter_2", optional=True, tooltip="A second in-graph adapter."),
                io.Float.Input(
                    "adapter_2_strength",
                    display_name="adapter 2",
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    optional=True,
                    tooltip="Weight of adapter_2 in the merge (as its strength when stacked).",
                ),
            ],
            outputs=[
                LoraModel.Output(
                    display_name="adapter", tooltip="The merged LoRA: to Save LoRA or Apply LoRA Stack's adapter."
                ),
                io.String.Output(display_name="report", tooltip="Method, inputs, output rank and the error made."),
            ],
        )

    @classmethod
    def execute(
        cls,
        method,
        rank=0,
        energy=0.0,
        lora_stack=None,
        adapter_1=None,
        adapter_1_strength=1.0,
        adapter_2=None,
        adapter_2_strength=1.0,
    ) -> io.NodeOutput:
        states = []
        for name, strength_model, strength_clip in normalize_stack(list(lora_stack or [])):
            _, tensors, metadata = read_lora(name)
            state = lycoris.state_from_any(tensors, metadata, source=name)
            states.append(state.scaled(strength_model, strength_clip))
        for i, (adapter, strength) in enumerate(((adapter_1, adapter_1_strength), (adapter_2, adapter_2_strength)), 1):
            if adapter is not None:
                source = source_of(adapter, f"adapter_{i}")
                state = lycoris.state_from_any(dict(adapter), metadata_of(adapter), source=source)
                states.append(state.scaled(strength, strength))
        if not states:
            raise ValueError("LoRA Merge: nothing to merge; connect a lora_stack or an adapter")
        result = lora_merge.merge(states, [1.0] * len(states), method, rank=rank or None, energy=energy or None)
        result.state.metadata["lora_workbench.merge_report"] = json.dumps(
            {"overall_error": result.report.overall_error, "method": method}
        )
        adapter = LoraTensors(
            lora_keys.to_kohya_dict(result.state),
            result.state.metadata,
            source="merge of " + ", ".join(result.report.sources),
        )
        return io.NodeOutput(adapter, format_merge_report(result.report))
