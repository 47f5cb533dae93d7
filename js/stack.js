// LoRA Stack: a rows editor in place of the raw `rows` textarea. The JSON text in the `rows`
// widget stays the single source of truth (it is what workflows save and the Python node
// parses); the editor reads it on load and writes it back on every edit.
import { app } from "../../scripts/app.js";

import { closePopup, nameParts, openCard, openChooser, openMenu, POPUP_CSS } from "./chooser.js";
import {
  el,
  infoCache,
  infoPanel,
  injectStyle,
  loadLoras,
  lorasNow,
  onLorasChanged,
  redraw,
  refreshLoras,
  triggerChips,
} from "./common.js";
import { settingsLines } from "./lib/info.js";
import * as R from "./lib/rows.js";

const NODE_CLASS = "LoraWorkbenchStack";
const ROWS_WIDGET = "rows";
const SEPARATE_CLIP = "separate_clip_strength";
// Layout heights (px) matching STACK_CSS below: the editor is a flex column with GAP between its
// visible parts and PAD / 2 above and below; a row is ROW tall with ROW_GAP between rows.
const PAD = 4;
const GAP = 4;
const HEAD = 16;
const ROW = 46;
const ROW_GAP = 3;
const HINT = 26;
const FOOTER = 22;
const WARNING = 20;
const ERROR = 16;
// A press that moves less than this (px) on a strength box is a click (to type), not a drag.
const DRAG_SLOP = 3;
// Shift held while dragging or scrolling: fine steps.
const FINE_STEP = 0.01;

function setChildren(parent, ...children) {
  parent.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}

/** The rect of an element (for placing a popup) or the pointer position of a mouse event. */
function anchorOf(target) {
  return target instanceof Element ? target.getBoundingClientRect() : target;
}

class StackEditor {
  constructor(node, rowsWidget) {
    this.node = node;
    this.rowsWidget = rowsWidget;
    this.rows = [];
    this.error = null;
    this.root = el("div.lw-root.lw-stack", { dataset: { testid: "lw-stack" } });
    this.errorBox = el("div.lw-error");
    this.toggleAllBox = el("input", {
      type: "checkbox",
      title: "Toggle all: turn every row on, or all off when all are on",
      dataset: { testid: "lw-toggle-all" },
      onchange: () => this.commit(R.toggleAll(this.rows)),
    });
    this.strengthHead = el("span.lw-col", { dataset: { col: "strength" } });
    this.clipHead = el("span.lw-col", { dataset: { col: "strength_clip" }, title: "CLIP (text encoder) strength" }, "CLIP");
    this.head = el(
      "div.lw-head",
      { dataset: { testid: "lw-head" } },
      this.toggleAllBox,
      el("span.lw-head-name", {}, "LoRA"),
      this.strengthHead,
      this.clipHead,
      el("span.lw-menu-spacer"),
    );
    this.list = el("div.lw-rows");
    this.hint = el(
      "div.lw-hint",
      { dataset: { testid: "lw-hint" }, onclick: () => this.pickFile(this.addButton, null) },
      "No LoRAs yet: + Add LoRA to pick a file…",
    );
    this.sumEl = el("span.lw-sum", { dataset: { testid: "lw-sum" } });
    this.warning = el("div.lw-warning", { dataset: { testid: "lw-warning" }, role: "alert" });
    this.clipToggle = el("input", { type: "checkbox", onchange: (e) => this.setSeparateClip(e.target.checked) });
    this.addButton = el(
      "button.lw-add",
      { type: "button", title: "Pick a LoRA file to add", dataset: { testid: "lw-add" }, onclick: (e) => this.pickFile(e.currentTarget, null) },
      "+ Add LoRA",
    );
    const footer = el(
      "div.lw-footer",
      {},
      this.addButton,
      el("label", { title: "Show model and CLIP strength separately" }, this.clipToggle, " CLIP strength"),
      this.sumEl,
    );
    this.root.append(this.errorBox, this.head, this.list, this.hint, footer, this.warning);
    this.unsubscribe = onLorasChanged(() => this.render());
  }

  get separateClip() {
    return Boolean(this.node.properties?.[SEPARATE_CLIP]);
  }

  /** Re-read the rows from the widget value (after load, undo, paste). */
  load() {
    const { rows, error } = R.parseRows(this.rowsWidget.value);
    this.rows = rows;
    this.error = error;
    this.render();
  }

