"""LoRA Stack and Prompt LoRA Tags: nodes that build ``LORA_STACK`` lists of file names."""

from __future__ import annotations

import json

from comfy_api.latest import io

from ..lora import prompt_tags, safeio
from ..lora.stack import normalize_stack, resolve_lora_name
from .files import lora_names, resolve_lora_path
from .types import CATEGORY_INFERENCE, LoraStack

ROWS_HELP = (
    'JSON list of rows {"on": true, "lora": "file.safetensors", "strength": 1.0, "strength_clip": 1.0}; '
    "the stack editor in the node writes it for you."
)


def parse_rows(rows: str) -> list:
    """Return the rows of a LoRA Stack widget value (a JSON list; empty text means no rows).

    Raises:
        ValueError: the text is not a JSON list.
    """
    if isinstance(rows, list):
        return rows
    text = (rows or "").strip()
    if not text:
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"LoRA Stack rows are not valid JSON ({e.msg} at char {e.pos}): {text[:80]!r}") from None
    if not isinstance(value, list):
        raise ValueError(f"LoRA Stack rows must be a JSON list, got {type(value).__name__}")
    return value


def _missing_files(stack: list[tuple[str, float, float]]) -> list[str]:
    # The same resolution as execution (files.resolve_lora_path), so what passes here is what runs.
    problems = []
    for name, _, _ in stack:
        try:
            resolve_lora_path(name)
        except LookupError as e:
            problems.append(str(e))
    return problems


class LoraStackNode(io.ComfyNode):
    """Rows of LoRA files with strengths and on/off, chained after an optional incoming stack."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraWorkbenchStack",
            display_name="LoRA Stack (LoRA Workbench)",
            category=CATEGORY_INFERENCE,
            description="A list of LoRA files, each with model and CLIP strength and an on/off switch. "
            "Emits the LORA_STACK list other packs (Comfyroll, Efficiency, LoRA Manager) use too.",
            inputs=[
                io.String.Input("rows", multiline=True, default="[]", tooltip=ROWS_HELP),
                LoraStack.Input("lora_stack", optional=True, tooltip="A stack to put before these rows."),
            ],
            outputs=[
                LoraStack.Output(
                    display_name="LORA_STACK",
                    tooltip="The incoming stack, then the rows that are on, as (file, model strength, CLIP "
                    "strength): to Apply LoRA Stack, LoRA Merge or another pack's stack node.",
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, rows, lora_stack=None) -> bool | str:
        # Runs when the prompt is queued, so a missing file is reported before anything executes.
        try:
            problems = _missing_files(normalize_stack(parse_rows(rows)))
        except ValueError as e:
            return f"LoRA Stack: {e}"
        return True if not problems else "LoRA Stack: " + "; ".join(problems)

    @classmethod
    def fingerprint_inputs(cls, rows, lora_stack=None):
        # A file rewritten under the same name must re-run what uses it: key on (path, size, mtime).
        keys = []
        for name, _, _ in normalize_stack(parse_rows(rows)):
            try:
                keys.append(safeio.cache_key(resolve_lora_path(name)))
            except (LookupError, FileNotFoundError):
                keys.append(name)
        return tuple(keys)

    @classmethod
    def execute(cls, rows, lora_stack=None) -> io.NodeOutput:
        stack = normalize_stack(list(lora_stack or [])) + normalize_stack(parse_rows(rows))
        return io.NodeOutput(stack)


class PromptLoraTagsNode(io.ComfyNode):
    """A1111-style ``<lora:name:0.8>`` tags in prompt text -> a stack and the prompt without them."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraWorkbenchPromptTags",
            display_name="Prompt LoRA Tags (LoRA Workbench)",
            category=CATEGORY_INFERENCE,
            description="Reads <lora:name:strength> and <lora:name:model_strength:clip_strength> tags, "
            "returns them as a LORA_STACK and the prompt with the tags removed.",
            inputs=[
                io.String.Input(
                    "text",
                    multiline=True,
                    default="",
                    tooltip="Prompt text with tags like <lora:my_style:0.8> or <lora:my_style:0.8:0.6> (model, CLIP).",
                ),
                LoraStack.Input("lora_stack", optional=True, tooltip="A stack to put before the tags' LoRAs."),
            ],
            outputs=[
                LoraStack.Output(display_name="LORA_STACK", tooltip="The incoming stack, then the tags' LoRAs."),
                io.String.Output(display_name="text", tooltip="The prompt with the tags removed."),
            ],
        )

    @classmethod
    def execute(cls, text, lora_stack=None) -> io.NodeOutput:
        tags, cleaned = prompt_tags.parse_prompt_tags(text)
        available = lora_names()
        stack = normalize_stack(list(lora_stack or []))
        for tag in tags:
            try:
                name = resolve_lora_name(tag.name, available)
            except LookupError as e:
                raise LookupError(f"Prompt LoRA Tags: <lora:{tag.name}:...>: {e}") from None
            stack.append((name, tag.strength_model, tag.strength_clip))
        return io.NodeOutput(stack, cleaned)
