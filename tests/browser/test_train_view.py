"""The Train node's progress view says a run's real state (both renderings), from the server's events.

The events are dispatched in the page (`api.dispatchCustomEvent`), the way the websocket client
delivers the server's `send_sync`, with the fields `nodes/progress.py` sends; `test_runs.py` checks
the same view against real runs. Each state leaves a screenshot in `.cache/browser-artifacts/`.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

VIEW = "[data-testid=lw-train-progress]"
STATS = "[data-testid=lw-train-stats]"

# A Train node, scrolled so that its foot (where the progress view sits) is in the window.
ADD_TRAIN = """() => {
  const n = LiteGraph.createNode('LoraWorkbenchTrain');
  n.pos = [100, 100];
  app.graph.add(n);
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [0, Math.min(0, 760 - (n.pos[1] + n.size[1]))];
  app.canvas.setDirty(true, true);
  return n.id;
}"""
# Scroll the canvas so that the progress view's foot is near the window's bottom (both renderings).
IN_SIGHT = """async () => {
  for (let i = 0; i < 3; i++) {
    const r = document.querySelector('[data-testid=lw-train-progress]').getBoundingClientRect();
    const shift = r.bottom - (window.innerHeight - 30);
    if (Math.abs(shift) < 2) break;
    app.canvas.ds.offset[1] -= shift / app.canvas.ds.scale;
    app.canvas.setDirty(true, true);
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  }
}"""
SEND = """([type, detail]) => window.comfyAPI.api.api.dispatchCustomEvent('lora_workbench.train_' + type, detail)"""
PROGRESS = """([id, from, to, total, resumed]) => {
  const api = window.comfyAPI.api.api;
  const loss = (s) => 0.5 * Math.exp(-s / 10) + 0.02 * Math.sin(s) + 0.05;
  for (let step = from; step <= to; step++) {
    const detail = {node: String(id), step, total, loss: loss(step), elapsed: step * 2, eta: (total - step) * 2,
                    resumed_from: resumed};
    if (step === from && resumed) detail.history = Array.from({length: resumed}, (_, i) => [i + 1, loss(i + 1)]);
    api.dispatchCustomEvent('lora_workbench.train_progress', detail);
  }
}"""
# What the view shows and where: its texts, the file's tooltip, the boxes of the view, its stats, its
# chart and of the node (classic: the node's rectangle mapped to the page; Nodes 2.0: the node's
# element), and the orange smoothed curve's extent on the canvas.
READ = """async (id) => {
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const root = document.querySelector('[data-testid=lw-train-progress]');
  const stats = root.querySelector('[data-testid=lw-train-stats]');
  const c = root.querySelector('[data-testid=lw-loss-canvas]');
  const box = (e) => { const r = e.getBoundingClientRect(); return {l: r.left, t: r.top, r: r.right, b: r.bottom}; };
  let nodeBox;
  const vue = document.querySelector(`[data-node-id="${id}"]`);
  if (vue) nodeBox = box(vue);
  else {
    const n = app.graph.getNodeById(id), ds = app.canvas.ds, cr = app.canvas.canvas.getBoundingClientRect();
    const [x, y] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1]]);
    const w = n.size[0] * ds.scale, h = n.size[1] * ds.scale;
    nodeBox = {l: cr.left + x, t: cr.top + y, r: cr.left + x + w, b: cr.top + y + h};
  }
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let pixels = 0, left = c.width, right = -1;
  for (let i = 0; i < d.length; i += 4)
    if (d[i] > 200 && d[i+1] > 120 && d[i+1] < 210 && d[i+2] < 100 && d[i+3] > 200) {
      pixels++; const x = (i / 4) % c.width; left = Math.min(left, x); right = Math.max(right, x);
    }
  const text = (k) => stats.querySelector(`[data-key="${k}"]`)?.textContent ?? null;
  const line = stats.querySelector('.lw-stat-line');
  const status = stats.querySelector('[data-key=status]');
  return {
    status: root.dataset.status, outcome: root.dataset.outcome, points: Number(root.dataset.points),
    resumedFrom: Number(root.dataset.resumedFrom),
    step: text('step'), loss: text('loss'), elapsed: text('elapsed'), eta: text('eta'),
    line: text('status'), kind: status?.dataset.kind, file: text('file'),
    fileTip: stats.querySelector('[data-key=file]')?.title ?? null, statusTip: status?.title ?? null,
    statusClipped: status ? status.scrollHeight > status.clientHeight + 1 : null,
    numbersWrapped: line ? line.scrollHeight > line.clientHeight + 1 || line.scrollWidth > line.clientWidth + 1 : null,
    root: box(root), stats: box(stats), chart: box(c), node: nodeBox,
    ratio: window.devicePixelRatio || 1, width: c.width, pixels, left, right,
  };
}"""
PAD_LEFT, PAD_RIGHT = 40, 8  # js/train_progress.js PAD: the plot box inside the canvas
FILE = "my_lora/step-000012.safetensors"
PATH = "/srv/comfy/output/lora_workbench/checkpoints/my_lora/step-000012.safetensors"


def check_layout(v: dict) -> None:
    """The stats sit above the chart and nothing leaves the view or the node: no clipping at any state."""
    assert not v["numbersWrapped"], v
    assert v["stats"]["b"] <= v["chart"]["t"] + 0.5, f"the stats run over the chart: {v}"
    assert v["chart"]["b"] <= v["root"]["b"] + 0.5 and v["chart"]["t"] >= v["root"]["t"] - 0.5, f"clipped: {v}"
    assert v["chart"]["b"] - v["chart"]["t"] >= 95, f"the chart is squeezed: {v}"
    for side in ("l", "t"):
        assert v["root"][side] >= v["node"][side] - 1, f"the view leaves the node ({side}): {v}"
    for side in ("r", "b"):
        assert v["root"][side] <= v["node"][side] + 1, f"the view leaves the node ({side}): {v}"


def test_train_view_states(ui, renderer, node_types):
    """Running early in a long run (the curve fills the width), cancelled, resumed, finished, already
    finished, failed: each said in words, with the checkpoint's file name (its path as the tooltip), the
    layout intact, and a screenshot."""
    assert "LoraWorkbenchTrain" in node_types
    page = ui.page
    node = ui.js(ADD_TRAIN)
    page.locator(VIEW).wait_for()
    ui.js(IN_SIGHT)
    idle = ui.js(READ, node)
    assert idle["line"] == "Waiting for training to start" and idle["step"] is None, idle
    check_layout(idle)
    ui.screenshot(f"train-view-{renderer}-idle")

    # Running: 30 steps of 2000. The x-axis spans the steps done, so the curve reaches the right edge.
    ui.js(PROGRESS, [node, 1, 30, 2000, 0])
    running = ui.js(READ, node)
    ui.screenshot(f"train-view-{renderer}-running")
    assert (running["status"], running["line"], running["kind"]) == ("running", "Running", "running"), running
    assert running["step"] == "Step 30/2000" and running["eta"] == "Remaining 1:05:40", running
    assert running["elapsed"] == "Elapsed 1:00" and running["points"] == 30, running
    plot_right = running["width"] - PAD_RIGHT * running["ratio"]
    plot_left = PAD_LEFT * running["ratio"]
    assert running["pixels"] > 100, running
    assert running["left"] <= plot_left + 0.05 * (plot_right - plot_left), running
    assert running["right"] >= plot_right - 3 * running["ratio"], f"the curve does not fill the width: {running}"
    check_layout(running)

    # Cancelled at step 30: said so, with the checkpoint's file name; no "Remaining" left behind.
    ui.js(
        SEND,
        [
            "done",
            {
                "node": str(node),
                "state": "cancelled",
                "steps": 30,
                "total": 2000,
                "resumed_from": 0,
                "elapsed": 61,
                "file": FILE,
                "path": PATH,
                "message": "",
                "losses": None,
            },
        ],
    )
    cancelled = ui.js(READ, node)
    ui.screenshot(f"train-view-{renderer}-cancelled")
    assert cancelled["status"] == "done" and cancelled["outcome"] == "cancelled", cancelled
    assert cancelled["line"] == f"Cancelled at step 30; checkpoint {FILE}", cancelled
    assert cancelled["file"] == FILE and cancelled["fileTip"] == PATH, cancelled
    assert PATH in cancelled["statusTip"] and "checkpoint.json" not in cancelled["line"], cancelled
    assert cancelled["eta"] is None and cancelled["step"] == "Step 30/2000", cancelled
    assert cancelled["points"] == 30 and cancelled["pixels"] > 100, "the curve stays after Cancel"
    check_layout(cancelled)

    # Resumed from step 32: the checkpoint's history comes with the first step, then the run goes on.
    ui.js(PROGRESS, [node, 33, 36, 40, 32])
    resumed = ui.js(READ, node)
    ui.screenshot(f"train-view-{renderer}-resumed")
    assert resumed["line"] == "Running, resumed from step 32" and resumed["resumedFrom"] == 32, resumed
    assert resumed["step"] == "Step 36/40" and resumed["points"] == 36, resumed
    step_one = plot_left + (plot_right - plot_left) / 36  # x of step 1 on an axis from 0 to 36
    assert resumed["left"] <= step_one + 3 * resumed["ratio"], f"the history is drawn from step 1: {resumed}"
    check_layout(resumed)
    done_file = "my_lora/step-000040.safetensors"
    losses = [[s, 0.1 + 0.3 / s] for s in range(1, 41)]
    ui.js(
        SEND,
        [
            "done",
            {
                "node": str(node),
                "state": "finished",
                "steps": 40,
                "total": 40,
                "resumed_from": 32,
                "elapsed": 9.5,
                "file": done_file,
                "path": "/o/" + done_file,
                "message": "",
                "losses": losses,
            },
        ],
    )
    finished = ui.js(READ, node)
    ui.screenshot(f"train-view-{renderer}-finished")
    assert finished["line"] == f"Finished at step 40, resumed from step 32; checkpoint {done_file}", finished
    assert finished["kind"] == "finished" and finished["points"] == 40 and finished["loss"] == "Loss 0.1075", finished
    check_layout(finished)

    # Already finished (a queue after the end, resume on): the run's curve and numbers, not an empty chart.
    ui.js(
        SEND,
        [
            "done",
            {
                "node": str(node),
                "state": "already finished",
                "steps": 40,
                "total": 40,
                "resumed_from": 40,
                "elapsed": 1.2,
                "file": done_file,
                "path": "/o/" + done_file,
                "message": "",
                "losses": losses,
            },
        ],
    )
    already = ui.js(READ, node)
    ui.screenshot(f"train-view-{renderer}-already-finished")
    assert already["line"] == f"Already finished at step 40, nothing trained; checkpoint {done_file}", already
    assert already["elapsed"] == "Elapsed 0:01" and already["loss"] == "Loss 0.1075", already
    assert already["points"] == 40 and already["pixels"] > 100, already
    check_layout(already)

    # Failed, with a long message: the message is in the view (two lines at most, all of it as the tooltip).
    message = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB " + "(details) " * 20
    ui.js(PROGRESS, [node, 1, 5, 40, 0])
    ui.js(
        SEND,
        [
            "done",
            {
                "node": str(node),
                "state": "failed",
                "steps": 5,
                "total": 40,
                "resumed_from": 0,
                "elapsed": 12,
                "file": None,
                "path": None,
                "message": message,
                "losses": None,
            },
        ],
    )
    failed = ui.js(READ, node)
    ui.screenshot(f"train-view-{renderer}-failed")
    assert failed["kind"] == "failed" and failed["line"].startswith("Failed after step 5: OutOfMemoryError"), failed
    assert failed["line"].endswith("; no checkpoint") and failed["statusTip"] == failed["line"], failed
    assert failed["points"] == 5, "the curve of the steps before the failure stays"
    check_layout(failed)
    assert ui.our_errors() == []