  /** Write rows to the widget (the saved value), then redraw what depends on them. */
  commit(rows, { structural = true } = {}) {
    this.rows = rows;
    this.error = null;
    this.rowsWidget.value = R.serializeRows(rows);
    this.rowsWidget.callback?.(this.rowsWidget.value);
    if (structural) this.render();
    else this.updateSummary();
    redraw(this.node);
  }

  /**
   * Open the LoRA chooser under `anchor`: a pick adds a row (`index` null) or replaces row
   * `index`'s file; Escape changes nothing.
   */
  pickFile(anchor, index) {
    const open = (available) => {
      const row = index === null ? null : this.rows[index];
      openChooser({
        at: anchorOf(anchor),
        available,
        used: this.rows.map((r) => R.resolveLora(r.lora, available) ?? r.lora),
        current: row ? (R.resolveLora(row.lora, available) ?? row.lora) : "",
        title: row ? `Replace ${row.lora || "(none)"}` : "Add LoRA",
        onPick: (name) => {
          if (index === null) {
            this.commit(R.addRow(this.rows, name));
            this.fitNode();
          } else if (this.rows[index]) {
            this.commit(R.updateRow(this.rows, index, { lora: name }));
          }
        },
      });
    };
    const now = lorasNow();
    if (now) open(now);
    else loadLoras().then(open);
  }

  openRowMenu(index, at) {
    const row = this.rows[index];
    if (!row) return;
    const last = this.rows.length - 1;
    openMenu({
      at: anchorOf(at),
      testid: "lw-row-menu",
      items: [
        { label: "Info…", action: "info", disabled: !row.lora, run: () => this.showInfo(index, at) },
        { label: "Choose file…", action: "choose", run: () => this.pickFile(this.nameButton(index) ?? at, index) },
        { label: row.on ? "Turn off" : "Turn on", action: "toggle", run: () => this.commit(R.toggleRow(this.rows, index)) },
        { label: "Move up", action: "up", disabled: index === 0, run: () => this.commit(R.moveRow(this.rows, index, index - 1)) },
        { label: "Move down", action: "down", disabled: index === last, run: () => this.commit(R.moveRow(this.rows, index, index + 1)) },
        {
          label: "Remove",
          action: "remove",
          run: () => {
            this.commit(R.removeRow(this.rows, index));
            this.fitNode();
          },
        },
      ],
    });
  }

  nameButton(index) {
    return this.list.querySelector(`.lw-row[data-index="${index}"] [data-field=lora]`);
  }

  /** The row's LoRA info (the same facts as the LoRA Info node) in a card. */
  showInfo(index, at) {
    const name = this.rows[index]?.lora;
    if (!name) return;
    const body = el("div.lw-card-body", {}, "Reading…");
    const card = openCard({ at: anchorOf(at), testid: "lw-row-info", content: [el("div.lw-card-title", {}, name), body] });
    infoCache.get(name).then((info) => {
      const panel = infoPanel(info, this.root);
      if (info.exists !== false) {
        const settings = settingsLines(info.training_settings).length;
        panel.append(el("span.lw-k", {}, "Training"), el("span.lw-v", {}, settings ? `${settings} settings recorded` : "no settings recorded"));
      }
      body.replaceChildren(panel);
      card.pop.dataset.state = info.error ? "error" : "ready";
      card.place();
    });
  }

  setSeparateClip(on) {
    this.node.properties ??= {};
    this.node.properties[SEPARATE_CLIP] = Boolean(on);
    this.render();
  }

  height() {
    const n = this.rows.length;
    const over = R.overLimit(R.strengthSum(this.rows));
    const parts = [FOOTER];
    if (n) parts.push(HEAD, n * ROW + (n - 1) * ROW_GAP);
    else parts.push(HINT);
    if (over) parts.push(WARNING);
    if (this.error) parts.push(ERROR);
    return PAD + parts.reduce((a, b) => a + b, 0) + (parts.length - 1) * GAP;
  }

