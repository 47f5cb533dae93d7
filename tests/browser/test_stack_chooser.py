"""The LoRA Stack's row UI in the real page (both renderings): the searchable folder-aware chooser, Toggle All,
the row menu, strength drag/wheel, column headers and the empty-stack hint.

Every check reads state back from the page: the `rows` widget value, the editor's DOM, and the prompt the server
ran (its history entry), as tests/browser/test_ui.py does. Screenshots of each state go to
.cache/browser-artifacts/ (prefix "chooser-").
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = "[data-testid=lw-stack]"
ROW = f"{ROOT} .lw-row"
CHOOSER = "[data-testid=lw-chooser]"
ITEM = f"{CHOOSER} .lw-pop-item"
MENU = "[data-testid=lw-row-menu]"
RUN = "[data-testid=queue-button]"
CHAR = "chars/lw_char.safetensors"
STYLE = "lw_style.safetensors"
PLAIN = "lw_plain.safetensors"

# Checkpoint -> Apply LoRA Stack <- LoRA Stack; Apply's report into PreviewAny, so queueing runs the stack
# (and the server validates every row's file) without sampling.
BUILD = """(ckpt) => {
  app.graph.clear();
  const { add, link, w } = lwTest;
  const ck = add('CheckpointLoaderSimple', 20, 420);
  w(ck, 'ckpt_name').value = ckpt;
  const st = add('LoraWorkbenchStack', 20, 20);
  // Frontend 1.49 keeps widget values by graph, node id and widget name across app.graph.clear(), and a new
  // node that gets a cleared node's id (ids restart after clear) starts with that node's values: the previous
  // test's rows would come back. Start from the node's default, as a fresh page would.
  const rows = w(st, 'rows');
  rows.value = '[]';
  st.lwStackEditor.load();
  const ap = add('LoraWorkbenchApplyStack', 520, 20);
  const pv = add('PreviewAny', 900, 20);
  link(ck, 'MODEL', ap, 'model'); link(ck, 'CLIP', ap, 'clip'); link(st, 'LORA_STACK', ap, 'lora_stack');
  link(ap, 'report', pv, 'source');
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [120, 110];  // the title bar clear of the workflow tab's menu
  app.canvas.setDirty(true, true);
  return st.id;
}"""
ROWS_VALUE = "(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'rows').value"
SET_ROWS = """([id, rows]) => {
  const n = app.graph.getNodeById(id);
  n.widgets.find(w => w.name === 'rows').value = JSON.stringify(rows);
  n.onConfigure({});
}"""
HISTORY_IDS = "async () => Object.keys(await (await fetch('/history')).json())"


def rows_of(ui, node_id) -> list[dict]:
    return json.loads(ui.js(ROWS_VALUE, node_id))


def build(ui, fixtures_info) -> int:
    node_id = ui.js(BUILD, fixtures_info["checkpoint"])
    ui.page.wait_for_selector(ROOT, state="visible")
    assert rows_of(ui, node_id) == [], "a new stack node starts empty"
    return node_id


def set_rows(ui, node_id, rows) -> None:
    ui.js(SET_ROWS, [node_id, rows])
    ui.page.wait_for_function(f"(n) => document.querySelectorAll('{ROW}').length === n", arg=len(rows))


def row(ui, i):
    return ui.page.locator(ROW).nth(i)


def queued_rows(ui, node_id) -> list[dict]:
    """Press Run, wait for the server to finish that prompt, and return the rows it ran (its history entry)."""
    before = set(ui.js(HISTORY_IDS))
    ui.page.locator(RUN).first.click()
    ui.page.wait_for_function(
        "async (n) => Object.keys(await (await fetch('/history')).json()).length > n",
        arg=len(before),
        timeout=120_000,
        polling=200,
    )
    entry = ui.last_prompt()
    assert entry["status"]["status_str"] == "success", entry["status"]
    return json.loads(entry["prompt"][2][str(node_id)]["inputs"]["rows"])


def shown(ui) -> list[dict]:
    """The chooser's entries as shown: name, folder prefix, highlighted."""
    return ui.js(
        """() => [...document.querySelectorAll('[data-testid=lw-chooser] .lw-pop-item')].map(e => ({
          name: e.dataset.name, folder: e.querySelector('.lw-folder')?.textContent ?? '',
          text: e.textContent, active: e.classList.contains('lw-active')}))"""
    )


def menu_action(ui, i, action: str, how: str = "right") -> None:
    """Open row i's menu (right-click on the row, or its menu button) and choose an action."""
    if how == "right":
        row(ui, i).locator("[data-field=info]").click(button="right")
    else:
        row(ui, i).locator("[data-action=menu]").click()
    ui.page.locator(MENU).wait_for()
    ui.page.locator(f"{MENU} [data-action={action}]").click()
    ui.page.locator(MENU).wait_for(state="detached")


