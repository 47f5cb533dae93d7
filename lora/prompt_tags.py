"""A1111-style LoRA tags in prompt text: ``<lora:name>``, ``<lora:name:0.8>``, ``<lora:name:0.8:0.6>``.

Positional numbers follow the ComfyUI packs' convention (Impact Pack, LoRA Manager): the first is the model
strength, the second the CLIP strength (default: the model strength). A1111 itself reads the two the other way
round (text encoder first, then UNet); the named forms ``te=`` and ``unet=`` (also ``clip=``/``model=``) are
unambiguous and accepted in any order.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

_OPEN = re.compile(r"<lora:", re.IGNORECASE)


class PromptTag(NamedTuple):
    """One parsed tag: the LoRA name and its model and CLIP strengths."""

    name: str
    strength_model: float
    strength_clip: float


def _num(text: str, tag: str, pos: int) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"LoRA tag '{tag}' at position {pos}: strength '{text}' is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"LoRA tag '{tag}' at position {pos}: strength '{text}' is not finite")
    return v


def _parse_one(tag: str, body: str, pos: int) -> PromptTag:
    parts = [p.strip() for p in body.split(":")]
    name = parts[0]
    if not name:
        raise ValueError(f"LoRA tag '{tag}' at position {pos} has no LoRA name")
    args = parts[1:]
    positional: list[float] = []
    named: dict[str, float] = {}
    for a in args:
        if "=" in a:
            k, _, v = a.partition("=")
            k = k.strip().lower()
            if k not in ("te", "unet", "clip", "model"):
                raise ValueError(f"LoRA tag '{tag}' at position {pos}: unknown argument '{k}' (te, unet)")
            named["clip" if k in ("te", "clip") else "model"] = _num(v.strip(), tag, pos)
        else:
            if named:
                raise ValueError(f"LoRA tag '{tag}' at position {pos}: a number follows a named argument")
            positional.append(_num(a, tag, pos))
    if len(positional) > 2:
        raise ValueError(f"LoRA tag '{tag}' at position {pos} has {len(positional)} strengths; at most 2")
    model = named.get("model", positional[0] if positional else 1.0)
    clip = named.get("clip", positional[1] if len(positional) > 1 else model)
    return PromptTag(name, model, clip)


def _tidy(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = re.sub(r"[ \t]+", " ", line)
        line = re.sub(r"\s+,", ",", line)
        line = re.sub(r",(\s*,)+", ",", line)
        line = re.sub(r"\(\s*\)", "", line)
        lines.append(line.strip().strip(",").strip())
    return "\n".join(lines).strip()


def parse_prompt_tags(text: str) -> tuple[list[PromptTag], str]:
    """Return the LoRA tags of a prompt and the prompt with them removed.

    Whitespace left by a removed tag is tidied: runs of spaces collapse, spaces before commas and doubled
    commas go, each line is stripped of leading/trailing spaces and commas.

    Returns:
        ``(tags in order of appearance, cleaned text)``.

    Raises:
        ValueError: for a tag without a name (``<lora:>``), a strength that is not a number (``<lora:x:abc>``),
            too many strengths, or an unclosed tag (``<lora:x:0.5``), quoting the tag and its position.
    """
    tags: list[PromptTag] = []
    pieces: list[str] = []
    i = 0
    for m in _OPEN.finditer(text):
        start = m.start()
        if start < i:
            continue
        end = text.find(">", m.end())
        nxt = text.find("<", m.end())
        if end == -1 or (nxt != -1 and nxt < end):
            stop = nxt if nxt != -1 else len(text)
            raise ValueError(f"unclosed LoRA tag '{text[start:stop].rstrip()}' at position {start}: missing '>'")
        tag = text[start : end + 1]
        tags.append(_parse_one(tag, text[m.end() : end], start))
        pieces.append(text[i:start])
        i = end + 1
    pieces.append(text[i:])
    return tags, _tidy(" ".join(p for p in pieces)) if tags else text
