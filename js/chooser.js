// Small popups of the LoRA Stack editor: the searchable LoRA chooser, the row menu and a row's info
// card. DOM elements of our own on <body> (ComfyUI's frontend has no reusable filterable list that
// works in both renderings), styled with ComfyUI's CSS variables. Defines things only.
import { el } from "./common.js";
import { filterLoras, initialIndex, moveHighlight } from "./lib/chooser.js";

let openPopup = null;

/** Close whichever popup is open (one at a time, as menus behave). */
export function closePopup() {
  openPopup?.close();
}

/**
 * Put a fixed-position popup next to an anchor: below it (or above when the viewport has no room),
 * kept inside the viewport. `at` is a DOMRect-like box or a point {x, y}.
 */
function place(pop, at) {
  const box = "left" in at ? at : { left: at.x, right: at.x, top: at.y, bottom: at.y, width: 0 };
  const vw = window.innerWidth;
  const vh = window.innerHeight;
  pop.style.left = "0px";
  pop.style.top = "0px";
  const r = pop.getBoundingClientRect();
  let left = Math.min(box.left, vw - r.width - 4);
  let top = box.bottom + 2;
  if (top + r.height > vh - 4 && box.top - r.height - 2 >= 4) top = box.top - r.height - 2;
  top = Math.max(4, Math.min(top, vh - r.height - 4));
  left = Math.max(4, left);
  pop.style.left = `${Math.round(left)}px`;
  pop.style.top = `${Math.round(top)}px`;
}

/**
 * Show `pop` on <body> until Escape, a click outside, or `close()`. Returns the close function.
 * Key presses inside stay inside: ComfyUI's own shortcuts (Delete, Ctrl+A, letters) must not act
 * on the graph while the user types in a popup.
 */
function show(pop, at, onClose) {
  closePopup();
  document.body.append(pop);
  place(pop, at);
  const outside = (e) => {
    if (!pop.contains(e.target)) close();
  };
  const onKey = (e) => {
    if (e.key === "Escape") {
      e.preventDefault();
      close();
    }
    e.stopPropagation();
  };
  let closed = false;
  function close() {
    if (closed) return;
    closed = true;
    document.removeEventListener("pointerdown", outside, true);
    document.removeEventListener("wheel", outside, true);
    window.removeEventListener("resize", close);
    pop.remove();
    if (openPopup?.pop === pop) openPopup = null;
    onClose?.();
  }
  // Capture phase: the canvas stops some pointer events from bubbling. A wheel outside zooms or pans
  // the canvas, which would leave the popup beside nothing.
  document.addEventListener("pointerdown", outside, true);
  document.addEventListener("wheel", outside, { capture: true, passive: true });
  window.addEventListener("resize", close);
  pop.addEventListener("keydown", onKey);
  pop.addEventListener("keyup", (e) => e.stopPropagation());
  pop.addEventListener("keypress", (e) => e.stopPropagation());
  // Wheel inside scrolls the list, not the canvas behind.
  pop.addEventListener("wheel", (e) => e.stopPropagation(), { passive: true });
  pop.addEventListener("contextmenu", (e) => {
    e.preventDefault();
    e.stopPropagation();
  });
  openPopup = { pop, close };
  return close;
}

/** The parts of a LoRA name for display: dim folder prefix, the stem, a dim extension. */
export function nameParts({ folder, base, ext }) {
  return [folder ? el("span.lw-folder", {}, folder) : null, el("span.lw-base", {}, base), el("span.lw-ext", {}, ext)];
}

/**
 * Open the searchable LoRA chooser.
 * @param {object} opts
 * @param {DOMRect|{x:number,y:number}} opts.at where to show it
 * @param {string[]} opts.available ComfyUI's LoRA list
 * @param {string[]} [opts.used] files the stack already has (marked, and skipped by the first highlight)
 * @param {string} [opts.current] the file the row has now (highlighted)
 * @param {string} [opts.title] the heading ("Add LoRA", "Replace ...")
 * @param {(name: string) => void} opts.onPick called with the chosen name; not called on Escape
 * @returns {() => void} close
 */
export function openChooser({ at, available, used = [], current = "", title = "Add LoRA", onPick }) {
  const search = el("input.lw-search", {
    type: "text",
    placeholder: "Search LoRAs (folder/name)…",
    spellcheck: false,
    autocomplete: "off",
    dataset: { testid: "lw-chooser-search" },
  });
  const list = el("div.lw-pop-list", { role: "listbox" });
  const count = el("span.lw-pop-count");
  const pop = el(
    "div.lw-pop.lw-chooser",
    { dataset: { testid: "lw-chooser" } },
    el("div.lw-pop-title", {}, el("span", {}, title), count),
    search,
    list,
    el("div.lw-pop-keys", {}, "↑↓ move · Enter pick · Esc close"),
  );
  const usedSet = new Set(used);
  let entries = [];
  let active = -1;

  const highlight = (i, scroll = true) => {
    active = i;
    list.querySelectorAll(".lw-pop-item").forEach((item, j) => {
      item.classList.toggle("lw-active", j === i);
      item.setAttribute("aria-selected", String(j === i));
      if (j === i && scroll) item.scrollIntoView({ block: "nearest" });
    });
    pop.dataset.active = i >= 0 ? entries[i].name : "";
  };
  const pick = (i) => {
    const entry = entries[i];
    if (!entry) return;
    close();
    onPick(entry.name);
  };
  const render = () => {
    const query = search.value;
    entries = filterLoras(available, query);
    list.replaceChildren(
      ...entries.map((entry, i) =>
        el(
          "div.lw-pop-item",
          {
            role: "option",
            title: entry.name,
            dataset: { name: entry.name, index: String(i) },
            onpointermove: () => active !== i && highlight(i, false),
            // pointerdown would also start the outside-click check; pick on click like a menu.
            onclick: () => pick(i),
          },
          ...nameParts(entry),
          usedSet.has(entry.name) ? el("span.lw-used", { title: "Already in this stack" }, "in stack") : null,
        ),
      ),
    );
    if (!entries.length) {
      list.append(
        el("div.lw-pop-empty", {}, available.length ? `No LoRA matches "${query.trim()}"` : "No LoRAs in models/loras"),
      );
    }
    count.textContent = `${entries.length} of ${available.length}`;
    highlight(initialIndex(entries, { used, current, query }));
  };
  search.addEventListener("input", render);
  search.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      pick(active);
      return;
    }
    const next = moveHighlight(active, entries.length, e.key);
    if (next !== active || ["ArrowDown", "ArrowUp", "PageDown", "PageUp"].includes(e.key)) {
      e.preventDefault();
      highlight(next);
    }
  });
  render();
  const close = show(pop, at);
  search.focus();
  return close;
}