def test_chooser_filters_by_folder_and_picks(ui, renderer, fixtures_info):
    """Add LoRA opens a searchable list with folders shown; typing filters; Enter, click and Escape behave."""
    page = ui.page
    node_id = build(ui, fixtures_info)
    page.click(f"{ROOT} [data-testid=lw-add]")
    page.locator(CHOOSER).wait_for()
    entries = shown(ui)
    assert {e["name"] for e in entries} >= set(fixtures_info["loras"]), entries
    char = next(e for e in entries if e["name"] == CHAR)
    assert char["folder"] == "chars/", f"the folder must be shown as a path prefix: {char}"
    # Root files first, then folders: the subfolder file is listed after every root file.
    names = [e["name"] for e in entries]
    assert names.index(CHAR) > max(names.index(STYLE), names.index(PLAIN)), names
    assert rows_of(ui, node_id) == [], "opening the chooser adds nothing"
    ui.screenshot(f"chooser-{renderer}-open")

    # Typing filters (focus is in the search box): part of the folder and the name, across the "/".
    page.keyboard.type("lw_")
    assert {e["name"] for e in shown(ui)} == set(fixtures_info["loras"]), shown(ui)
    page.keyboard.type("c")
    assert [e["name"] for e in shown(ui)] == [CHAR], shown(ui)
    page.keyboard.press("Control+A")
    page.keyboard.type("chars/lw_c")
    filtered = shown(ui)
    assert [e["name"] for e in filtered] == [CHAR] and filtered[0]["folder"] == "chars/", filtered
    assert filtered[0]["active"], "the only match is highlighted"
    ui.screenshot(f"chooser-{renderer}-filtered")
    page.keyboard.press("Enter")
    page.locator(CHOOSER).wait_for(state="detached")
    assert [r["lora"] for r in rows_of(ui, node_id)] == [CHAR]
    name = row(ui, 0).locator("[data-field=lora]")
    assert name.locator(".lw-folder").inner_text() == "chars/" and "lw_char" in name.inner_text()

    # Escape adds nothing.
    page.click(f"{ROOT} [data-testid=lw-add]")
    page.locator(CHOOSER).wait_for()
    page.keyboard.type("style")
    page.keyboard.press("Escape")
    page.locator(CHOOSER).wait_for(state="detached")
    assert len(rows_of(ui, node_id)) == 1

    # Arrow keys move the highlight; a click picks. With nothing typed the first file the stack lacks is
    # highlighted (Enter right away adds a new one), and files in the stack are marked.
    page.click(f"{ROOT} [data-testid=lw-add]")
    page.locator(CHOOSER).wait_for()
    entries = shown(ui)
    active = [e["name"] for e in entries if e["active"]]
    assert len(active) == 1 and active[0] != CHAR, entries
    assert "in stack" in next(e for e in entries if e["name"] == CHAR)["text"]
    page.keyboard.type("lw_")
    first = shown(ui)
    assert first[0]["active"]
    page.keyboard.press("ArrowDown")
    assert shown(ui)[1]["active"] and not shown(ui)[0]["active"]
    page.keyboard.press("ArrowUp")
    assert shown(ui)[0]["active"]
    page.keyboard.press("Control+A")
    page.keyboard.type("style")
    page.locator(ITEM).filter(has_text="lw_style").click()
    page.locator(CHOOSER).wait_for(state="detached")
    assert [r["lora"] for r in rows_of(ui, node_id)] == [CHAR, STYLE]

    # Clicking a row's name replaces that row's file (its current file highlighted).
    row(ui, 1).locator("[data-field=lora]").click()
    page.locator(CHOOSER).wait_for()
    assert [e["name"] for e in shown(ui) if e["active"]] == [STYLE]
    page.keyboard.type("plain")
    page.keyboard.press("Enter")
    page.locator(CHOOSER).wait_for(state="detached")
    rows = rows_of(ui, node_id)
    assert [r["lora"] for r in rows] == [CHAR, PLAIN]
    ui.screenshot(f"chooser-{renderer}-picked")

    sent = queued_rows(ui, node_id)
    assert sent == rows and sent[0]["lora"] == CHAR, sent
    assert ui.our_errors() == []