  /**
   * Fit the node's height to its content (classic renderer; Nodes 2.0 sizes from the DOM). Adding or
   * removing a row fits exactly; loading only grows, so a node the user enlarged keeps its size.
   */
  fitNode({ shrink = true } = {}) {
    const node = this.node;
    if (!node.computeSize || !node.setSize) return;
    const size = node.computeSize();
    const height = shrink ? size[1] : Math.max(size[1], node.size[1]);
    if (height !== node.size[1] || size[0] > node.size[0]) node.setSize([Math.max(node.size[0], size[0]), height]);
    redraw(node);
  }

  updateSummary() {
    const sum = R.strengthSum(this.rows);
    const over = R.overLimit(sum);
    const changed = this.root.dataset.over !== undefined && this.root.dataset.over !== String(over);
    this.sumEl.textContent = `Total strength ${R.formatStrength(sum)}`;
    this.sumEl.title = this.sumEl.textContent;
    this.root.classList.toggle("lw-over", over);
    this.root.dataset.sum = String(sum);
    this.root.dataset.over = String(over);
    this.warning.textContent = over ? `Total ${R.formatStrength(sum)} > ${R.STRENGTH_LIMIT.toFixed(1)}: images may break` : "";
    this.warning.title = over
      ? `The enabled rows' model strengths add up to ${R.formatStrength(sum)}. Above ${R.STRENGTH_LIMIT.toFixed(1)} ` +
        "images tend to over-bake; lower some strengths."
      : "";
    const missing = R.missingRows(this.rows, lorasNow());
    this.root.dataset.missing = missing.join(",");
    this.list.querySelectorAll(".lw-row").forEach((rowEl, i) => {
      rowEl.classList.toggle("lw-missing", missing.includes(i));
      rowEl.classList.toggle("lw-off", !this.rows[i]?.on);
    });
    const on = this.rows.filter((r) => r.on).length;
    this.toggleAllBox.checked = this.rows.length > 0 && on === this.rows.length;
    this.toggleAllBox.indeterminate = on > 0 && on < this.rows.length;
    if (changed) this.fitNode({ shrink: false });
  }

  render() {
    this.clipToggle.checked = this.separateClip;
    this.errorBox.textContent = this.error ? `${this.error}; editing replaces them.` : "";
    this.errorBox.title = this.errorBox.textContent;
    this.errorBox.style.display = this.error ? "" : "none";
    const empty = this.rows.length === 0;
    this.head.style.display = empty ? "none" : "";
    this.list.style.display = empty ? "none" : "";
    this.hint.style.display = empty ? "" : "none";
    this.strengthHead.textContent = this.separateClip ? "Model" : "Strength";
    this.strengthHead.title = this.separateClip ? "Model (UNet) strength" : "Strength of model and CLIP";
    this.clipHead.style.display = this.separateClip ? "" : "none";
    const available = lorasNow();
    const missing = R.missingRows(this.rows, available);
    this.list.replaceChildren(...this.rows.map((row, i) => this.renderRow(row, i, available, missing.includes(i))));
    this.updateSummary();
    if (this.rows.length !== this.renderedCount) {
      this.renderedCount = this.rows.length;
      this.fitNode({ shrink: false });
    }
  }

