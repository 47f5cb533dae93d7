"""A real run with Training Previews connected: the validation curve and the preview images appear in the Train
node while it trains (classic canvas and Nodes 2.0). Screenshots in ``.cache/browser-artifacts/``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_then_stack.json"
STEPS, EVERY = 4, 2
RUN = "[data-testid=queue-button]"

# The example cut down to checkpoint (1), dataset (2), Train (3) and its loss curve's SaveImage (12), with a
# Training Previews node wired into Train's `previews` input and its widgets set as a user would.
BUILD = """([steps, every, runName]) => {
  const kept = new Set(['1', '2', '3', '12']);
  for (const n of [...app.graph.nodes]) if (!kept.has(String(n.id))) app.graph.remove(n);
  const train = app.graph.getNodeById(3);
  const set = (node, name, value) => {
    const w = node.widgets.find(w => w.name === name);
    if (!w) throw new Error(`${node.type} has no widget ${name}`);
    w.value = value; w.callback?.(value);
  };
  set(train, 'steps', steps); set(train, 'batch_size', 1); set(train, 'seed', 5);
  set(train, 'checkpoint_every', 0); set(train, 'run_name', runName); set(train, 'resume', false);
  const prev = LiteGraph.createNode('LoraWorkbenchTrainingPreviews');
  prev.pos = [train.pos[0] - 340, train.pos[1]];
  app.graph.add(prev);
  set(prev, 'every', every); set(prev, 'hold_out', 1); set(prev, 'sampler_steps', 2); set(prev, 'size', 64);
  const slot = train.inputs.findIndex(s => s.name === 'previews');
  if (slot < 0) throw new Error('Train has no previews input');
  prev.connect(0, train, slot);
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [420 - train.pos[0], 900 - train.pos[1] - train.size[1]];
  app.canvas.setDirty(true, true);
  return {train: train.id, linked: train.inputs[slot].link !== null};
}"""
# Scroll so that the progress view's foot is near the window's bottom.
IN_SIGHT = """async () => {
  for (let i = 0; i < 3; i++) {
    const r = document.querySelector('[data-testid=lw-train-progress]').getBoundingClientRect();
    const shift = r.bottom - (window.innerHeight - 20);
    if (Math.abs(shift) < 2) break;
    app.canvas.ds.offset[1] -= shift / app.canvas.ds.scale;
    app.canvas.setDirty(true, true);
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  }
}"""
# The view as the page shows it: status, step, validation points, the green validation line's pixels on the
# chart (80, 210, 120), the stats' "Val" and the preview images (loaded, their size, label and step).
SAMPLE = """async () => {
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const root = document.querySelector('[data-testid=lw-train-progress]');
  const c = root.querySelector('[data-testid=lw-loss-canvas]');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let green = 0;
  for (let i = 0; i < d.length; i += 4)
    if (d[i] < 130 && d[i+1] > 180 && d[i+2] > 80 && d[i+2] < 160 && d[i+3] > 200) green++;
  const imgs = [...root.querySelectorAll('[data-testid=lw-train-previews] img')];
  const box = (e) => { const r = e.getBoundingClientRect(); return {t: r.top, b: r.bottom, l: r.left, r: r.right}; };
  return {
    status: root.dataset.status, step: Number(root.dataset.step), validation: Number(root.dataset.validationPoints),
    green, wrapped: (() => { const l = root.querySelector('.lw-stat-line');
      return l ? l.scrollWidth > l.clientWidth + 1 : null; })(),
    control: app.graph.nodes.find(n => n.type === 'LoraWorkbenchTrainingPreviews')
      ?.widgets.find(w => w.name === 'control_after_generate')?.value ?? null,
    images: imgs.map(i => ({loaded: i.complete && i.naturalWidth > 0, w: i.naturalWidth, label: i.dataset.label,
                            step: Number(i.dataset.step), src: i.getAttribute('src'), box: box(i)})),
    root: box(root), chart: box(c),
  };
}"""
READY = """() => {
  const root = document.querySelector('[data-testid=lw-train-progress]');
  const imgs = [...(root?.querySelectorAll('[data-testid=lw-train-previews] img') ?? [])];
  return root && Number(root.dataset.validationPoints) >= 2 && imgs.length === 2
    && imgs.every(i => i.complete && i.naturalWidth > 0 && Number(i.dataset.step) >= 2);
}"""


@pytest.mark.parametrize("renderer", ["classic", "vue"])
def test_previews_and_validation_curve_appear_during_a_run(ui, node_types, renderer):
    assert "LoraWorkbenchTrainingPreviews" in node_types
    page = ui.page
    workflow = json.loads(EXAMPLE.read_text())
    workflow["id"] = "b3d5c0de-0000-4000-8000-000000000021"  # the example's id is not a valid UUID
    ui.js("async (g) => { await app.loadGraphData(g); }", workflow)
    built = ui.js(BUILD, [STEPS, EVERY, f"browser_previews_{renderer}"])
    assert built["linked"], built
    page.locator("[data-testid=lw-train-progress]").wait_for()

    page.locator(RUN).first.click()
    page.wait_for_function(READY, timeout=420_000, polling=100)
    ui.js(IN_SIGHT)
    during = ui.js(SAMPLE)
    ui.screenshot(f"train-previews-{renderer}-running")
    assert during["status"] == "running", f"the previews should show while it trains: {during}"
    assert during["green"] > 20 and not during["wrapped"], during
    assert during["control"] == "fixed", "the previews' seed stays fixed between queues"
    labels = [i["label"] for i in during["images"]]
    assert labels == ["with trigger", "without trigger"] and all(i["w"] == 64 for i in during["images"]), during
    assert all(
        "/view?filename=lora_workbench_preview_" in i["src"] and "type=temp" in i["src"] for i in during["images"]
    )
    for image in during["images"]:
        assert image["box"]["t"] >= during["chart"]["b"] - 0.5, f"previews sit under the chart: {during}"
        assert image["box"]["b"] <= during["root"]["b"] + 0.5, f"previews inside the view: {during}"

    page.wait_for_function(
        "() => document.querySelector('[data-testid=lw-train-progress]')?.dataset.status === 'done'",
        timeout=420_000,
        polling=100,
    )
    ui.js(IN_SIGHT)
    done = ui.js(SAMPLE)
    ui.screenshot(f"train-previews-{renderer}-done")
    assert done["validation"] == STEPS // EVERY + 1, f"evaluations at 0, 2, 4: {done}"
    assert all(i["step"] == STEPS and i["loaded"] for i in done["images"]), done
    entry = ui.last_prompt()
    assert entry["status"]["status_str"] == "success", entry["status"]
    summary = entry["outputs"]["3"]["text"][0]
    assert "validation loss" in summary and "held out: " in summary, summary
    assert ui.our_errors() == []
