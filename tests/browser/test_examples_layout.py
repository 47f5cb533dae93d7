"""Each example workflow, loaded in the page, lays its nodes out without any two overlapping (both renderings).

The rectangles are the nodes as the page draws them once loaded (our widgets may grow a node past
its saved size): the classic canvas's node boxes with their title bars, Nodes 2.0's node elements.
The measured boxes are written to `.cache/browser-artifacts/` beside the screenshots.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

EXAMPLES = sorted(p for p in (Path(__file__).resolve().parents[2] / "examples").glob("*.json") if "_api" not in p.stem)

# Node rectangles in graph units: Nodes 2.0 from the node elements (page pixels back to graph units),
# the classic canvas from pos/size plus the title bar above pos.
RECTS = """async () => {
  for (let i = 0; i < 4; i++) await new Promise(r => requestAnimationFrame(r));
  const ds = app.canvas.ds, cr = app.canvas.canvas.getBoundingClientRect();
  const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  return app.graph.nodes.map(n => {
    const el = document.querySelector(`[data-node-id="${n.id}"]`);
    if (el) {
      const r = el.getBoundingClientRect();
      const x = (r.left - cr.left) / ds.scale - ds.offset[0], y = (r.top - cr.top) / ds.scale - ds.offset[1];
      return {id: String(n.id), type: n.type, x, y, w: r.width / ds.scale, h: r.height / ds.scale, dom: true,
              pos: [n.pos[0], n.pos[1]]};
    }
    return {id: String(n.id), type: n.type, x: n.pos[0], y: n.pos[1] - title, w: n.size[0], h: n.size[1] + title,
            dom: false, pos: [n.pos[0], n.pos[1]]};
  });
}"""


def overlaps(rects: list[dict], gap: float = 0.0) -> list[str]:
    found = []
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            if (
                a["x"] < b["x"] + b["w"] + gap
                and b["x"] < a["x"] + a["w"] + gap
                and a["y"] < b["y"] + b["h"] + gap
                and b["y"] < a["y"] + a["h"] + gap
            ):
                found.append(f"{a['type']} #{a['id']} and {b['type']} #{b['id']}")
    return found


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_nodes_do_not_overlap(ui, renderer, example):
    workflow = json.loads(example.read_text())
    ui.js("async (g) => { await app.loadGraphData(g); }", workflow)
    ui.page.wait_for_function("(n) => app.graph.nodes.length === n", arg=len(workflow["nodes"]))
    ui.js("() => { app.canvas.ds.scale = 0.5; app.canvas.ds.offset = [130, 100]; app.canvas.setDirty(true, true); }")
    # Nodes 2.0 moves its elements a few frames after the view changes: read until two readings agree.
    rects, previous = ui.js(RECTS), None
    for _ in range(20):
        if rects == previous:
            break
        ui.page.wait_for_timeout(100)
        rects, previous = ui.js(RECTS), rects
    (ui.artifacts / f"example-{example.stem}-{renderer}-rects.json").write_text(json.dumps(rects, indent=1))
    ui.screenshot(f"example-{example.stem}-{renderer}")
    assert len(rects) == len(workflow["nodes"])
    assert all(r["dom"] == (renderer == "vue") for r in rects), rects
    assert overlaps(rects, gap=10) == [], "overlapping nodes (or closer than 10 units)"