  /**
   * A strength box: type a number, drag sideways (one step per few px, Shift for fine steps),
   * scroll over it (in Nodes 2.0 on newer frontends once it has focus), or use the arrow keys. A box left empty or invalid shows the row's real value
   * again when it loses focus.
   */
  strengthBox(i, field, title) {
    const current = () => {
      const row = this.rows[i];
      return field === "strength_clip" ? R.clipStrength(row) : row.strength;
    };
    const input = el("input.lw-num", {
      type: "text",
      inputmode: "decimal",
      autocomplete: "off",
      spellcheck: false,
      value: R.formatStrength(current()),
      title: `${title}. Drag sideways or scroll to change (Shift: finer), click to type.`,
      // Nodes 2.0 sends wheel events over a node to the canvas (zoom) unless the element asks for them;
      // frontend 1.49 grants that only while the element has focus (as for its own widgets).
      dataset: { field, captureWheel: "true" },
    });
    const setValue = (v, show = true) => {
      this.commit(R.updateRow(this.rows, i, { [field]: v }), { structural: false });
      if (show) input.value = R.formatStrength(v);
    };
    const restore = () => {
      if (this.rows[i]) input.value = R.formatStrength(current());
    };
    const stepBy = (steps, fine) => setValue(R.stepStrength(current(), steps, fine ? FINE_STEP : R.STRENGTH_STEP));
    input.addEventListener("input", () => {
      const text = input.value.trim();
      const v = Number(text);
      if (text !== "" && Number.isFinite(v)) setValue(v, false);
    });
    input.addEventListener("change", restore);
    input.addEventListener("blur", restore);
    input.addEventListener("keydown", (e) => {
      e.stopPropagation(); // typing here must not reach the graph's shortcuts
      if (e.key === "Enter" || e.key === "Escape") {
        if (e.key === "Escape") restore();
        input.blur();
      } else if (e.key === "ArrowUp" || e.key === "ArrowDown") {
        e.preventDefault();
        stepBy(e.key === "ArrowUp" ? 1 : -1, e.shiftKey);
      }
    });
    input.addEventListener(
      "wheel",
      (e) => {
        if (!e.deltaY) return;
        e.preventDefault();
        e.stopPropagation();
        stepBy(e.deltaY < 0 ? 1 : -1, e.shiftKey);
      },
      { passive: false },
    );
    // Drag: a press on a box that is not being edited captures the pointer; moving sideways steps
    // the value, letting go without moving focuses the box to type.
    let drag = null;
    input.addEventListener("pointerdown", (e) => {
      if (e.button !== 0 || document.activeElement === input) return;
      e.preventDefault();
      e.stopPropagation();
      input.setPointerCapture?.(e.pointerId);
      drag = { x: e.clientX, start: current(), moved: false };
    });
    input.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x;
      if (!drag.moved && Math.abs(dx) < DRAG_SLOP) return;
      drag.moved = true;
      input.classList.add("lw-dragging");
      const v = R.stepStrength(drag.start, R.dragSteps(dx), e.shiftKey ? FINE_STEP : R.STRENGTH_STEP);
      if (v !== current()) setValue(v);
    });
    const end = (e) => {
      if (!drag) return;
      const clicked = !drag.moved && e.type === "pointerup";
      drag = null;
      input.classList.remove("lw-dragging");
      input.releasePointerCapture?.(e.pointerId);
      if (clicked) {
        input.focus();
        input.select();
      }
    };
    // Chromium still focuses (and selects text) on the mouse events that follow a cancelled pointerdown.
    input.addEventListener("mousedown", (e) => {
      if (drag) e.preventDefault();
    });
    input.addEventListener("pointerup", end);
    input.addEventListener("pointercancel", end);
    return input;
  }

  renderRow(row, i, available, isMissing) {
    const label = !row.lora
      ? [el("span.lw-base", {}, "(choose a LoRA)")]
      : [...nameParts(R.splitName(row.lora)), isMissing ? el("span.lw-missing-tag", {}, " (missing)") : null];
    const name = el(
      "button.lw-name",
      {
        type: "button",
        title: `${row.lora || "No LoRA chosen"}: click to choose another file`,
        dataset: { field: "lora", value: row.lora },
        onclick: (e) => this.pickFile(e.currentTarget, i),
      },
      ...label,
    );
    const line = el(
      "div.lw-line",
      {},
      el("input", {
        type: "checkbox",
        checked: row.on,
        title: "On/off",
        dataset: { field: "on" },
        onchange: (e) => this.commit(R.updateRow(this.rows, i, { on: e.target.checked }), { structural: false }),
      }),
      name,
      this.strengthBox(i, "strength", this.separateClip ? "Model strength" : "Strength (model and CLIP)"),
      this.separateClip ? this.strengthBox(i, "strength_clip", "CLIP strength") : null,
      el(
        "button.lw-icon",
        { type: "button", title: "Row actions (or right-click the row)", dataset: { action: "menu" }, onclick: (e) => this.openRowMenu(i, e.currentTarget) },
        "⋮",
      ),
    );
    const sub = el("div.lw-sub", { dataset: { field: "info" } });
    const rowEl = el("div.lw-row", { dataset: { index: String(i), lora: row.lora } }, line, sub);
    rowEl.addEventListener("contextmenu", (e) => {
      e.preventDefault();
      e.stopPropagation();
      this.openRowMenu(i, { x: e.clientX, y: e.clientY });
    });
    // Nodes 2.0 opens its node menu from the right button's pointerdown; the row has its own.
    rowEl.addEventListener("pointerdown", (e) => {
      if (e.button === 2) e.stopPropagation();
    });
    rowEl.classList.toggle("lw-off", !row.on);
    rowEl.classList.toggle("lw-missing", isMissing);
    this.fillInfo(sub, row, isMissing);
    return rowEl;
  }

  fillInfo(sub, row, isMissing) {
    const clipNote =
      !this.separateClip && row.strength_clip !== null && row.strength_clip !== row.strength
        ? el("span", { title: "This row's CLIP strength differs; tick 'CLIP strength' to edit it" }, `clip ${R.formatStrength(row.strength_clip)}`)
        : null;
    if (!row.lora) {
      setChildren(sub, "No LoRA chosen");
      return;
    }
    if (isMissing) {
      setChildren(sub, el("span.lw-status-missing", { title: "Not in ComfyUI's LoRA list: this row will fail when queued" }, "Missing: not found in models/loras"), clipNote);
      return;
    }
    const show = (info) => {
      const words = info?.trigger_words ?? [];
      if (info?.error && !words.length) setChildren(sub, el("span", { title: info.error }, "no info"), clipNote);
      else if (!words.length) setChildren(sub, "no trigger words", clipNote);
      else setChildren(sub, ...triggerChips(words, this.root), clipNote);
    };
    const cached = infoCache.peek(row.lora);
    if (cached) return show(cached);
    setChildren(sub, "…", clipNote);
    infoCache.get(row.lora).then((info) => {
      if (sub.isConnected || sub.parentElement) show(info);
    });
  }
}

