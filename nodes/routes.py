"""HTTP routes under ``/lora_workbench/`` for the frontend (LoRA info: trigger words, rank, alpha...).

``register_routes(PromptServer.instance.routes)`` adds them; it is called once when the pack loads.
The handlers only translate: a file's header is read through ``lora.safeio`` (validated; no weights
are loaded) and summarised by ``lora.metadata``; answers never contain server paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import folder_paths

from ..lora import metadata as lora_metadata
from ..lora import safeio
from ..lora.stack import resolve_lora_name
from ..trainer.dataset import IMAGE_SUFFIXES
from .files import resolve_lora_path

log = logging.getLogger(__name__)

INFO_PATH = "/lora_workbench/info"
FOLDERS_PATH = "/lora_workbench/input_folders"


def _scalar_or_list(values: list) -> Any:
    """One value as itself, several as the sorted list, none as None."""
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def lora_info(name: str) -> dict:
    """Return the info panel's JSON for a LoRA name as the frontend has it (any separator, path ok).

    Returns:
        ``{name, exists, rank, alpha, base_family, trigger_words, training_settings, error}`` plus
        ``resolved`` (the entry of ComfyUI's list) and ``title``. ``rank``/``alpha`` are a number, or a
        sorted list when modules differ. A missing or unreadable file gives ``exists`` False or an
        ``error`` message naming the file; this function does not raise for those.
    """
    out: dict[str, Any] = {
        "name": name,
        "exists": False,
        "resolved": None,
        "rank": None,
        "alpha": None,
        "base_family": None,
        "trigger_words": [],
        "training_settings": {},
        "title": "",
        "error": None,
    }
    try:
        resolved = resolve_lora_name(name, folder_paths.get_filename_list("loras"))
        path = resolve_lora_path(resolved)
    except LookupError as e:
        out["error"] = str(e)
        return out
    out["exists"] = True
    out["resolved"] = resolved
    try:
        # The header only (shapes, metadata) and the alpha scalars: no weights are read, no pickle is loaded
        # (a .ckpt named here reports the refusal), and messages name the file as listed, never its server path.
        tensors, md = safeio.read_header(path, display=resolved, load=lambda key: key.endswith(".alpha"))
        desc = lora_metadata.describe(tensors, md, source=resolved)
    except (ValueError, OSError) as e:
        out["error"] = str(e).replace(path, resolved)
        return out
    out.update(
        rank=_scalar_or_list(desc.get("ranks") or []),
        alpha=_scalar_or_list([int(a) if float(a).is_integer() else a for a in desc.get("alphas") or []]),
        base_family=desc.get("family"),
        trigger_words=list(desc.get("trigger_words") or []),
        training_settings=dict(desc.get("training_settings") or {}),
        title=desc.get("title") or "",
    )
    return out


def input_folders(root: str, depth: int = 2, limit: int = 1000) -> list[dict]:
    """Return the sub-folders of ``root`` (ComfyUI's input folder) a dataset or class-image folder may name.

    Args:
        root: the folder to list.
        depth: how deep to list (2: ``my_dog`` and kohya-style ``my_dog/10_sks dog``); image counts go deeper.
        limit: the most folders returned.

    Returns:
        ``[{"name": "my_dog", "images": 12}, ...]`` sorted by name: '/'-separated names relative to ``root`` (what
        the widget takes), and the image files inside each, its sub-folders included. Hidden folders are left out.
    """
    direct: dict[str, int] = {}
    for current, dirs, files in os.walk(root, followlinks=True):
        rel = os.path.relpath(current, root)
        level = 0 if rel == "." else rel.count(os.sep) + 1
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if level < depth + 2 else []
        if level:
            direct[rel.replace(os.sep, "/")] = sum(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files)
    totals = {
        name: sum(n for other, n in direct.items() if other == name or other.startswith(name + "/")) for name in direct
    }
    names = sorted(name for name in direct if name.count("/") < depth)[:limit]
    return [{"name": name, "images": totals[name]} for name in names]


def register_routes(routes) -> None:
    """Add the pack's routes to an aiohttp ``RouteTableDef`` (``PromptServer.instance.routes``)."""
    from aiohttp import web

    @routes.get(INFO_PATH)
    async def get_lora_info(request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        if not name:
            return web.json_response({"error": "query parameter 'name' is required"}, status=400)
        # Reading a large file takes a moment: keep the server's event loop free meanwhile.
        info = await asyncio.get_running_loop().run_in_executor(None, lora_info, name)
        return web.json_response(info)

    @routes.get(FOLDERS_PATH)
    async def get_input_folders(request: web.Request) -> web.Response:
        # The folder picker of Image Folder Dataset (js/folders.js): names relative to the input folder, no paths.
        root = folder_paths.get_input_directory()
        folders = await asyncio.get_running_loop().run_in_executor(None, input_folders, root)
        return web.json_response({"folders": folders})


_registered = False


def register_with_server() -> bool:
    """Register the routes on the running ComfyUI server, once; return whether they are registered.

    Headless runs (the executor imported as a library) have no server: nothing is done there. The
    ``server`` module is looked up in ``sys.modules`` rather than imported, so a headless process never
    imports the web server. ComfyUI 0.3.75 does not call ``ComfyExtension.on_load``; call this from
    ``get_node_list``, which runs before the server adds its route table to the app.
    """
    global _registered
    if _registered:
        return True
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    register_routes(instance.routes)
    _registered = True
    return True