def test_toggle_all_and_row_menu(ui, renderer, fixtures_info):
    """Toggle All turns every row on, then all off (the prompt shows it); the row menu moves, toggles, removes, and
    shows info."""
    page = ui.page
    node_id = build(ui, fixtures_info)
    set_rows(
        ui,
        node_id,
        [
            {"on": True, "lora": STYLE, "strength": 0.5, "strength_clip": None},
            {"on": False, "lora": PLAIN, "strength": 0.5, "strength_clip": None},
            {"on": True, "lora": CHAR, "strength": 0.5, "strength_clip": None},
        ],
    )
    toggle = page.locator(f"{ROOT} [data-testid=lw-toggle-all]")
    assert toggle.evaluate("e => e.indeterminate"), "some rows on: the header box shows a mixed state"
    toggle.click()
    assert [r["on"] for r in rows_of(ui, node_id)] == [True, True, True], "partly on -> all on"
    assert toggle.is_checked()
    toggle.click()
    assert [r["on"] for r in rows_of(ui, node_id)] == [False, False, False], "all on -> all off"
    assert all("lw-off" in row(ui, i).get_attribute("class") for i in range(3))
    ui.screenshot(f"chooser-{renderer}-all-off")
    sent = queued_rows(ui, node_id)
    assert [r["on"] for r in sent] == [False, False, False], sent
    toggle.click()
    assert [r["on"] for r in rows_of(ui, node_id)] == [True, True, True]

    # The row menu (right-click on a row).
    row(ui, 0).locator("[data-field=info]").click(button="right")
    page.locator(MENU).wait_for()
    labels = page.locator(f"{MENU} .lw-menu-item").all_inner_texts()
    assert labels[:1] == ["Info…"] and {"Turn off", "Move up", "Move down", "Remove"} <= set(labels), labels
    assert page.locator(f"{MENU} [data-action=up]").is_disabled(), "the first row cannot move up"
    ui.screenshot(f"chooser-{renderer}-row-menu")
    page.keyboard.press("Escape")
    page.locator(MENU).wait_for(state="detached")

    menu_action(ui, 0, "down")
    assert [r["lora"] for r in rows_of(ui, node_id)] == [PLAIN, STYLE, CHAR]
    menu_action(ui, 2, "up", how="button")
    assert [r["lora"] for r in rows_of(ui, node_id)] == [PLAIN, CHAR, STYLE]
    menu_action(ui, 0, "toggle")
    assert [r["on"] for r in rows_of(ui, node_id)] == [False, True, True]
    assert "lw-off" in row(ui, 0).get_attribute("class")
    menu_action(ui, 2, "remove")
    assert [r["lora"] for r in rows_of(ui, node_id)] == [PLAIN, CHAR]
    assert page.locator(ROW).count() == 2

    # Info: the row's file facts (the same route as the LoRA Info node).
    menu_action(ui, 1, "info")
    card = page.locator("[data-testid=lw-row-info]")
    page.wait_for_function("() => document.querySelector('[data-testid=lw-row-info]')?.dataset.state === 'ready'")
    assert card.locator("[data-key=rank]").inner_text() == "8"
    assert card.locator(".lw-trigger").all_inner_texts() == ["ohwx person"]
    ui.screenshot(f"chooser-{renderer}-row-info")
    page.keyboard.press("Escape")
    card.wait_for(state="detached")

    rows = rows_of(ui, node_id)
    assert queued_rows(ui, node_id) == rows
    assert ui.our_errors() == []


