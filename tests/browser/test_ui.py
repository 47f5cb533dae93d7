"""The pack's frontend in the real ComfyUI web UI (Chromium, both renderers), against a real server.

Every check reads state back from the page: the `rows` widget value (what a workflow saves and the
server parses), the editor's DOM, the clipboard, canvas pixels, and the server's history.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

STACK = "LoraWorkbenchStack"
ROOT = "[data-testid=lw-stack]"
ROW = f"{ROOT} .lw-row"
CHOOSER = "[data-testid=lw-chooser]"

ADD_STACK = """() => {
  const n = LiteGraph.createNode('LoraWorkbenchStack');
  n.pos = [120, 120];
  app.graph.add(n);
  app.canvas.setDirty(true, true);
  return n.id;
}"""
ROWS_VALUE = "(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'rows').value"
# A node's id in the page is a number in frontend 1.32 and a string in 1.49; saved workflows hold numbers
# on both, and getNodeById takes either. Ids from the page are compared with saved ones as text.


def rows_of(ui, node_id) -> list[dict]:
    return json.loads(ui.js(ROWS_VALUE, node_id))


def add_stack(ui) -> int:
    node_id = ui.js(ADD_STACK)
    ui.page.wait_for_selector(ROOT, state="visible")
    return node_id


def row(ui, i):
    return ui.page.locator(ROW).nth(i)


def add_row(ui) -> None:
    """+ Add LoRA, then Enter in the chooser: adds the highlighted file, the first one the stack does not use yet."""
    ui.page.click(f"{ROOT} [data-testid=lw-add]")
    ui.page.locator(CHOOSER).wait_for()
    ui.page.keyboard.press("Enter")
    ui.page.locator(CHOOSER).wait_for(state="detached")


def row_action(ui, i, action: str) -> None:
    """Row i's menu (its button; right-click opens the same menu), then one of its actions."""
    row(ui, i).locator("[data-action=menu]").click()
    ui.page.locator(f"[data-testid=lw-row-menu] [data-action={action}]").click()
    ui.page.locator("[data-testid=lw-row-menu]").wait_for(state="detached")


def set_strength(ui, i, value: float) -> None:
    field = row(ui, i).locator("input[data-field=strength]")
    field.fill(str(value))


def test_extensions_and_hidden_textarea(ui, renderer):
    """Our three extensions load; the stack node shows the editor and no raw JSON textarea."""
    names = ui.js("() => app.extensions.map(e => e.name)")
    assert {"LoraWorkbench.Stack", "LoraWorkbench.Info", "LoraWorkbench.TrainProgress"} <= set(names), names
    node_id = add_stack(ui)
    widgets = ui.js(
        "(id) => app.graph.getNodeById(id).widgets.map(w => ({name: w.name, type: w.type, hidden: !!w.hidden,"
        " serialize: w.serialize !== false}))",
        node_id,
    )
    rows_widget = next(w for w in widgets if w["name"] == "rows")
    assert rows_widget["hidden"] and rows_widget["serialize"], widgets
    editor = next(w for w in widgets if w["name"] == "lora_rows_editor")
    assert editor["serialize"] is False, "the editor is a view; only `rows` is saved"
    visible_textareas = ui.js(
        "() => [...document.querySelectorAll('textarea')].filter(t => t.offsetParent !== null &&"
        " t.value.startsWith('[')).length"
    )
    assert visible_textareas == 0, "the raw rows JSON must not be shown"
    assert ui.our_errors() == []


