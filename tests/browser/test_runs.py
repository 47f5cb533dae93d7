"""Real runs queued from the page: live training progress, and a UI-saved workflow run headless.

Unlike ``test_ui.py``'s progress test (events dispatched inside the page), these queue real
prompts with the Run button and watch what the server's executor sends while it works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_then_stack.json"
# Few steps at batch 1: a step of the tiny model takes about a second on these 2 shared cores.
TRAIN_STEPS = 10
RUN = "[data-testid=queue-button]"

# examples/train_then_stack.json cut down to its training part: checkpoint (1), dataset (2),
# Train (3) and the SaveImage of its loss curve (12). The Train node's widgets are then set
# through the widgets, as a user would. Ids are compared as text: a loaded node's id is a number in
# frontend 1.32 and a string in 1.49 (both save numbers, and getNodeById takes either).
PRUNE_EXAMPLE = """([keep, steps, seed, runName]) => {
  const kept = new Set(keep.map(String));
  for (const n of [...app.graph.nodes]) if (!kept.has(String(n.id))) app.graph.remove(n);
  const train = app.graph.getNodeById(3);
  const set = (name, value) => {
    const w = train.widgets.find(w => w.name === name);
    if (!w) throw new Error(`Train has no widget ${name}`);
    w.value = value; w.callback?.(value);
  };
  set('steps', steps); set('batch_size', 1); set('seed', seed);
  set('checkpoint_every', 0); set('run_name', runName); set('resume', false);
  app.canvas.ds.scale = 1;
  // The progress view at the node's foot in sight, wherever the example places the node.
  app.canvas.ds.offset = [120 - train.pos[0], 860 - train.pos[1] - train.size[1]];
  app.canvas.setDirty(true, true);
  return app.graph.nodes.map(n => n.type).sort();
}"""

# The Train node's progress view as the page shows it: status, step (dataset and text), points in
# the series, the status line and its checkpoint file (text and tooltip), and the drawn smoothed curve
# (orange, 255,170,40): its pixel count and rightmost column.
# Waits two animation frames first so the canvas holds the latest draw.
SAMPLE = """async () => {
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const root = document.querySelector('[data-testid=lw-train-progress]');
  const c = root.querySelector('[data-testid=lw-loss-canvas]');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let pixels = 0, right = -1;
  for (let i = 0; i < d.length; i += 4)
    if (d[i] > 200 && d[i+1] > 120 && d[i+1] < 210 && d[i+2] < 100 && d[i+3] > 200) {
      pixels++; right = Math.max(right, (i / 4) % c.width);
    }
  const text = (k) => root.querySelector(`[data-key=${k}]`)?.textContent ?? null;
  return {status: root.dataset.status ?? 'idle', step: Number(root.dataset.step ?? 0),
          outcome: root.dataset.outcome ?? '', resumedFrom: Number(root.dataset.resumedFrom ?? 0),
          points: Number(root.dataset.points ?? 0), pixels, right, width: c.width, ratio: window.devicePixelRatio || 1,
          stepText: text('step'), loss: text('loss'), elapsed: text('elapsed'), eta: text('eta'),
          line: text('status'), file: text('file'), fileTip: root.querySelector('[data-key=file]')?.title ?? null};
}"""
VIEW_STEP = (
    "() => { const r = document.querySelector('[data-testid=lw-train-progress]');"
    " return r && r.dataset.status ? {status: r.dataset.status, step: Number(r.dataset.step)} : null; }"
)


def test_live_training_progress(ui, node_types):
    """Queue a short training run: step and curve advance while it runs; the done state ends it at N/N.

    Classic canvas only: a real run costs seconds per renderer (the Nodes 2.0 view of the same
    widget is covered with dispatched events in ``test_ui.py``).
    """
    assert "LoraWorkbenchTrain" in node_types
    renderer = "classic"
    page = ui.page
    workflow = json.loads(EXAMPLE.read_text())
    # The example's "id" is not a valid UUID (13 hex digits in its last group); the frontend then
    # shows "Invalid workflow against zod schema: Invalid uuid at id". Give it a valid one.
    workflow["id"] = "b3d5c0de-0000-4000-8000-000000000013"
    ui.js("async (g) => { await app.loadGraphData(g); }", workflow)
    types = ui.js(PRUNE_EXAMPLE, [[1, 2, 3, 12], TRAIN_STEPS, 100, f"browser_live_{renderer}"])
    assert types == sorted(["CheckpointLoaderSimple", "LoraWorkbenchImageFolder", "LoraWorkbenchTrain", "SaveImage"])
    view = page.locator("[data-testid=lw-train-progress]")
    view.wait_for()
    assert (
        page.locator("[data-testid=lw-train-stats] [data-key=status]").inner_text() == "Waiting for training to start"
    )

    page.locator(RUN).first.click()
    # First reading: training has started and is a few steps in.
    page.wait_for_function(
        f"() => {{ const s = ({VIEW_STEP})(); return s && s.step >= 2; }}", timeout=120_000, polling=50
    )
    first = ui.js(SAMPLE)
    ui.screenshot(f"train-live-{renderer}-running")
    # Second reading, two steps later, still before the end.
    target = first["step"] + 2
    page.wait_for_function(
        f"(t) => {{ const s = ({VIEW_STEP})(); return s && (s.step >= t || s.status === 'done'); }}",
        arg=target,
        timeout=60_000,
        polling=50,
    )
    second = ui.js(SAMPLE)
    readings = {"first": first, "second": second}
    assert first["status"] == "running" and second["status"] == "running", f"the run ended too fast: {readings}"
    assert first["step"] < second["step"] < TRAIN_STEPS, readings
    assert first["stepText"] == f"Step {first['step']}/{TRAIN_STEPS}", readings
    assert second["stepText"] == f"Step {second['step']}/{TRAIN_STEPS}", readings
    # One point per step so far, and the curve drawn further across the plot.
    assert first["points"] == first["step"] and second["points"] == second["step"], readings
    # The x-axis spans the steps done so far: the curve reaches the plot's right edge at every reading.
    plot_right = first["width"] - 8 * first["ratio"]  # js/train_progress.js PAD.right
    assert first["pixels"] > 0 and second["pixels"] > 0, readings
    assert first["right"] >= plot_right - 3 and second["right"] >= plot_right - 3, readings
    assert first["line"] == "Running" and second["line"] == "Running", readings
    assert first["loss"].startswith("Loss ") and first["loss"] != "Loss --", readings
    assert second["eta"] != "Remaining --:--", readings

    page.wait_for_function(
        "() => document.querySelector('[data-testid=lw-train-progress]')?.dataset.status === 'done'",
        timeout=120_000,
        polling=100,
    )
    done = ui.js(SAMPLE)
    assert done["step"] == TRAIN_STEPS and done["stepText"] == f"Step {TRAIN_STEPS}/{TRAIN_STEPS}", done
    assert done["points"] == TRAIN_STEPS and done["pixels"] > 0 and done["outcome"] == "finished", done
    assert done["eta"] is None, "no time remaining is shown once the run has ended"
    # The checkpoint's tensor file, relative to the checkpoints folder; its absolute path as the tooltip.
    ckpt_file = f"browser_live_{renderer}/step-{TRAIN_STEPS:06d}.safetensors"
    assert done["line"] == f"Finished at step {TRAIN_STEPS}; checkpoint {ckpt_file}", done
    assert done["file"] == ckpt_file and done["fileTip"].endswith("/lora_workbench/checkpoints/" + ckpt_file), done
    assert Path(done["fileTip"]).is_file(), done
    # The run itself: the loss-curve image reached its SaveImage, and the prompt succeeded.
    page.wait_for_function("() => app.nodeOutputs?.['12']?.images?.length > 0", timeout=30_000, polling=100)
    entry = ui.last_prompt()
    assert entry["status"]["status_str"] == "success", entry["status"]
    summary = entry["outputs"]["3"]["text"][0]
    assert summary.startswith(f"finished after {TRAIN_STEPS}/{TRAIN_STEPS} steps"), summary
    ui.screenshot(f"train-live-{renderer}-done")
    assert ui.our_errors() == []


# A stacking workflow built node by node; the stack's rows are then set in its editor.
BUILD_STACK_GRAPH = """([ckpt, seed, prefix]) => {
  app.graph.clear();
  const { add, link, w } = lwTest;
  const ck = add('CheckpointLoaderSimple', 0, 0); w(ck, 'ckpt_name').value = ckpt;
  const st = add('LoraWorkbenchStack', 0, 250);
  const ap = add('LoraWorkbenchApplyStack', 450, 0);
  const pos = add('CLIPTextEncode', 850, 0); w(pos, 'text').value = 'sks style, ohwx person, a red ball';
  const neg = add('CLIPTextEncode', 850, 250); w(neg, 'text').value = 'blurry';
  const lat = add('EmptyLatentImage', 850, 500);
  w(lat, 'width').value = 64; w(lat, 'height').value = 64; w(lat, 'batch_size').value = 1;
  const ks = add('KSampler', 1250, 0);
  w(ks, 'steps').value = 4; w(ks, 'seed').value = seed; w(ks, 'control_after_generate').value = 'fixed';
  w(ks, 'cfg').value = 5.5; w(ks, 'sampler_name').value = 'euler'; w(ks, 'scheduler').value = 'normal';
  const dec = add('VAEDecode', 1600, 0);
  const save = add('SaveImage', 1850, 0); w(save, 'filename_prefix').value = prefix;
  link(ck, 'MODEL', ap, 'model'); link(ck, 'CLIP', ap, 'clip'); link(st, 'LORA_STACK', ap, 'lora_stack');
  link(ap, 'CLIP', pos, 'clip'); link(ap, 'CLIP', neg, 'clip');
  link(ap, 'MODEL', ks, 'model'); link(pos, 'CONDITIONING', ks, 'positive'); link(neg, 'CONDITIONING', ks, 'negative');
  link(lat, 'LATENT', ks, 'latent_image'); link(ks, 'LATENT', dec, 'samples'); link(ck, 'VAE', dec, 'vae');
  link(dec, 'IMAGE', save, 'images');
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [120, 80];
  app.canvas.setDirty(true, true);
  return {stack: st.id, save: save.id};
}"""
STACK_ROOT = "[data-testid=lw-stack]"
STACK_ROW = f"{STACK_ROOT} .lw-row"


def test_ui_saved_workflow_runs_the_same_headless(ui, fixtures_info, comfy_base, tmp_path):
    """A stacking workflow set up in the page and queued there gives the same pixels through the headless CLI.

    The CLI gets the server's own base directory (same checkpoint and LoRA files; nothing else
    runs while it does, and it writes its SaveImage file next to the server's with the next counter).
    """
    page = ui.page
    prefix = "lw_ui_vs_cli"
    ids = ui.js(BUILD_STACK_GRAPH, [fixtures_info["checkpoint"], 4242, prefix])
    page.wait_for_selector(STACK_ROOT)
    for _ in range(3):
        page.click(f"{STACK_ROOT} [data-testid=lw-add]")
        # + Add LoRA opens the chooser; Enter adds its highlighted file, the first one the stack lacks.
        page.locator("[data-testid=lw-chooser]").wait_for()
        page.keyboard.press("Enter")
        page.locator("[data-testid=lw-chooser]").wait_for(state="detached")
    rows = page.locator(STACK_ROW)
    rows.nth(0).locator("input[data-field=strength]").fill("0.6")
    rows.nth(1).locator("input[data-field=strength]").fill("-0.4")
    rows.nth(2).locator("input[data-field=on]").uncheck()
    page.locator(f"{STACK_ROOT} .lw-footer input[type=checkbox]").check()  # separate CLIP strength
    rows.nth(1).locator("input[data-field=strength_clip]").fill("0.25")
    stack_rows = json.loads(
        ui.js("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'rows').value", ids["stack"])
    )
    assert [(r["on"], r["strength"], r["strength_clip"]) for r in stack_rows] == [
        (True, 0.6, None),
        (True, -0.4, 0.25),
        (False, 1, None),
    ], stack_rows

    page.locator(RUN).first.click()
    page.wait_for_function(
        "(id) => app.nodeOutputs?.[String(id)]?.images?.length > 0", arg=ids["save"], timeout=120_000, polling=100
    )
    image = ui.js("(id) => app.nodeOutputs[String(id)].images[0]", ids["save"])
    ui_png = comfy_base / "output" / image.get("subfolder", "") / image["filename"]
    assert ui_png.is_file(), ui_png
    # What the server ran is what the editor wrote.
    entry = ui.last_prompt()
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert json.loads(entry["prompt"][2][str(ids["stack"])]["inputs"]["rows"]) == stack_rows

    # Saved from the page, as "Save" would: the frontend format, not the API prompt.
    saved = tmp_path / "ui_saved.json"
    saved.write_text(ui.js("() => JSON.stringify(app.graph.serialize())"))
    assert "nodes" in json.loads(saved.read_text())
    out = tmp_path / "cli_out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_workbench.headless.cli",
            "run",
            str(saved),
            "--output",
            str(out),
            "--base",
            str(comfy_base),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    (ui.artifacts / "ui-vs-cli.stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    printed = [Path(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(printed) == 1 and printed[0].name.startswith(prefix), proc.stdout
    ui_pixels = np.asarray(Image.open(ui_png).convert("RGB"))
    cli_pixels = np.asarray(Image.open(printed[0]).convert("RGB"))
    assert ui_pixels.shape == (64, 64, 3) and ui_pixels.std() > 0
    Image.fromarray(np.concatenate([ui_pixels, cli_pixels], axis=1)).resize((256, 128), Image.NEAREST).save(
        ui.artifacts / "ui-vs-cli.png"
    )
    diff = np.abs(ui_pixels.astype(int) - cli_pixels.astype(int))
    assert diff.max() == 0, f"{int((diff > 0).any(axis=2).sum())} pixels differ, max difference {diff.max()}"
    assert ui.our_errors() == []


def test_new_train_node_seed_starts_fixed(ui, node_types):
    """ComfyUI gives an INT named seed a "randomize" control; ours starts "fixed" (no new run at every queue)."""
    values = ui.js(
        """() => {
      const node = LiteGraph.createNode('LoraWorkbenchTrain');
      app.graph.add(node);
      const seed = node.widgets.find(w => w.name === 'seed');
      const controls = (seed.linkedWidgets ?? []).map(w => w.value);
      const sampler = LiteGraph.createNode('KSampler');
      app.graph.add(sampler);
      const samplerSeed = sampler.widgets.find(w => w.name === 'seed');
      return {ours: controls, ksampler: (samplerSeed.linkedWidgets ?? []).map(w => w.value)};
    }"""
    )
    assert values["ours"] == ["fixed"], values
    assert values["ksampler"] == ["randomize"], f"ComfyUI's own default, for contrast: {values}"


def test_cancel_in_the_browser_keeps_the_cancel_step_and_resumes(ui, node_types, comfy_base):
    """Queue, Cancel mid-run (the request the Cancel button sends), find the checkpoint at the step the view
    shows, then queue again with resume on: it continues from there to the end."""
    page = ui.page
    workflow = json.loads(EXAMPLE.read_text())
    workflow["id"] = "b3d5c0de-0000-4000-8000-000000000014"
    ui.js("async (g) => { await app.loadGraphData(g); }", workflow)
    ui.js(PRUNE_EXAMPLE, [[1, 2, 3, 12], 400, 101, "browser_cancel"])
    ui.js("() => { const w = app.graph.getNodeById(3).widgets.find(w => w.name === 'resume'); w.value = true; }")
    checkpoint = comfy_base / "output" / "lora_workbench" / "checkpoints" / "browser_cancel" / "checkpoint.json"
    page.locator(RUN).first.click()
    page.wait_for_function(
        f"() => {{ const s = ({VIEW_STEP})(); return s && s.step >= 3; }}", timeout=120_000, polling=50
    )
    page.evaluate("async () => { await fetch('/interrupt', {method: 'POST'}); }")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=lw-train-progress]')?.dataset.status === 'done'",
        timeout=60_000,
        polling=100,
    )
    cancelled = ui.js(SAMPLE)
    ui.screenshot("train-cancelled")
    step = json.loads(checkpoint.read_text())["step"]
    ckpt_file = f"browser_cancel/step-{step:06d}.safetensors"
    assert 3 <= step < 400 and cancelled["outcome"] == "cancelled", (step, cancelled)
    # The view stops at the step the checkpoint holds, names that checkpoint, and shows no time remaining.
    assert cancelled["line"] == f"Cancelled at step {step}; checkpoint {ckpt_file}", (step, cancelled)
    assert cancelled["stepText"] == f"Step {step}/400" and cancelled["eta"] is None, cancelled
    assert Path(cancelled["fileTip"]).is_file() and cancelled["fileTip"].endswith(ckpt_file), cancelled

    # Resumed: the view says so while it runs, with the checkpoint's losses drawn before the new ones.
    set_steps = "(n) => { app.graph.getNodeById(3).widgets.find(w => w.name === 'steps').value = n; }"
    ui.js(set_steps, step + 6)
    page.locator(RUN).first.click()
    page.wait_for_function(
        "(s) => { const r = document.querySelector('[data-testid=lw-train-progress]');"
        " return r?.dataset.status === 'running' && Number(r.dataset.step) > s; }",
        arg=step,
        timeout=120_000,
        polling=50,
    )
    resumed = ui.js(SAMPLE)
    ui.screenshot("train-resumed")
    assert resumed["line"] == f"Running, resumed from step {step}" and resumed["resumedFrom"] == step, resumed
    assert resumed["points"] == resumed["step"] > step, f"the checkpoint's history is in the curve: {resumed}"
    page.wait_for_function(
        "() => document.querySelector('[data-testid=lw-train-progress]')?.dataset.status === 'done'",
        timeout=120_000,
        polling=100,
    )
    finished = ui.js(SAMPLE)
    end_file = f"browser_cancel/step-{step + 6:06d}.safetensors"
    assert finished["line"] == f"Finished at step {step + 6}, resumed from step {step}; checkpoint {end_file}"
    entry = ui.last_prompt()
    summary = entry["outputs"]["3"]["text"][0]
    assert summary.startswith(f"finished after {step + 6}/{step + 6} steps") and f"resumed at step {step}" in summary
    assert json.loads(checkpoint.read_text())["step"] == step + 6

    # Already finished: fewer steps than the checkpoint holds, resume on; the run's curve and numbers stay.
    ui.js(set_steps, step + 4)
    page.locator(RUN).first.click()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=lw-train-progress]')?.dataset.outcome === 'already finished'",
        timeout=120_000,
        polling=100,
    )
    already = ui.js(SAMPLE)
    ui.screenshot("train-already-finished")
    assert already["line"] == f"Already finished at step {step + 6}, nothing trained; checkpoint {end_file}", already
    assert already["points"] == step + 6 and already["pixels"] > 0 and already["loss"] != "Loss -", already
    assert already["elapsed"] != "Elapsed --:--", already
    assert ui.last_prompt()["status"]["status_str"] == "success"
    assert ui.our_errors() == []
