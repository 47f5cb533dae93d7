"""LoRA files as ComfyUI sees them: names in ``models/loras`` resolved to paths and read safely."""

from __future__ import annotations

import os

import folder_paths

from ..lora import safeio
from ..lora.stack import resolve_lora_name


def lora_names() -> list[str]:
    """Return the LoRA file names ComfyUI lists in its ``loras`` folders."""
    return folder_paths.get_filename_list("loras")


def resolve_lora_path(name: str) -> str:
    """Return the absolute path of a LoRA given by name (any separator, extension optional) or path.

    Raises:
        LookupError: if no file matches; the message lists the closest names.
    """
    if os.path.isabs(name) and os.path.isfile(name):
        return name
    available = lora_names()
    resolved = resolve_lora_name(name, available)
    path = folder_paths.get_full_path("loras", resolved)
    if path is None:
        raise LookupError(f"LoRA '{name}' not found in folder 'loras'")
    return path


def read_lora(name: str, allow_pickle: bool = False) -> tuple[str, dict, dict]:
    """Return ``(path, tensors, metadata)`` for a LoRA name, read through the safe, cached reader.

    Raises:
        LookupError: the file does not exist.
        ValueError: the file is unsafe (pickle) or damaged; the message names it.
    """
    path = resolve_lora_path(name)
    tensors, metadata = safeio.read_safetensors(path, allow_pickle=allow_pickle)
    return path, tensors, metadata