def test_stack_rows_editing(ui, renderer, fixtures_info):
    """Add three rows, remove, reorder, toggle, set strengths; the warning follows the 2.0 limit."""
    page = ui.page
    node_id = add_stack(ui)
    for _ in range(3):
        add_row(ui)
    rows = rows_of(ui, node_id)
    assert len(rows) == 3
    # Each new row picks a file no row uses yet (the list may hold files other tests saved, e.g. test_results.py).
    assert len({r["lora"] for r in rows}) == 3, rows
    assert all(r["on"] and r["strength"] == 1 and r["strength_clip"] is None for r in rows)
    assert page.locator(ROW).count() == 3
    # 3 x 1.0 is over the limit: the warning shows.
    assert page.locator(f"{ROOT} [data-testid=lw-warning]").is_visible()
    ui.screenshot(f"stack-{renderer}-three-rows")

    first, second, third = (r["lora"] for r in rows)
    row_action(ui, 1, "remove")
    assert [r["lora"] for r in rows_of(ui, node_id)] == [first, third]
    assert page.locator(ROW).count() == 2

    row_action(ui, 0, "down")
    assert [r["lora"] for r in rows_of(ui, node_id)] == [third, first]
    row_action(ui, 1, "up")
    assert [r["lora"] for r in rows_of(ui, node_id)] == [first, third]

    # 2 x 1.0 = 2.0 is allowed; no warning.
    assert not page.locator(f"{ROOT} [data-testid=lw-warning]").is_visible()
    set_strength(ui, 0, 1.25)
    assert rows_of(ui, node_id)[0]["strength"] == 1.25
    assert page.locator(f"{ROOT} [data-testid=lw-warning]").is_visible(), "2.25 > 2.0 must warn"
    assert "2.25" in page.locator(f"{ROOT} [data-testid=lw-sum]").inner_text()

    # Switching a row off takes it out of the sum: 1.0 left, no warning.
    row(ui, 0).locator("input[data-field=on]").uncheck()
    assert rows_of(ui, node_id)[0]["on"] is False
    assert not page.locator(f"{ROOT} [data-testid=lw-warning]").is_visible()
    assert "lw-off" in row(ui, 0).get_attribute("class")
    row(ui, 0).locator("input[data-field=on]").check()
    assert page.locator(f"{ROOT} [data-testid=lw-warning]").is_visible()
    set_strength(ui, 0, -0.5)
    assert not page.locator(f"{ROOT} [data-testid=lw-warning]").is_visible(), "|-0.5| + 1.0 = 1.5"

    # Separate CLIP strength: a second field appears and writes strength_clip.
    page.locator(f"{ROOT} .lw-footer input[type=checkbox]").check()
    assert ui.js("(id) => app.graph.getNodeById(id).properties.separate_clip_strength", node_id) is True
    clip = row(ui, 1).locator("input[data-field=strength_clip]")
    assert clip.input_value() == "1.00"
    clip.fill("0.3")
    final = rows_of(ui, node_id)
    assert final == [
        {"on": True, "lora": first, "strength": -0.5, "strength_clip": None},
        {"on": True, "lora": third, "strength": 1, "strength_clip": 0.3},
    ]

    # Picking another file for a row (click its name, then the file in the chooser) writes its name.
    row(ui, 1).locator("[data-field=lora]").click()
    page.locator(f'{CHOOSER} .lw-pop-item[data-name="{second}"]').click()
    assert rows_of(ui, node_id)[1]["lora"] == second
    assert ui.our_errors() == []


def test_trigger_words_shown_and_copied(ui, renderer):
    """A row shows its LoRA's trigger words (from the info route); a click copies one."""
    page = ui.page
    node_id = add_stack(ui)
    ui.js(
        "(id) => { const n = app.graph.getNodeById(id); const w = n.widgets.find(w => w.name === 'rows');"
        " w.value = JSON.stringify([{on: true, lora: 'lw_style.safetensors', strength: 0.8, strength_clip: null},"
        " {on: true, lora: 'lw_plain.safetensors', strength: 0.5, strength_clip: null}]); n.onConfigure({}); }",
        node_id,
    )
    chips = row(ui, 0).locator(".lw-trigger")
    chips.first.wait_for(timeout=10_000)
    assert [c.inner_text() for c in chips.all()] == ["sks style", "watercolor"]
    assert "no trigger words" in row(ui, 1).locator("[data-field=info]").inner_text()
    chips.nth(1).click()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=lw-stack]').dataset.lastCopied === 'watercolor'"
    )
    assert page.evaluate("() => navigator.clipboard.readText()") == "watercolor"
    assert ui.our_errors() == []


def test_missing_file_marked(ui, renderer):
    """A workflow naming a LoRA this server lacks shows that row marked before anything is queued."""
    node_id = add_stack(ui)
    graph = json.loads(ui.js("() => JSON.stringify(app.graph.serialize())"))
    node = next(n for n in graph["nodes"] if str(n["id"]) == str(node_id))
    node["widgets_values"] = [
        json.dumps(
            [
                {"on": True, "lora": "lw_style.safetensors", "strength": 1.0, "strength_clip": None},
                {"on": False, "lora": "somebody_elses.safetensors", "strength": 0.7, "strength_clip": None},
            ]
        )
    ]
    ui.js("async (g) => { await app.loadGraphData(g); }", graph)
    ui.page.wait_for_selector(f"{ROW}.lw-missing")
    rows = ui.page.locator(ROW)
    assert rows.count() == 2
    assert "lw-missing" not in rows.nth(0).get_attribute("class")
    assert "lw-missing" in rows.nth(1).get_attribute("class")
    assert "Missing" in rows.nth(1).inner_text()
    assert ui.js("() => document.querySelector('[data-testid=lw-stack]').dataset.missing") == "1"
    # The missing name stays shown (it is not silently replaced by a file that exists).
    name = rows.nth(1).locator("[data-field=lora]")
    assert name.get_attribute("data-value") == "somebody_elses.safetensors"
    assert "(missing)" in name.inner_text()
    assert ui.our_errors() == []