const STYLE_ID = "lora-workbench-stack-style";
const STACK_CSS = `
.lw-stack { padding: ${PAD / 2}px 0; gap: ${GAP}px; }
.lw-stack > .lw-error { height: ${ERROR}px; line-height: ${ERROR}px; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; flex: none; }
.lw-head { display: flex; align-items: center; gap: 3px; height: ${HEAD}px; padding: 0 5px; flex: none;
  font-size: 10px; text-transform: uppercase; letter-spacing: 0.04em; color: var(--descrip-text, #999); }
.lw-head input[type=checkbox] { margin: 0; }
.lw-head-name { flex: 1 1 auto; min-width: 0; padding-left: 3px; }
.lw-col { flex: none; width: 48px; text-align: center; }
.lw-menu-spacer { flex: none; width: 18px; }
.lw-rows { display: flex; flex-direction: column; gap: ${ROW_GAP}px; overflow-y: auto; min-height: 0; }
.lw-row { display: flex; flex-direction: column; gap: 1px; height: ${ROW}px; flex: none; padding: 2px 4px;
  border-radius: 4px; background: var(--comfy-input-bg, #222); border: 1px solid transparent; }
.lw-row.lw-off .lw-name, .lw-row.lw-off .lw-num, .lw-row.lw-off .lw-sub { opacity: 0.45; }
.lw-row.lw-missing { border-color: var(--error-text, #f44); }
.lw-line { display: flex; align-items: center; gap: 3px; min-width: 0; height: 22px; }
.lw-line input[type=checkbox] { margin: 0; flex: none; }
.lw-name { flex: 1 1 auto; min-width: 60px; height: 20px; padding: 0 5px; display: block; text-align: left;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; cursor: pointer; font: inherit; color: inherit;
  background: var(--comfy-menu-bg, #333); border: 1px solid var(--border-color, #555); border-radius: 3px; }
.lw-name:hover { border-color: var(--descrip-text, #999); }
.lw-name .lw-ext { font-size: 10px; }
.lw-missing-tag { color: var(--error-text, #f44); }
.lw-num { flex: none; width: 48px; height: 20px; padding: 0 2px; text-align: center; cursor: ew-resize;
  font: inherit; font-variant-numeric: tabular-nums; color: inherit; background: var(--comfy-menu-bg, #333);
  border: 1px solid var(--border-color, #555); border-radius: 3px; }
.lw-num:focus { cursor: text; outline: none; border-color: var(--p-primary-color, #5a8be0); }
.lw-num.lw-dragging { border-color: var(--p-primary-color, #5a8be0); }
.lw-icon { flex: none; width: 18px; height: 20px; padding: 0; font-size: 12px; line-height: 18px; cursor: pointer;
  background: none; color: inherit; border: 1px solid transparent; border-radius: 3px; }
.lw-icon:hover { border-color: var(--border-color, #555); background: var(--comfy-menu-bg, #333); }
.lw-hint { height: ${HINT}px; line-height: ${HINT - 2}px; flex: none; padding: 0 8px; border-radius: 4px;
  border: 1px dashed var(--border-color, #555); color: var(--descrip-text, #999); font-style: italic; cursor: pointer;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.lw-footer { display: flex; align-items: center; gap: 6px; flex-wrap: nowrap; height: ${FOOTER}px; flex: none;
  white-space: nowrap; min-width: 0; }
.lw-footer > * { flex: none; }
.lw-footer label { display: flex; align-items: center; gap: 3px; cursor: pointer; }
.lw-footer button.lw-add { height: ${FOOTER}px; padding: 0 8px; cursor: pointer; background: var(--comfy-menu-bg, #333);
  color: inherit; border: 1px solid var(--border-color, #555); border-radius: 3px; font: inherit; }
.lw-sum { margin-left: auto; flex: 0 1 auto !important; min-width: 0; overflow: hidden; text-overflow: ellipsis;
  font-variant-numeric: tabular-nums; }
.lw-warning { display: none; flex: none; color: #111; background: #fa3; border-radius: 3px; padding: 0 6px;
  height: ${WARNING}px; line-height: ${WARNING}px; font-weight: 600; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.lw-root.lw-over .lw-warning { display: block; }
.lw-root.lw-over .lw-sum { color: #fa3; font-weight: 600; }
${POPUP_CSS}`;

