// LoRA Stack: a rows editor in place of the raw `rows` textarea. The JSON text in the `rows`
// widget stays the single source of truth (it is what workflows save and the Python node
// parses); the editor reads it on load and writes it back on every edit.
import { app } from "../../scripts/app.js";

import {
  el,
  infoCache,
  injectStyle,
  loadLoras,
  lorasNow,
  onLorasChanged,
  redraw,
  refreshLoras,
  triggerChips,
} from "./common.js";
import * as R from "./lib/rows.js";

const NODE_CLASS = "LoraWorkbenchStack";
const ROWS_WIDGET = "rows";
const SEPARATE_CLIP = "separate_clip_strength";
// Layout heights (px) matching the stylesheet in common.js: a row plus the gap, the footer
// line with padding, the warning line, the error line.
const ROW_HEIGHT = 49;
const FOOTER_HEIGHT = 34;
const WARNING_HEIGHT = 24;
const ERROR_HEIGHT = 18;

function setChildren(parent, ...children) {
  parent.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}

class StackEditor {
  constructor(node, rowsWidget) {
    this.node = node;
    this.rowsWidget = rowsWidget;
    this.rows = [];
    this.error = null;
    this.root = el("div.lw-root.lw-stack", { dataset: { testid: "lw-stack" } });
    this.errorBox = el("div.lw-error");
    this.list = el("div.lw-rows");
    this.sumEl = el("span.lw-sum", { dataset: { testid: "lw-sum" } });
    this.warning = el("div.lw-warning", { dataset: { testid: "lw-warning" }, role: "alert" });
    this.clipToggle = el("input", { type: "checkbox", onchange: (e) => this.setSeparateClip(e.target.checked) });
    const footer = el(
      "div.lw-footer",
      {},
      el("button.lw-add", { type: "button", dataset: { testid: "lw-add" }, onclick: () => this.add() }, "+ Add LoRA"),
      el("label", { title: "Show model and CLIP strength separately" }, this.clipToggle, " CLIP strength"),
      this.sumEl,
    );
    this.root.append(this.errorBox, this.list, footer, this.warning);
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

  add() {
    const available = lorasNow() ?? [];
    this.commit(R.addRow(this.rows, R.nextLora(this.rows, available)));
    this.fitNode();
  }

  setSeparateClip(on) {
    this.node.properties ??= {};
    this.node.properties[SEPARATE_CLIP] = Boolean(on);
    this.render();
  }

  height() {
    const over = R.overLimit(R.strengthSum(this.rows));
    return (
      FOOTER_HEIGHT + this.rows.length * ROW_HEIGHT + (over ? WARNING_HEIGHT : 0) + (this.error ? ERROR_HEIGHT : 0)
    );
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
    if (changed) this.fitNode({ shrink: false });
  }

  render() {
    this.clipToggle.checked = this.separateClip;
    this.errorBox.textContent = this.error ? `${this.error}; editing replaces them.` : "";
    this.errorBox.style.display = this.error ? "" : "none";
    const available = lorasNow();
    const missing = R.missingRows(this.rows, available);
    this.list.replaceChildren(...this.rows.map((row, i) => this.renderRow(row, i, available, missing.includes(i))));
    this.updateSummary();
    if (this.rows.length !== this.renderedCount) {
      this.renderedCount = this.rows.length;
      this.fitNode({ shrink: false });
    }
  }

  renderRow(row, i, available, isMissing) {
    const n = this.rows.length;
    const set = (patch, structural = false) => this.commit(R.updateRow(this.rows, i, patch), { structural });
    const strengthInput = (value, field, title) =>
      el("input", {
        type: "number",
        step: "0.05",
        value: R.formatStrength(value),
        title,
        dataset: { field },
        oninput: (e) => {
          const v = Number(e.target.value);
          if (e.target.value.trim() !== "" && Number.isFinite(v)) set({ [field]: v });
        },
      });
    const select = el("select", {
      title: row.lora,
      dataset: { field: "lora" },
      onchange: (e) => set({ lora: e.target.value }, true),
    });
    const groups = R.groupByFolder(available ?? []);
    if (!available || isMissing || !row.lora) {
      const label = !row.lora ? "(choose a LoRA)" : isMissing ? `${row.lora} (missing)` : row.lora;
      select.append(el("option", { value: row.lora }, label));
    }
    for (const { folder, names } of groups) {
      const parent = folder ? el("optgroup", { label: folder }) : select;
      for (const name of names) parent.append(el("option", { value: name }, folder ? name.slice(folder.length + 1) : name));
      if (folder) select.append(parent);
    }
    select.value = available && !isMissing ? (R.resolveLora(row.lora, available) ?? row.lora) : row.lora;

    const line = el(
      "div.lw-line",
      {},
      el("input", {
        type: "checkbox",
        checked: row.on,
        title: "On/off",
        dataset: { field: "on" },
        onchange: (e) => set({ on: e.target.checked }),
      }),
      select,
      strengthInput(row.strength, "strength", this.separateClip ? "Model strength" : "Strength (model and CLIP)"),
      this.separateClip ? strengthInput(R.clipStrength(row), "strength_clip", "CLIP strength") : null,
      el("button.lw-icon", { type: "button", title: "Move up", disabled: i === 0, dataset: { action: "up" }, onclick: () => this.commit(R.moveRow(this.rows, i, i - 1)) }, "▲"),
      el("button.lw-icon", { type: "button", title: "Move down", disabled: i === n - 1, dataset: { action: "down" }, onclick: () => this.commit(R.moveRow(this.rows, i, i + 1)) }, "▼"),
      el("button.lw-icon", { type: "button", title: "Remove", dataset: { action: "remove" }, onclick: () => { this.commit(R.removeRow(this.rows, i)); this.fitNode(); } }, "✕"),
    );
    const sub = el("div.lw-sub", { dataset: { field: "info" } });
    const rowEl = el("div.lw-row", { dataset: { index: String(i), lora: row.lora } }, line, sub);
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

app.registerExtension({
  name: "LoraWorkbench.Stack",

  async setup() {
    injectStyle();
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
    injectStyle();
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
    const widget = node.addDOMWidget("lora_rows_editor", "lora_workbench_rows", editor.root, {
      // The rows live in the `rows` widget; this one is only a view, never saved or sent.
      serialize: false,
      hideOnZoom: false,
      getValue: () => rowsWidget.value,
      setValue: () => {},
      getMinHeight: () => editor.height(),
    });
    widget.serialize = false;
    node.lwStackEditor = editor;

    const onConfigure = node.onConfigure;
    node.onConfigure = function (...args) {
      const r = onConfigure?.apply(this, args);
      editor.load();
      return r;
    };
    const onRemoved = node.onRemoved;
    node.onRemoved = function (...args) {
      editor.unsubscribe();
      return onRemoved?.apply(this, args);
    };
    editor.load();
    loadLoras().then(() => editor.render());
    requestAnimationFrame(() => editor.fitNode({ shrink: false }));
  },
});