def test_workflow_roundtrip_after_reload(ui, renderer):
    """Rows survive serialize -> page reload -> loadGraphData, in the widget value and the editor."""
    page = ui.page
    node_id = add_stack(ui)
    add_row(ui)
    add_row(ui)
    set_strength(ui, 1, 0.35)
    row(ui, 0).locator("input[data-field=on]").uncheck()
    before = rows_of(ui, node_id)
    saved = ui.js("() => JSON.stringify(app.graph.serialize())")
    node = next(n for n in json.loads(saved)["nodes"] if str(n["id"]) == str(node_id))
    assert node["widgets_values"] == [json.dumps(before, separators=(",", ":"))], "only `rows` is saved"

    page.reload()
    ui.wait_loaded()
    ui.js("async (g) => { await app.loadGraphData(JSON.parse(g)); }", saved)
    page.wait_for_selector(ROW)
    assert rows_of(ui, node_id) == before
    assert page.locator(ROW).count() == 2
    assert row(ui, 0).locator("input[data-field=on]").is_checked() is False
    assert row(ui, 1).locator("input[data-field=strength]").input_value() == "0.35"
    assert row(ui, 1).locator("[data-field=lora]").get_attribute("data-value") == before[1]["lora"]
    assert ui.our_errors() == []


BUILD_GRAPH = """([ckpt, seed]) => {
  app.graph.clear();
  const { add, link, w } = lwTest;
  const ck = add('CheckpointLoaderSimple', 0, 0); w(ck, 'ckpt_name').value = ckpt;
  const st = add('LoraWorkbenchStack', 0, 250);
  const ap = add('LoraWorkbenchApplyStack', 450, 0);
  const pos = add('CLIPTextEncode', 850, 0); w(pos, 'text').value = 'sks style, a red ball';
  const neg = add('CLIPTextEncode', 850, 250); w(neg, 'text').value = '';
  const lat = add('EmptyLatentImage', 850, 500);
  w(lat, 'width').value = 64; w(lat, 'height').value = 64; w(lat, 'batch_size').value = 1;
  const ks = add('KSampler', 1250, 0);
  w(ks, 'steps').value = 4; w(ks, 'seed').value = seed; w(ks, 'control_after_generate').value = 'fixed';
  w(ks, 'sampler_name').value = 'euler'; w(ks, 'scheduler').value = 'normal';
  const dec = add('VAEDecode', 1600, 0);
  const save = add('SaveImage', 1850, 0); w(save, 'filename_prefix').value = 'lw_browser';
  link(ck, 'MODEL', ap, 'model'); link(ck, 'CLIP', ap, 'clip'); link(st, 'LORA_STACK', ap, 'lora_stack');
  link(ap, 'CLIP', pos, 'clip'); link(ap, 'CLIP', neg, 'clip');
  link(ap, 'MODEL', ks, 'model'); link(pos, 'CONDITIONING', ks, 'positive'); link(neg, 'CONDITIONING', ks, 'negative');
  link(lat, 'LATENT', ks, 'latent_image'); link(ks, 'LATENT', dec, 'samples'); link(ck, 'VAE', dec, 'vae');
  link(dec, 'IMAGE', save, 'images');
  // Keep the stack node clear of the side bar, where the test clicks it.
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [120, 80];
  app.canvas.setDirty(true, true);
  return {stack: st.id, save: save.id};
}"""