def test_strength_drag_wheel_and_cleared_box(ui, renderer, fixtures_info):
    """A sideways drag steps the strength by 0.05 per 4 px and reaches the prompt; the wheel steps it too; a box
    emptied and left shows the value the row really has."""
    page = ui.page
    node_id = build(ui, fixtures_info)
    set_rows(ui, node_id, [{"on": True, "lora": STYLE, "strength": 1.0, "strength_clip": None}])
    box = row(ui, 0).locator("input[data-field=strength]")
    b = box.bounding_box()
    x, y = b["x"] + b["width"] / 2, b["y"] + b["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 20, y, steps=4)
    page.mouse.move(x + 40, y, steps=4)
    assert "lw-dragging" in box.get_attribute("class")
    page.mouse.up()
    assert rows_of(ui, node_id)[0]["strength"] == 1.5, "40 px right = 10 steps of 0.05"
    assert box.input_value() == "1.50"
    assert not box.evaluate("e => e === document.activeElement"), "a drag does not start typing"
    # The wheel over the box steps it. Frontend 1.49's Nodes 2.0 gives a node's wheel events to the canvas (zoom)
    # unless the element under the pointer has focus, as its own widgets do, so focus the box first (a click).
    box.click()
    page.mouse.wheel(0, -100)
    page.wait_for_function(f"(id) => JSON.parse(({ROWS_VALUE})(id))[0].strength === 1.55", arg=node_id)
    assert box.input_value() == "1.55"
    page.keyboard.press("Enter")  # leaves the box: a press on it drags again
    assert not box.evaluate("e => e === document.activeElement")
    ui.screenshot(f"chooser-{renderer}-dragged")
    sent = queued_rows(ui, node_id)
    assert sent[0]["strength"] == 1.55, sent

    # A drag to the left lowers it, below zero too.
    b = box.bounding_box()
    x, y = b["x"] + b["width"] / 2, b["y"] + b["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 132, y, steps=12)
    page.mouse.up()
    assert rows_of(ui, node_id)[0]["strength"] == -0.1, "132 px left = 33 steps: 1.55 - 1.65"

    # A click without moving starts typing; an emptied box shows the row's value again when left.
    box.click()
    assert box.evaluate("e => e === document.activeElement")
    page.keyboard.press("Control+A")
    page.keyboard.press("Backspace")
    assert box.input_value() == ""
    page.locator(f"{ROOT} [data-testid=lw-sum]").click()
    assert box.input_value() == "-0.10", "the cleared box shows the value the row still has"
    assert rows_of(ui, node_id)[0]["strength"] == -0.1
    box.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("0.8")
    page.keyboard.press("Enter")
    assert rows_of(ui, node_id)[0]["strength"] == 0.8 and box.input_value() == "0.80"
    assert ui.our_errors() == []


def test_headers_hint_and_row_layout(ui, renderer, fixtures_info):
    """An empty stack shows a hint; rows get Model/CLIP headers over their boxes; names keep most of the width;
    the footer stays one line below the last row."""
    page = ui.page
    node_id = build(ui, fixtures_info)
    hint = page.locator(f"{ROOT} [data-testid=lw-hint]")
    assert hint.is_visible() and "+ Add LoRA" in hint.inner_text()
    assert not page.locator(f"{ROOT} [data-testid=lw-head]").is_visible(), "no header over no rows"
    ui.screenshot(f"chooser-{renderer}-empty")
    set_rows(
        ui,
        node_id,
        [
            {"on": True, "lora": CHAR, "strength": 0.7, "strength_clip": None},
            {"on": True, "lora": STYLE, "strength": 0.6, "strength_clip": 0.4},
        ],
    )
    page.locator(f"{ROOT} .lw-footer input[type=checkbox]").check()  # separate CLIP strength
    assert not hint.is_visible()
    geometry = ui.js(
        """() => {
          const root = document.querySelector('[data-testid=lw-stack]');
          const box = (e) => {
            const r = e.getBoundingClientRect();
            return {x: r.x, y: r.y, w: r.width, h: r.height};
          };
          const rows = [...root.querySelectorAll('.lw-row')];
          return {
            heads: Object.fromEntries(
              [...root.querySelectorAll('.lw-col')].map(e => [e.dataset.col, {...box(e), text: e.textContent}])
            ),
            model: box(rows[0].querySelector('[data-field=strength]')),
            clip: box(rows[0].querySelector('[data-field=strength_clip]')),
            name: box(rows[0].querySelector('[data-field=lora]')),
            line: box(rows[0].querySelector('.lw-line')),
            last: box(rows[rows.length - 1]),
            footer: box(root.querySelector('.lw-footer')),
            add: box(root.querySelector('[data-testid=lw-add]')),
            root: box(root),
            scale: app.canvas.ds.scale,
          };
        }"""
    )
    heads, model, clip = geometry["heads"], geometry["model"], geometry["clip"]
    assert heads["strength"]["text"] == "Model" and heads["strength_clip"]["text"] == "CLIP", heads
    for head, field in ((heads["strength"], model), (heads["strength_clip"], clip)):
        center = head["x"] + head["w"] / 2
        assert field["x"] <= center <= field["x"] + field["w"], f"header {head} is not over its box {field}"
        assert head["y"] + head["h"] <= field["y"], "headers sit above the rows"
    # The name takes what the boxes leave: over half of the row's line.
    assert geometry["name"]["w"] > 0.5 * geometry["line"]["w"], geometry
    # The footer is one line (as tall as its button), below the last row, inside the editor.
    footer = geometry["footer"]
    assert footer["h"] <= geometry["add"]["h"] + 1, f"the footer wrapped: {footer}"
    assert footer["y"] >= geometry["last"]["y"] + geometry["last"]["h"], geometry
    assert footer["y"] + footer["h"] <= geometry["root"]["y"] + geometry["root"]["h"] + 1, geometry
    ui.screenshot(f"chooser-{renderer}-layout")
    assert ui.our_errors() == []
