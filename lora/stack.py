"""``LORA_STACK`` normalisation: one shape, ``list[tuple[str, float, float]]``, from what other packs emit.

Accepted entries: ``(name, strength_model, strength_clip)`` tuples or lists (Comfyroll, Efficiency Nodes),
``(name, strength)`` pairs (clip strength = model strength), absolute paths (LoRA Manager), names using ``\\``
or ``/``, dicts from our own stack widget ``{"on": bool, "lora": str, "strength": float, "strength_clip":
float | None}`` and a ``{"__value__": [...]}`` wrapper as API-format JSON carries list widgets. Entries named
``"None"`` (and empty names) are skipped, as the packs that emit them expect.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

StackEntry = tuple[str, float, float]
LORA_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _strength(value: Any, what: str, entry: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"LORA_STACK entry {entry!r}: {what} must be a number, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"LORA_STACK entry {entry!r}: {what} must be a number, got {value!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"LORA_STACK entry {entry!r}: {what} must be finite, got {value!r}")
    return f


def _skip(name: str) -> bool:
    return name.strip() in ("", "None")


def normalize_entry(item: Any) -> StackEntry | None:
    """Return one stack entry as ``(name, strength_model, strength_clip)``, or None when it is to be skipped.

    Returns:
        The tuple; None for ``"None"``/empty names and widget rows that are switched off.

    Raises:
        ValueError: for an entry of another shape or a non-numeric strength, quoting the entry.
    """
    if isinstance(item, Mapping):
        if not item.get("on", True):
            return None
        name = item.get("lora", item.get("name"))
        if name is None:
            raise ValueError(f"LORA_STACK row {dict(item)!r} has no 'lora' name")
        if not isinstance(name, str):
            raise ValueError(f"LORA_STACK row {dict(item)!r}: 'lora' must be a string")
        if _skip(name):
            return None
        sm = _strength(item.get("strength", item.get("strength_model", 1.0)), "strength", item)
        sc_raw = item.get("strength_clip")
        sc = sm if sc_raw is None else _strength(sc_raw, "strength_clip", item)
        return (name.strip(), sm, sc)
    if isinstance(item, (tuple, list)):
        if not item or not isinstance(item[0], (str, os.PathLike)):
            raise ValueError(f"LORA_STACK entry {item!r} must start with a LoRA name string")
        name = os.fspath(item[0])
        if _skip(name):
            return None
        if len(item) == 1:
            return (name.strip(), 1.0, 1.0)
        if len(item) > 3:
            raise ValueError(f"LORA_STACK entry {item!r} has {len(item)} elements; expected (name, model, clip)")
        sm = _strength(item[1], "model strength", item)
        sc = sm if len(item) < 3 or item[2] is None else _strength(item[2], "clip strength", item)
        return (name.strip(), sm, sc)
    if isinstance(item, str):
        return None if _skip(item) else (item.strip(), 1.0, 1.0)
    raise ValueError(f"LORA_STACK entry {item!r} ({type(item).__name__}) is not a (name, model, clip) tuple")


def normalize_stack(items: Iterable[Any] | Mapping[str, Any] | None) -> list[StackEntry]:
    """Return a stack as ``list[tuple[str, float, float]]`` from any accepted producer's shape.

    Args:
        items: a list of entries (see the module docstring), a ``{"__value__": [...]}`` wrapper, or None.

    Returns:
        The normalised entries in order, skipped ones removed.

    Raises:
        ValueError: naming the first bad entry and its position.
    """
    if items is None:
        return []
    if isinstance(items, Mapping):
        if "__value__" not in items:
            raise ValueError(f"LORA_STACK must be a list of entries, got a dict with keys {sorted(items)}")
        items = items["__value__"]
    if isinstance(items, (str, bytes)):
        raise ValueError(f"LORA_STACK must be a list of entries, got a string {items!r}")
    out: list[StackEntry] = []
    for i, item in enumerate(items):
        try:
            entry = normalize_entry(item)
        except ValueError as exc:
            raise ValueError(f"LORA_STACK entry {i}: {exc}") from None
        if entry is not None:
            out.append(entry)
    return out


def _norm(name: str) -> str:
    return name.replace("\\", "/").strip().strip("/")


def _stem(name: str) -> str:
    low = name.lower()
    for ext in LORA_EXTENSIONS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def resolve_lora_name(name: str, available: list[str]) -> str:
    """Return the entry of ``available`` (e.g. ``folder_paths.get_filename_list("loras")``) that ``name`` means.

    Tried in order: exact; same path with either separator; without the extension; the unique entry whose
    basename matches (this is how absolute paths from LoRA Manager resolve); a unique path-suffix match.

    Returns:
        The matching entry of ``available``.

    Raises:
        LookupError: when nothing matches, or several do, listing the closest names (difflib).
    """
    if name in available:
        return name
    target = _norm(name)
    by_norm = {_norm(a): a for a in available}
    if target in by_norm:
        return by_norm[target]
    stems: dict[str, list[str]] = {}
    for a in available:
        stems.setdefault(_stem(_norm(a)).lower(), []).append(a)
    hit = stems.get(_stem(target).lower())
    if hit and len(hit) == 1:
        return hit[0]
    base = _stem(target.rsplit("/", 1)[-1]).lower()
    by_base = [a for a in available if _stem(_norm(a).rsplit("/", 1)[-1]).lower() == base]
    if len(by_base) == 1:
        return by_base[0]
    if len(by_base) > 1:
        # An absolute path or partial folder path: prefer the candidate whose path is a suffix of the name.
        # Compare whole path components, and take the longest such suffix (".../loras/v2/detail" -> v2/detail).
        full = "/" + _stem(target).lower()
        suffix = [a for a in by_base if full.endswith("/" + _stem(_norm(a)).lower())]
        longest = max((len(_norm(a)) for a in suffix), default=0)
        best = [a for a in suffix if len(_norm(a)) == longest]
        if len(best) == 1:
            return best[0]
        raise LookupError(f"LoRA '{name}' is ambiguous: it matches {sorted(by_base)}; give the folder too")
    close = difflib.get_close_matches(
        _stem(target.rsplit("/", 1)[-1]), [_stem(_norm(a).rsplit("/", 1)[-1]) for a in available], n=5, cutoff=0.4
    )
    suggestions = [a for c in close for a in available if _stem(_norm(a).rsplit("/", 1)[-1]) == c]
    hint = f"; closest: {suggestions[:5]}" if suggestions else ""
    raise LookupError(f"LoRA '{name}' not found among {len(available)} available LoRAs{hint}")