def test_queue_stacking_workflow(ui, renderer, node_types, fixtures_info, comfy_base):
    """Checkpoint -> LoRA Stack (rows set in the UI) -> Apply -> sampler: Run shows the output image."""
    if "LoraWorkbenchApplyStack" not in node_types:
        pytest.fail("the server does not offer LoraWorkbenchApplyStack")
    page = ui.page
    # A different seed per renderer, so the second run samples instead of reusing the cached result.
    ids = ui.js(BUILD_GRAPH, [fixtures_info["checkpoint"], 7 if renderer == "classic" else 8])
    page.wait_for_selector(ROOT)
    add_row(ui)
    add_row(ui)
    set_strength(ui, 0, 0.6)
    set_strength(ui, 1, 0.4)
    rows = rows_of(ui, ids["stack"])
    page.locator("[data-testid=queue-button]").first.click()
    # The image shows in the SaveImage node (node.imgs in the classic canvas, an <img> in Nodes 2.0).
    page.wait_for_function(
        "(id) => { const o = app.nodeOutputs?.[String(id)]; return o && o.images && o.images.length > 0; }",
        arg=ids["save"],
        timeout=120_000,
    )
    image = ui.js("(id) => app.nodeOutputs[String(id)].images[0]", ids["save"])
    assert image["filename"].startswith("lw_browser")
    assert (comfy_base / "output" / image.get("subfolder", "") / image["filename"]).is_file()
    size = page.evaluate(
        """async (img) => {
          const el = new Image();
          el.src = `/view?filename=${encodeURIComponent(img.filename)}&type=${img.type}&subfolder=${img.subfolder}`;
          await el.decode();
          return [el.naturalWidth, el.naturalHeight];
        }""",
        image,
    )
    assert size == [64, 64]
    page.wait_for_function(
        "(id) => { const n = app.graph.getNodeById(id); return (n.imgs && n.imgs.length > 0) ||"
        " document.querySelector('img[src*=\"lw_browser\"]'); }",
        arg=ids["save"],
        timeout=20_000,
    )
    # The server ran exactly the rows the editor wrote.
    history = page.evaluate("async () => (await fetch('/history')).json()")
    prompts = [h["prompt"][2] for h in history.values()]
    # Other tests' prompts may have a node with the same id; take only this stack node's.
    stack = str(ids["stack"])
    sent = [p[stack]["inputs"]["rows"] for p in prompts if p.get(stack, {}).get("class_type") == STACK]
    assert sent and json.loads(sent[-1]) == rows
    ui.screenshot(f"queue-{renderer}-done")
    assert ui.our_errors() == []


def test_info_panel(ui, renderer, node_types):
    """LoRA Info shows rank, alpha, base family, trigger words and training settings of the chosen file."""
    if "LoraWorkbenchInfo" not in node_types:
        pytest.fail("the server does not offer LoraWorkbenchInfo")
    page = ui.page
    node_id = ui.js(
        "() => { const n = LiteGraph.createNode('LoraWorkbenchInfo'); n.pos = [100, 100]; app.graph.add(n);"
        " const w = n.widgets.find(w => w.name === 'lora_name'); w.value = 'chars/lw_char.safetensors';"
        " w.callback?.(w.value); return n.id; }"
    )
    panel = page.locator("[data-testid=lw-info]")
    page.wait_for_function("() => document.querySelector('[data-testid=lw-info]')?.dataset.state === 'ready'")
    value = lambda key: panel.locator(f"[data-key={key}]").inner_text()  # noqa: E731
    assert value("rank") == "8"
    assert value("alpha") == "8"
    assert value("base_family") == "SD 1.x"
    assert panel.locator(".lw-trigger").all_inner_texts() == ["ohwx person"]
    panel.locator("[data-key=training_settings] summary").click()
    assert "network_dim: 8" in value("training_settings")
    # A different pick updates the panel.
    ui.js(
        "(id) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'lora_name');"
        " w.value = 'lw_style.safetensors'; w.callback?.(w.value); }",
        node_id,
    )
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=lw-info] .lw-trigger')].map(e => e.textContent).join('|')"
        " === 'sks style|watercolor'"
    )
    assert value("rank") == "4"
    assert ui.our_errors() == []


def test_info_route(server):
    """GET /lora_workbench/info answers for a present, a missing and an unnamed file."""
    import urllib.error
    import urllib.request

    def get(query):
        try:
            with urllib.request.urlopen(f"{server}/lora_workbench/info{query}", timeout=10) as r:  # noqa: S310
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null") if e.code != 404 else None

    status, info = get("?name=lw_style.safetensors")
    assert status == 200, "route not registered: call nodes.routes.register_with_server() when the pack loads"
    assert info["exists"] is True and info["error"] is None
    assert (info["rank"], info["alpha"], info["base_family"]) == (4, 4, "sd1")
    assert info["trigger_words"] == ["sks style", "watercolor"]
    assert info["training_settings"]["network_dim"] == 4
    status, info = get("?name=chars%5Clw_char")  # backslash separator, no extension
    assert info["resolved"] == "chars/lw_char.safetensors" and info["rank"] == 8
    status, info = get("?name=nope.safetensors")
    assert status == 200 and info["exists"] is False and "not found" in info["error"]
    status, _ = get("")
    assert status == 400
