"""The progress hook ComfyUI's server installs, for headless runs: Cancel raises inside a progress update.

ComfyUI's ``main.py`` sets a global hook on ``comfy.utils.ProgressBar`` that first raises the interrupt
exception when the user pressed Cancel, then sends a "progress" event. Nodes therefore meet Cancel inside
their progress updates, not only where they check for it; a headless run installs the same behaviour so
the tests see what users see.
"""

from __future__ import annotations


def install_progress_hook(server) -> None:
    """Make every ComfyUI progress update check for Cancel, then report to ``server.send_sync`` like the server's."""
    import comfy.model_management
    import comfy.utils

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        progress = {
            "value": value,
            "max": total,
            "prompt_id": prompt_id or server.last_prompt_id,
            "node": node_id or server.last_node_id,
        }
        server.send_sync("progress", progress, server.client_id)

    comfy.utils.set_progress_bar_global_hook(hook)
