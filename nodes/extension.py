"""The ComfyExtension that lists every node of the pack (ComfyUI's V3 entry point)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply_nodes import ApplyLoraStackNode
from .stack_nodes import LoraStackNode, PromptLoraTagsNode


class LoraWorkbenchExtension(ComfyExtension):
    """LoRA Workbench's nodes."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoraStackNode, ApplyLoraStackNode, PromptLoraTagsNode]
