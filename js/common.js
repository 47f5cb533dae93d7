// Shared browser-side helpers of LoRA Workbench's extensions: the LoRA list, the info route,
// clipboard, styles. Defines things only (ComfyUI loads every .js under js/ as a module).
import { api } from "../../scripts/api.js";

import { InfoCache, infoRows } from "./lib/info.js";

let loraListPromise = null;
let loraListValue = null;
const listeners = new Set();

/** ComfyUI's LoRA file list (cached; `refreshLoras` reloads it). */
export function loadLoras() {
  if (!loraListPromise) {
    loraListPromise = api
      .fetchApi("/models/loras", { cache: "no-store" })
      .then((r) => (r.ok ? r.json() : []))
      .catch(() => [])
      .then((list) => {
        loraListValue = Array.isArray(list) ? list : [];
        for (const fn of listeners) fn(loraListValue);
        return loraListValue;
      });
  }
  return loraListPromise;
}

/** The list if loaded, else null. */
export function lorasNow() {
  return loraListValue;
}

/** Call `fn(list)` whenever the list is (re)loaded. Returns an unsubscribe function. */
export function onLorasChanged(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

/** Reload the list and forget cached info (files may have changed on disk). */
export function refreshLoras() {
  loraListPromise = null;
  infoCache.clear();
  return loadLoras();
}

/** Info answers from `GET /lora_workbench/info?name=`, one request per name. */
export const infoCache = new InfoCache(async (name) => {
  const r = await api.fetchApi(`/lora_workbench/info?name=${encodeURIComponent(name)}`, { cache: "no-store" });
  if (!r.ok) {
    const hint = r.status === 404 ? " (the pack's routes are not registered on this server)" : "";
    return { name, exists: null, error: `info request failed: HTTP ${r.status}${hint}`, trigger_words: [] };
  }
  return r.json();
});

/** Copy text to the clipboard; falls back to a hidden textarea where the async API is refused. */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const ta = document.createElement("textarea");
    ta.value = text;
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.append(ta);
    ta.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    ta.remove();
    return ok;
  }
}

/** Create an element: el("div.lw-a.lw-b", {title: "x"}, child, "text"). */
export function el(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const node = document.createElement(tag || "div");
  if (classes.length) node.className = classes.join(" ");
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/** Trigger-word chips; a click copies the word and marks the chip for a moment. */
export function triggerChips(words, root) {
  return words.map((word) =>
    el(
      "button.lw-trigger",
      {
        type: "button",
        title: `Copy "${word}"`,
        dataset: { word },
        onclick: async (e) => {
          e.stopPropagation();
          const chip = e.currentTarget;
          if (await copyText(word)) {
            chip.classList.add("lw-copied");
            if (root) root.dataset.lastCopied = word;
            setTimeout(() => chip.classList.remove("lw-copied"), 1200);
          }
        },
      },
      word,
    ),
  );
}

/** The grid of a LoRA's info (GET /lora_workbench/info): its error, rank, alpha and family rows, and its trigger
 * words as chips (`root` records the last copied one). */
export function infoPanel(info, root) {
  const panel = el("div.lw-panel");
  if (info.error) panel.append(el("span.lw-k", {}, "Error"), el("span.lw-v.lw-error", { dataset: { key: "error" } }, info.error));
  if (info.exists !== false) {
    for (const { key, label, value } of infoRows(info)) {
      panel.append(el("span.lw-k", {}, label), el("span.lw-v", { dataset: { key } }, value));
    }
    const words = info.trigger_words ?? [];
    panel.append(
      el("span.lw-k", {}, "Triggers"),
      el("span.lw-v", { dataset: { key: "trigger_words" } }, words.length ? triggerChips(words, root) : "none"),
    );
  }
  return panel;
}

/** Mark a node's canvas dirty (classic renderer; harmless in Nodes 2.0). */
export function redraw(node) {
  node?.setDirtyCanvas?.(true, true);
  node?.graph?.setDirtyCanvas?.(true, true);
}

const STYLE_ID = "lora-workbench-style";
const CSS = `
.lw-root { box-sizing: border-box; font: 12px/1.3 sans-serif; color: var(--input-text, #ddd);
  display: flex; flex-direction: column; gap: 4px; padding: 2px 0; overflow: hidden; width: 100%; }
.lw-root * { box-sizing: border-box; }
.lw-sub { font-size: 11px; color: var(--descrip-text, #999); white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; height: 18px; display: flex; align-items: center; gap: 3px; }
.lw-sub .lw-status-missing, .lw-error { color: var(--error-text, #f44); }
.lw-trigger { font-size: 11px; padding: 0 5px; height: 16px; line-height: 14px; border-radius: 8px; cursor: copy;
  background: var(--comfy-menu-bg, #333); color: var(--input-text, #ddd); border: 1px solid var(--border-color, #555); }
.lw-trigger.lw-copied { border-color: #4a4; color: #8d8; }
.lw-panel { display: grid; grid-template-columns: auto 1fr; gap: 2px 8px; align-items: baseline; }
.lw-panel .lw-k { color: var(--descrip-text, #999); }
.lw-panel .lw-v { overflow-wrap: anywhere; }
.lw-settings { font-family: monospace; font-size: 11px; white-space: pre-wrap; max-height: 140px; overflow: auto; }
.lw-progress { height: 100%; }
.lw-progress canvas { width: 100%; height: 100%; display: block; background: var(--comfy-input-bg, #222);
  border-radius: 4px; }
.lw-stats { display: flex; flex-direction: column; gap: 1px; flex: none; font-variant-numeric: tabular-nums; }
.lw-stat-line { display: flex; gap: 10px; white-space: nowrap; overflow: hidden; min-width: 0; }
.lw-status { display: -webkit-box; -webkit-box-orient: vertical; -webkit-line-clamp: 2; overflow: hidden;
  overflow-wrap: anywhere; line-height: 15px; height: 30px; flex: none; color: var(--descrip-text, #999); }
.lw-status[data-kind=cancelled] { color: #fa3; }
.lw-status[data-kind=failed] { color: var(--error-text, #f44); }
.lw-status[data-kind=finished], .lw-status[data-kind=already] { color: #8d8; }
.lw-status [data-key=file] { text-decoration: underline dotted; cursor: help; }
.lw-chart { flex: 1 1 0; min-height: 100px; position: relative; }
.lw-result { display: block; height: 100%; overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere;
  font-size: 11px; line-height: 14px; padding: 2px 4px; border-radius: 4px; background: var(--comfy-input-bg, #222); }
.lw-result[data-state=empty] { color: var(--descrip-text, #999); font-style: italic; }
.lw-chart canvas { position: absolute; inset: 0; }
`;

/** Add the pack's shared stylesheet to the page once (the stack editor adds its own rules in stack.js). */
export function injectStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.append(style);
}
