"""The Train node's inputs and outputs: each has a tooltip; the node shows its essential settings first (the
rest behind "Show advanced"); its widgets, Apply LoRA Stack's and Image Folder Dataset's show readable labels
that Nodes 2.0 does not cut ("train_text_e..." and "adapter_stre..." were what it showed)."""

from __future__ import annotations

import json
import urllib.request

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NODE = "LoraWorkbenchTrain"


def node_def(server) -> dict:
    return node_spec(server, NODE)


# Input types the page draws as widgets (a list is a combo's options); the others are sockets, with no label here.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


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


# What the Train node shows before "Show advanced": the settings a first run needs (the rest are advanced inputs).
ESSENTIAL = {
    "steps",
    "rank",
    "learning_rate",
    "batch_size",
    "train_text_encoder",
    "prior_preservation",
    "seed",
    "control_after_generate",
    "run_name",
    "resume",
}
SHOWN = """(id) => { const n = app.graph.getNodeById(id);
  return n.widgets.filter(w => w.name && w.type !== 'lora_workbench_progress' && n.isWidgetVisible(w))
    .map(w => w.name); }"""


def node_spec(server, node_type) -> dict:
    with urllib.request.urlopen(f"{server}/object_info/{node_type}", timeout=30) as r:  # noqa: S310 (loopback)
        return json.loads(r.read())[node_type]


def show_advanced(ui, node) -> None:
    """The node menu's "Show Advanced" (both frontends' litegraph; js/labels.js fits the node on 1.32)."""
    ui.js("(id) => { const n = app.graph.getNodeById(id); if (!n.showAdvanced) n.toggleAdvanced(); }", node)
    ui.page.wait_for_timeout(500)


@pytest.mark.parametrize("node_type", [NODE, "LoraWorkbenchApplyStack", "LoraWorkbenchImageFolder"])
def test_labels_are_the_display_names_and_not_cut(ui, renderer, server, node_type):
    """Every widget is labelled with its input's display name, and Nodes 2.0 shows that text whole."""
    spec = node_spec(server, node_type)
    inputs = {**spec["input"]["required"], **spec["input"].get("optional", {})}
    wanted = {name: (s[1] if len(s) > 1 else {}).get("display_name", name) for name, s in inputs.items()}
    node = ui.js(
        "(t) => { const n = LiteGraph.createNode(t); n.pos = [100, 130]; app.graph.add(n);"
        " app.canvas.setDirty(true, true); return n.id; }",
        node_type,
    )
    ui.page.wait_for_timeout(500)
    short = node_type.removeprefix("LoraWorkbench").lower()
    if node_type == NODE:
        # Compact first: the classic canvas of both frontends hides the advanced inputs (1.32 through
        # js/labels.js); Nodes 2.0 does where the frontend supports it (1.49; 1.32's shows every widget).
        shown = set(ui.js(SHOWN, node))
        assert shown == ESSENTIAL, f"shown before Show advanced: {sorted(shown)}"
        hides = "(id) => typeof app.graph.getNodeById(id).hasAdvancedWidgets === 'function'"
        if renderer == "vue" and ui.js(hides, node):
            texts = {d["text"] for d in ui.js(LABELS, node)["dom"] if "control" not in d["text"]}
            assert texts == {wanted[n] for n in ESSENTIAL if n in wanted}, sorted(texts)
        ui.screenshot(f"labels-{short}-{renderer}-compact")
        show_advanced(ui, node)
    seen = ui.js(LABELS, node)
    labels = {w["name"]: w["label"] for w in seen["widgets"] if w["name"] in wanted}
    widget_inputs = {n for n, s in inputs.items() if isinstance(s[0], list) or s[0] in WIDGET_TYPES}
    assert labels.keys() == widget_inputs, f"{sorted(labels)} != {sorted(widget_inputs)}"
    assert labels == {name: wanted[name] for name in labels}, "widget labels are not the display names"
    assert not any("_" in label for label in labels.values()), labels
    if renderer == "vue":
        shown = {d["text"]: d["cut"] for d in seen["dom"]}
        missing = [label for label in labels.values() if label not in shown]
        assert missing == [], f"labels not found as text in the node: {missing}; page shows {list(shown)}"
        cut = [label for label in labels.values() if shown[label]]
        assert cut == [], f"labels cut in Nodes 2.0: {cut}"
    ui.screenshot(f"labels-{short}-{renderer}")
    assert ui.our_errors() == []
