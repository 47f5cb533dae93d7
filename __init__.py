"""LoRA Workbench: train, load, stack, scale and merge LoRAs inside ComfyUI.

ComfyUI imports this file when the pack sits in ``custom_nodes/``. It only declares the
entry point and the frontend folder; nothing is imported from ComfyUI until ComfyUI asks.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    """Return the pack's ``ComfyExtension`` (ComfyUI's V3 entry point)."""
    from .nodes.extension import LoraWorkbenchExtension

    return LoraWorkbenchExtension()
