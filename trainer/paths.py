"""Folder names a workflow may give (dataset, class images, run names), kept inside the folders allowed.

A workflow is shared and may be queued on a server started with ``--listen``: a folder it names must not
reach the rest of the disk. Names are checked lexically (``..`` collapsed, absolute paths compared with
the allowed roots); links placed inside an allowed folder by whoever runs the server are followed, as
ComfyUI does for its own model folders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# A run name part: letters, digits, '_', '-', '.', not starting with '.' (so never '.' or '..').
RUN_NAME_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
EXTRA_ROOTS_VARIABLE = "LORA_WORKBENCH_DATA_ROOTS"


class PathNotAllowedError(ValueError):
    """A folder named by a workflow lies outside the folders it may use; the message says which are allowed."""


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


def extra_roots() -> list[str]:
    """Return the folders the server's owner allowed besides ComfyUI's, from ``$LORA_WORKBENCH_DATA_ROOTS``.

    The variable holds absolute folders separated by ``os.pathsep`` (':' on Linux); relative entries are ignored.
    """
    value = os.environ.get(EXTRA_ROOTS_VARIABLE, "")
    return [os.path.normpath(p) for p in value.split(os.pathsep) if p.strip() and os.path.isabs(p.strip())]


def resolve_data_folder(name: str, roots: dict[str, str], what: str) -> str:
    """Return the absolute folder for a user-given ``name``, which must lie inside one of ``roots``.

    A relative name is taken inside the first root (ComfyUI's input folder); an absolute one must lie inside any
    root or a folder of ``extra_roots()``.

    Args:
        name: as typed in the workflow.
        roots: ``{label: absolute folder}``, e.g. ``{"input": ..., "output": ...}``; labels appear in errors.
        what: what the folder is for, e.g. "dataset folder" (appears in errors).

    Raises:
        PathNotAllowedError: the name leaves the allowed folders (the message names the value and the allowed
            folders by label, never by their absolute server paths).
    """
    name = name.strip()
    if not name:
        raise PathNotAllowedError(f"{what} is empty: give a folder inside ComfyUI's {next(iter(roots))} folder")
    first = next(iter(roots.values()))
    candidate = os.path.normpath(name if os.path.isabs(name) else os.path.join(first, name))
    allowed = [os.path.normpath(r) for r in roots.values()] + extra_roots()
    if any(_inside(candidate, root) for root in allowed):
        return candidate
    labels = "ComfyUI's " + " and ".join(roots) + (" folders" if len(roots) > 1 else " folder")
    raise PathNotAllowedError(
        f"{what} '{name}' is outside {labels}; put the images there (a relative name is read inside the "
        f"{next(iter(roots))} folder), or let this server read another folder by adding it to "
        f"${EXTRA_ROOTS_VARIABLE}"
    )


def display_name(name: str, roots: dict[str, str]) -> str:
    """Return how reports and saved metadata name a user-given folder: as typed when relative, else relative to
    the root it lies in (``output/datasets/dog``), else only its last part, so no absolute server path is shown."""
    name = name.strip()
    if not os.path.isabs(name):
        return name
    path = os.path.normpath(name)
    for label, root in roots.items():
        root = os.path.normpath(root)
        if _inside(path, root):
            return f"{label}/{os.path.relpath(path, root)}".rstrip("/.")
    return os.path.basename(path)


def run_folder(root: str | Path, run_name: str) -> Path:
    """Return ``root/<run_name>`` for a run name of one or more '/'-separated parts.

    Raises:
        ValueError: a part is empty, starts with '.', or holds characters other than letters, digits, ``_ . -``.
    """
    parts = run_name.strip().split("/")
    bad = [p for p in parts if not RUN_NAME_PART.match(p)]
    if bad:
        raise ValueError(
            f"run_name '{run_name}': each part must use letters, digits, '_', '.' and '-' and not start with '.' "
            f"(not {bad[0]!r})"
        )
    return Path(root).joinpath(*parts)
