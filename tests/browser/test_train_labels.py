"""The Train node's inputs and outputs: each has a tooltip, and its widgets show short labels that Nodes 2.0
does not cut ("train_text_e..." was what it showed for train_text_encoder)."""

from __future__ import annotations

import json
import urllib.request

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NODE = "LoraWorkbenchTrain"


def node_def(server) -> dict:
    with urllib.request.urlopen(f"{server}/object_info/{NODE}", timeout=30) as r:  # noqa: S310 (loopback)
        return json.loads(r.read())[NODE]


def test_every_train_input_and_output_has_a_tooltip(server):
    spec = node_def(server)
    inputs = {**spec["input"]["required"], **spec["input"].get("optional", {})}
    missing = [name for name, s in inputs.items() if not (s[1] if len(s) > 1 else {}).get("tooltip")]
    assert missing == [], f"inputs without a tooltip: {missing}"
    tips = spec.get("output_tooltips") or []
    assert len(tips) == len(spec["output"]) and all(tips), f"outputs without a tooltip: {spec['output_name']} {tips}"


# The widgets' labels as the page shows them: the widget's label (both renderings) and, in Nodes 2.0,
# the label elements' text and whether each is cut (wider than its box): frontend 1.32 draws a label as
# <p class="truncate">, 1.49 as [data-testid=widget-layout-field-label].
LABELS = """(id) => {
  const node = app.graph.getNodeById(id);
  const widgets = node.widgets.filter(w => w.name && w.type !== 'lora_workbench_progress')
    .map(w => ({name: w.name, label: w.label ?? w.name}));
  const root = document.querySelector(`[data-node-id="${id}"]`);
  const dom = root ? [...root.querySelectorAll('p.truncate, [data-testid=widget-layout-field-label]')]
    .map(p => ({text: p.textContent.trim(), cut: p.scrollWidth > p.clientWidth + 1})) : null;
  return {widgets, dom};
}"""


def test_train_labels_are_short_and_not_cut(ui, renderer, server):
    spec = node_def(server)
    inputs = {**spec["input"]["required"], **spec["input"].get("optional", {})}
    wanted = {name: (s[1] if len(s) > 1 else {}).get("display_name", name) for name, s in inputs.items()}
    node = ui.js(
        "(t) => { const n = LiteGraph.createNode(t); n.pos = [100, 100]; app.graph.add(n);"
        " app.canvas.setDirty(true, true); return n.id; }",
        NODE,
    )
    ui.page.wait_for_timeout(500)
    seen = ui.js(LABELS, node)
    labels = {w["name"]: w["label"] for w in seen["widgets"] if w["name"] in wanted}
    assert labels == {name: wanted[name] for name in labels}, "widget labels are not the display names"
    assert {"learning_rate", "train_text_encoder", "num_class_images", "te_learning_rate"} <= labels.keys()
    assert all(len(label) <= 11 for label in labels.values()), labels
    if renderer == "vue":
        shown = {d["text"]: d["cut"] for d in seen["dom"]}
        missing = [label for label in labels.values() if label not in shown]
        assert missing == [], f"labels not found as text in the node: {missing}; page shows {list(shown)}"
        cut = [label for label in labels.values() if shown[label]]
        assert cut == [], f"labels cut in Nodes 2.0: {cut}"
    ui.screenshot(f"train-labels-{renderer}")
    assert ui.our_errors() == []