function injectStackStyle() {
  injectStyle();
  if (document.getElementById(STYLE_ID)) return;
  document.head.append(el("style", { id: STYLE_ID }, STACK_CSS));
}

app.registerExtension({
  name: "LoraWorkbench.Stack",

  async setup() {
    injectStackStyle();
    loadLoras();
  },

  // Refresh (the R key, "Refresh node definitions"): the LoRA folder may have changed.
  async refreshComboInNodes() {
    await refreshLoras();
  },

  nodeCreated(node) {
    if (node.comfyClass !== NODE_CLASS) return;
    const rowsWidget = node.widgets?.find((w) => w.name === ROWS_WIDGET);
    if (!rowsWidget) return;
    injectStackStyle();
    // Hide the raw JSON in both renderers: `hidden` for the canvas (type "hidden" also gives the
    // textarea no layout height), `options.hidden` for Nodes 2.0. Its value is still saved and sent.
    // The options object is changed in place: frontend 1.49 keeps that very object in its widget
    // store, which Nodes 2.0 reads, so a replaced object would go unseen there.
    rowsWidget.hidden = true;
    rowsWidget.type = "hidden";
    rowsWidget.options ??= {};
    rowsWidget.options.hidden = true;
    node.properties ??= {};
    if (!(SEPARATE_CLIP in node.properties)) node.properties[SEPARATE_CLIP] = false;

    const editor = new StackEditor(node, rowsWidget);
    let widget = null;
    widget = node.addDOMWidget("lora_rows_editor", "lora_workbench_rows", editor.root, {
      // The rows live in the `rows` widget; this one is only a view, never saved or sent.
      serialize: false,
      hideOnZoom: false,
      getValue: () => rowsWidget.value,
      setValue: () => {},
      // The classic canvas places the element `margin` px inside the height it reserves on each side;
      // Nodes 2.0 lays the element out without that margin.
      getMinHeight: () => editor.height() + (globalThis.LiteGraph?.vueNodesMode ? 0 : 2 * (widget?.margin ?? 10)),
    });
    widget.serialize = false;
    node.lwStackEditor = editor;

    const onConfigure = node.onConfigure;
    node.onConfigure = function (...args) {
      const r = onConfigure?.apply(this, args);
      editor.configured = true;
      editor.load();
      return r;
    };
    const onRemoved = node.onRemoved;
    node.onRemoved = function (...args) {
      editor.unsubscribe();
      closePopup();
      return onRemoved?.apply(this, args);
    };
    editor.load();
    loadLoras().then(() => editor.render());
    // A new node fits its content exactly; one loaded from a workflow keeps a size the user enlarged.
    requestAnimationFrame(() => editor.fitNode({ shrink: !editor.configured }));
  },
});
