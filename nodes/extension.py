"""The ComfyExtension that lists every node of the pack (ComfyUI's V3 entry point)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply_nodes import ApplyLoraStackNode
from .file_nodes import ConvertLoraNode, LoadLoraNode, LoraInfoNode, SaveLoraNode
from .merge_nodes import LoraMergeNode
from .preview_nodes import TrainingPreviewsNode
from .routes import register_with_server
from .stack_nodes import LoraStackNode, PromptLoraTagsNode
from .train_nodes import ImageFolderDatasetNode, TrainLoraNode


class LoraWorkbenchExtension(ComfyExtension):
    """LoRA Workbench's nodes."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.75 never calls on_load; this runs before the server adds its route table.
        register_with_server()
        return [
            LoraStackNode,
            ApplyLoraStackNode,
            PromptLoraTagsNode,
            LoraInfoNode,
            LoadLoraNode,
            LoraMergeNode,
            SaveLoraNode,
            ConvertLoraNode,
            ImageFolderDatasetNode,
            TrainLoraNode,
            TrainingPreviewsNode,
        ]
