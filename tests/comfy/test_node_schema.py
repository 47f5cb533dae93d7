"""Node ids, input names and output types are part of the saved-workflow format: a snapshot guards them.

A change here breaks workflows people saved. If it is intended, regenerate the snapshot with
``LORA_WORKBENCH_UPDATE_SNAPSHOT=1 pytest tests/comfy/test_node_schema.py`` and say so in the changelog.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SNAPSHOT = Path(__file__).with_name("node_schema.json")


def _schema(node_classes) -> dict:
    out = {}
    for node_id in sorted(k for k in node_classes if k.startswith("LoraWorkbench")):
        cls = node_classes[node_id]
        inputs = cls.INPUT_TYPES()
        out[node_id] = {
            # Lists, not dicts: the order of widgets is what a UI-saved workflow's widgets_values follow.
            "required": [
                [k, v[0] if isinstance(v[0], str) else "COMBO"] for k, v in inputs.get("required", {}).items()
            ],
            "optional": [
                [k, v[0] if isinstance(v[0], str) else "COMBO"] for k, v in inputs.get("optional", {}).items()
            ],
            "outputs": list(cls.RETURN_TYPES),
            "category": cls.CATEGORY,
        }
    return out


@pytest.mark.slow
def test_node_schemas_match_the_snapshot(comfy):
    current = _schema(comfy.node_classes)
    if os.environ.get("LORA_WORKBENCH_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=1) + "\n")
    expected = json.loads(SNAPSHOT.read_text())
    assert current == expected, "node inputs changed: saved workflows would break (see this file's docstring)"
    assert all(v["category"].startswith("LoRA Workbench/") for v in current.values())


@pytest.mark.slow
def test_every_node_has_a_description_and_every_input_and_output_a_tooltip(comfy):
    """What the node library and hovering show: nothing of the pack is left unexplained."""
    problems = []
    for node_id in sorted(k for k in comfy.node_classes if k.startswith("LoraWorkbench")):
        cls = comfy.node_classes[node_id]
        if len(cls.DESCRIPTION or "") < 40:
            problems.append(f"{node_id}: no description")
        inputs = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in (inputs.get(section) or {}).items():
                if not (spec[1] if len(spec) > 1 else {}).get("tooltip"):
                    problems.append(f"{node_id}.{name}: no tooltip")
        tips = list(cls.OUTPUT_TOOLTIPS or [])
        for i, name in enumerate(cls.RETURN_NAMES or cls.RETURN_TYPES):
            if i >= len(tips) or not tips[i]:
                problems.append(f"{node_id} output {name}: no tooltip")
    assert problems == [], "\n".join(problems)