/**
 * Open a menu of actions.
 * @param {object} opts
 * @param {DOMRect|{x:number,y:number}} opts.at
 * @param {{label: string, action: string, disabled?: boolean, run: () => void}[]} opts.items
 * @param {string} [opts.testid]
 * @returns {() => void} close
 */
export function openMenu({ at, items, testid = "lw-menu" }) {
  const buttons = items.map((item) =>
    el(
      "button.lw-pop-item.lw-menu-item",
      {
        type: "button",
        disabled: Boolean(item.disabled),
        dataset: { action: item.action },
        onclick: () => {
          close();
          item.run();
        },
      },
      item.label,
    ),
  );
  const pop = el("div.lw-pop.lw-menu", { role: "menu", dataset: { testid } }, ...buttons);
  // Arrow keys walk the enabled items, as in a native menu.
  pop.addEventListener("keydown", (e) => {
    const enabled = buttons.filter((b) => !b.disabled);
    const i = enabled.indexOf(document.activeElement);
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      const next = moveHighlight(i, enabled.length, e.key);
      enabled[next]?.focus();
    }
  });
  const close = show(pop, at);
  buttons.find((b) => !b.disabled)?.focus({ preventScroll: true });
  return close;
}

/**
 * Show a card of content (a row's LoRA info) until Escape or a click outside.
 * @param {{at: DOMRect|{x:number,y:number}, content: Node[], testid?: string}} opts
 * @returns {{pop: HTMLElement, close: () => void, place: () => void}}
 */
export function openCard({ at, content, testid = "lw-card" }) {
  const pop = el("div.lw-pop.lw-card", { dataset: { testid }, tabindex: "-1" }, ...content);
  const close = show(pop, at);
  pop.focus({ preventScroll: true });
  return { pop, close, place: () => place(pop, at) };
}

export const POPUP_CSS = `
.lw-pop { position: fixed; z-index: 10000; box-sizing: border-box; font: 12px/1.3 sans-serif;
  color: var(--input-text, #ddd); background: var(--comfy-menu-bg, #353535);
  border: 1px solid var(--border-color, #4e4e4e); border-radius: 6px; box-shadow: 0 4px 16px rgba(0, 0, 0, 0.45);
  padding: 4px; display: flex; flex-direction: column; gap: 3px; }
.lw-pop * { box-sizing: border-box; }
.lw-chooser { width: 340px; max-width: calc(100vw - 8px); }
.lw-pop-title { display: flex; justify-content: space-between; gap: 8px; padding: 1px 3px;
  color: var(--descrip-text, #999); font-size: 11px; }
.lw-pop .lw-search { width: 100%; height: 24px; padding: 0 6px; font-size: 12px; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #4e4e4e); border-radius: 4px;
  outline: none; }
.lw-pop .lw-search:focus { border-color: var(--p-primary-color, #5a8be0); }
.lw-pop-list { max-height: 280px; overflow-y: auto; display: flex; flex-direction: column; }
.lw-pop-item { display: flex; align-items: baseline; gap: 0; min-height: 22px; padding: 3px 6px; border-radius: 3px;
  cursor: pointer; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; text-align: left;
  font: inherit; color: inherit; background: none; border: none; width: 100%; }
.lw-pop-item.lw-active, .lw-menu-item:not(:disabled):hover, .lw-menu-item:focus {
  background: var(--comfy-input-bg, #222); outline: none; }
.lw-pop-item.lw-active { box-shadow: inset 2px 0 0 var(--p-primary-color, #5a8be0); }
.lw-folder, .lw-ext { color: var(--descrip-text, #999); }
.lw-ext { font-size: 10px; }
.lw-used { margin-left: auto; padding-left: 8px; font-size: 10px; color: var(--descrip-text, #999); }
.lw-pop-empty { padding: 6px; color: var(--descrip-text, #999); font-style: italic; }
.lw-pop-keys { padding: 1px 3px; font-size: 10px; color: var(--descrip-text, #999); }
.lw-menu { min-width: 140px; padding: 3px; gap: 0; }
.lw-menu-item:disabled { opacity: 0.4; cursor: default; }
.lw-card { width: 300px; max-width: calc(100vw - 8px); padding: 6px 8px; outline: none; }
.lw-card .lw-card-title { font-weight: 600; overflow-wrap: anywhere; }
`;
