"""Typed inputs of the training nodes in the page, in both renderings: the Train node's learning rate reaches the
queued prompt and the trainer as typed (a number widget showed 1e-4 as "0" in Nodes 2.0), and Image Folder
Dataset's folder picker lists the input folder's sub-folders and sets the folder widget."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_then_stack.json"
RUN = "[data-testid=queue-button]"
QUEUE_BUSY = (
    "async () => { const q = await (await fetch('/queue')).json();"
    " return q.queue_running.length + q.queue_pending.length > 0; }"
)

ADD = """(t) => { const n = LiteGraph.createNode(t); n.pos = [100, 100]; app.graph.add(n);
  app.canvas.setDirty(true, true); return n.id; }"""
# The middle of a widget's row on the page, for the classic canvas (which draws widgets, with no elements).
WIDGET_SPOT = """([id, name]) => {
  const n = app.graph.getNodeById(id), w = n.widgets.find(w => w.name === name);
  const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
  const x = n.pos[0] + n.size[0] / 2, y = n.pos[1] + (w.last_y ?? w.y) + LiteGraph.NODE_WIDGET_HEIGHT / 2;
  return {x: r.left + (x + ds.offset[0]) * ds.scale, y: r.top + (y + ds.offset[1]) * ds.scale};
}"""
WIDGET_VALUE = "([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).value"
# examples/train_then_stack.json cut down to checkpoint (1), dataset (2), Train (3) and its loss curve's
# SaveImage (12), set for a one-step run.
PRUNE = """(runName) => {
  for (const n of [...app.graph.nodes]) if (!['1', '2', '3', '12'].includes(String(n.id))) app.graph.remove(n);
  const train = app.graph.getNodeById(3);
  const set = (name, value) => {
    const w = train.widgets.find(w => w.name === name); w.value = value; w.callback?.(value);
  };
  set('steps', 1); set('batch_size', 1); set('checkpoint_every', 0); set('run_name', runName); set('resume', false);
  set('learning_rate', '5e-5');
  app.canvas.ds.scale = 1; app.canvas.ds.offset = [140 - train.pos[0], 120 - train.pos[1]];
  app.canvas.setDirty(true, true);
}"""


def type_into_widget(ui, renderer: str, node_id, name: str, text: str) -> None:
    """Type into a text widget as a user does: its input element in Nodes 2.0, the canvas's prompt dialog else."""
    page = ui.page
    if renderer == "vue":
        field = page.locator(f'[data-node-id="{node_id}"] input[aria-label="{name}"]')
        field.click()
        field.fill(text)
        field.press("Enter")
        field.blur()
    else:
        spot = ui.js(WIDGET_SPOT, [node_id, name])
        page.mouse.click(spot["x"], spot["y"])
        dialog = page.locator(".graphdialog input").first
        dialog.wait_for()
        dialog.fill(text)
        dialog.press("Enter")
    page.wait_for_timeout(200)


def test_learning_rate_typed_in_the_page_reaches_the_prompt_and_the_trainer(ui, renderer, comfy_base):
    workflow = json.loads(EXAMPLE.read_text())
    workflow["id"] = f"b3d5c0de-0000-4000-8000-0000000000{21 if renderer == 'vue' else 22}"
    ui.js("async (g) => { await app.loadGraphData(g); }", workflow)
    run_name = f"browser_lr_{renderer}"
    ui.js(PRUNE, run_name)
    ui.page.wait_for_timeout(300)
    type_into_widget(ui, renderer, 3, "learning_rate", "1e-4")
    assert ui.js(WIDGET_VALUE, [3, "learning_rate"]) == "1e-4"
    if renderer == "vue":
        shown = ui.page.locator('[data-node-id="3"] input[aria-label="learning_rate"]').input_value()
        assert shown == "1e-4", f"Nodes 2.0 shows the learning rate as {shown!r}"
    ui.screenshot(f"train-learning-rate-{renderer}")
    ui.page.locator(RUN).first.click()
    # One step of the tiny model; the data set and model loading make most of the wait (minutes on a busy machine).
    ui.page.wait_for_timeout(1000)
    deadline = time.monotonic() + 300
    while ui.js(QUEUE_BUSY):
        assert time.monotonic() < deadline, "the one-step run did not end within 300 s"
        ui.page.wait_for_timeout(500)
    entry = ui.last_prompt()
    assert entry["status"]["status_str"] == "success", entry["status"]
    inputs = entry["prompt"][2]["3"]["inputs"]
    assert inputs["learning_rate"] == "1e-4", inputs
    record = comfy_base / "output" / "lora_workbench" / "checkpoints" / run_name / "checkpoint.json"
    config = json.loads(record.read_text())["config"]
    assert config["learning_rate"] == 1e-4 and config["te_learning_rate"] == 0.0, config
    assert ui.our_errors() == []


@pytest.fixture
def input_folders(comfy_base) -> list[str]:
    """Sub-folders of the server's input folder made here (one with images, a kohya-style one inside it, an empty
    one, a hidden one), and the names the picker must list among ComfyUI's own (e.g. "3d")."""
    root = comfy_base / "input"
    for folder, images in (("lw_pick_me", 2), ("lw_pick_me/10_sks toy", 1), (".lw_hidden", 1), ("lw_empty", 0)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(images):
            (root / folder / f"img_{i}.png").write_bytes(b"not read by the listing")
    return ["lora_workbench_example", "lw_empty", "lw_pick_me", "lw_pick_me/10_sks toy"]


def test_folder_picker_lists_the_input_folders_and_sets_the_widget(ui, renderer, input_folders):
    page = ui.page
    node = ui.js(ADD, "LoraWorkbenchImageFolder")
    page.wait_for_timeout(500)
    if renderer == "vue":
        page.locator(f'[data-node-id="{node}"] button[aria-label="choose folder"]').click()
    else:
        spot = ui.js(WIDGET_SPOT, [node, "choose folder"])
        page.mouse.click(spot["x"], spot["y"])
    menu = page.locator("[data-testid=lw-folders]")
    menu.wait_for()
    listed = menu.locator("button[data-folder]")
    names = [listed.nth(i).get_attribute("data-folder") for i in range(listed.count())]
    assert [n for n in names if n.startswith(("lw_", "lora_workbench"))] == input_folders, names
    assert not any(part.startswith(".") for n in names for part in n.split("/")), names
    counts = {n: menu.locator(f'button[data-folder="{n}"] .lw-count').inner_text() for n in ("lw_pick_me", "lw_empty")}
    assert counts == {"lw_pick_me": "3 images", "lw_empty": "0 images"}, counts
    ui.screenshot(f"folder-picker-{renderer}-open")
    menu.locator('button[data-folder="lw_pick_me/10_sks toy"]').click()
    menu.wait_for(state="detached")
    assert ui.js(WIDGET_VALUE, [node, "folder"]) == "lw_pick_me/10_sks toy"
    if renderer == "vue":
        shown = page.locator(f'[data-node-id="{node}"] input[aria-label="folder"]').input_value()
        assert shown == "lw_pick_me/10_sks toy", f"the folder field shows {shown!r}"
    # Free text still works: the widget takes a typed name too.
    type_into_widget(ui, renderer, node, "folder", "lw_pick_me")
    assert ui.js(WIDGET_VALUE, [node, "folder"]) == "lw_pick_me"
    ui.screenshot(f"folder-picker-{renderer}-picked")
    assert ui.our_errors() == []
