"""LoRA files as ComfyUI sees them: names in ``models/loras`` resolved to paths and read safely."""

from __future__ import annotations

import os

import folder_paths

from ..lora import safeio
from ..lora.stack import resolve_lora_name


def lora_names() -> list[str]:
    """Return the LoRA file names ComfyUI lists in its ``loras`` folders."""
    return folder_paths.get_filename_list("loras")


def lora_roots() -> list[str]:
    """Return ComfyUI's ``loras`` folders, resolved (symlinks followed)."""
    return [os.path.realpath(p) for p in folder_paths.get_folder_paths("loras")]


def _inside_loras(path: str) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([root, real]) == root for root in lora_roots())


def resolve_lora_path(name: str) -> str:
    """Return the absolute path of a LoRA given by name (any separator, extension optional) or path.

    An absolute path (LoRA Manager's stacks carry them) is used only when it lies inside one of ComfyUI's
    ``loras`` folders; otherwise it is looked up by name like any other entry, so a workflow or a request can
    never make the server read a file elsewhere. Queue-time validation and execution both call this function,
    so they resolve a name to the same file.

    Raises:
        LookupError: if no file matches; the message lists the closest names.
    """
    if os.path.isabs(name) and os.path.isfile(name) and _inside_loras(name):
        return os.path.realpath(name)
    available = lora_names()
    resolved = resolve_lora_name(name, available)
    path = folder_paths.get_full_path("loras", resolved)
    if path is None or not _inside_loras(path):
        raise LookupError(f"LoRA '{name}' not found in folder 'loras'")
    return path


def display_name(name: str) -> str:
    """Return the name to show in messages: never an absolute server path (the file name if given one)."""
    return os.path.basename(name) if os.path.isabs(name) else name


def read_lora(name: str, allow_pickle: bool = False) -> tuple[str, dict, dict]:
    """Return ``(path, tensors, metadata)`` for a LoRA name, read through the safe, cached reader.

    Raises:
        LookupError: the file does not exist.
        ValueError: the file is unsafe (pickle) or damaged; the message names it (not its server path).
    """
    path = resolve_lora_path(name)
    tensors, metadata = safeio.read_safetensors(path, allow_pickle=allow_pickle, display=display_name(name))
    return path, tensors, metadata
