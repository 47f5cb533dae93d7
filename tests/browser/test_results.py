"""Results in the node that made them: Apply LoRA Stack's report, Save LoRA's file, and the new file in
every LoRA picker (core LoraLoader's combo, our stack editor's list) without a page reload."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RUN = "[data-testid=queue-button]"
STACK_ROOT = "[data-testid=lw-stack]"

BUILD = """([ckpt, lora, filename]) => {
  app.graph.clear();
  const { add, link, w } = lwTest;
  const ck = add('CheckpointLoaderSimple', 20, 20); w(ck, 'ckpt_name').value = ckpt;
  const st = add('LoraWorkbenchStack', 20, 200);
  const ap = add('LoraWorkbenchApplyStack', 470, 20);
  const pv = add('PreviewAny', 900, 20);
  const ld = add('LoraWorkbenchLoad', 20, 520); w(ld, 'lora_name').value = lora;
  const sv = add('LoraWorkbenchSave', 470, 520); w(sv, 'filename').value = filename;
  const ll = add('LoraLoader', 900, 400);
  link(ck, 'MODEL', ap, 'model'); link(ck, 'CLIP', ap, 'clip'); link(st, 'LORA_STACK', ap, 'lora_stack');
  link(ap, 'report', pv, 'source');
  link(ld, 'LORA_MODEL', sv, 'adapter');
  app.canvas.ds.scale = 0.9;
  app.canvas.ds.offset = [80, 60];
  app.canvas.setDirty(true, true);
  return {stack: st.id, apply: ap.id, save: sv.id, loader: ll.id};
}"""
LORA_PER_RENDERER = {"classic": "lw_plain", "vue": "lw_style"}
# The names each picker offers now: core LoraLoader's combo and the stack editor's chooser (opened from the
# first row's name, read, closed with Escape).
PICKERS = """(loader) => {
  const w = app.graph.getNodeById(loader).widgets.find(w => w.name === 'lora_name');
  let values = w.options.values;
  if (typeof values === 'function') values = values();
  document.querySelector('[data-testid=lw-stack] [data-field=lora]').click();
  const stack = [...document.querySelectorAll('[data-testid=lw-chooser] .lw-pop-item')].map(e => e.dataset.name);
  document.querySelector('[data-testid=lw-chooser] input')
    ?.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}));
  return {loader: [...(values ?? [])], stack};
}"""
# A node's result view: state, text, tooltip, and whether its text fits (height for at least one line).
RESULT = """(id) => {
  const n = app.graph.getNodeById(id);
  const root = n?.lwResult;
  if (!root) return null;
  const r = root.getBoundingClientRect();
  return {state: root.dataset.state, text: root.textContent, title: root.title,
          lora: root.querySelector('[data-key=lora]')?.textContent ?? null,
          height: r.height / (app.canvas.ds.scale || 1), fits: root.scrollHeight <= root.clientHeight + 1};
}"""


def test_apply_report_save_path_and_pickers_refreshed(ui, renderer, node_types, fixtures_info, comfy_base):
    for needed in ("LoraWorkbenchApplyStack", "LoraWorkbenchSave", "LoraWorkbenchLoad", "PreviewAny", "LoraLoader"):
        assert needed in node_types, needed
    page = ui.page
    filename = f"browser_saved/new_{renderer}"
    new_name = f"{filename}.safetensors"
    ids = ui.js(BUILD, [fixtures_info["checkpoint"], fixtures_info["loras"][0], filename])
    page.wait_for_selector(STACK_ROOT)
    page.click(f"{STACK_ROOT} [data-testid=lw-add]")
    page.locator("[data-testid=lw-chooser]").wait_for()
    # Another LoRA per renderer: with the same one, this run's Apply would be ComfyUI's cached result of the
    # previous test's, and the executor reports only the nodes it stages (the output nodes), not a cached Apply.
    page.keyboard.type(LORA_PER_RENDERER[renderer])
    page.keyboard.press("Enter")  # adds the chooser's highlighted (first matching) file
    page.locator("[data-testid=lw-chooser]").wait_for(state="detached")
    before = ui.js(PICKERS, ids["loader"])
    assert before["loader"] and before["stack"], before
    assert new_name not in before["loader"] and new_name not in before["stack"], before
    empty = ui.js(RESULT, ids["apply"])
    assert empty["state"] == "empty" and empty["height"] >= 50, empty

    page.locator(RUN).first.click()
    page.wait_for_function(
        "([a, s]) => [a, s].every(id => app.graph.getNodeById(id)?.lwResult?.dataset.state === 'shown')",
        arg=[ids["apply"], ids["save"]],
        timeout=120_000,
        polling=100,
    )
    entry = ui.last_prompt()
    assert entry["status"]["status_str"] == "success", entry["status"]
    # Apply's report in its node is the one the server made.
    apply = ui.js(RESULT, ids["apply"])
    report = entry["outputs"][str(ids["apply"])]["text"][0]
    assert apply["text"] == report and report.startswith("1 LoRA(s) applied; total model strength 1.00"), apply
    # Save's file: its name as the pickers list it, the full path as the tooltip.
    save = ui.js(RESULT, ids["save"])
    path = Path(save["title"])
    assert save["lora"] == new_name and save["text"] == f"Saved {new_name}", save
    assert save["height"] >= 14 and save["fits"], f"the saved name is not fully shown: {save}"
    assert path.is_file() and path == comfy_base / "models" / "loras" / new_name, save

    # The new file is in every picker without a reload (ComfyUI's refresh, what pressing R does).
    page.wait_for_function(
        f"([loader, name]) => {{ const p = ({PICKERS})(loader);"
        " return p.loader.includes(name) && p.stack.includes(name); }",
        arg=[ids["loader"], new_name],
        timeout=30_000,
        polling=100,
    )
    ui.screenshot(f"results-{renderer}")
    assert ui.our_errors() == []
