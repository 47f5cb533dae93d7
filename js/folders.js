// Image Folder Dataset's folder picker: a "choose folder" button lists the sub-folders of ComfyUI's input
// folder (GET /lora_workbench/input_folders) with their image counts; picking one sets the `folder` text
// widget, which still takes any name typed into it. A button widget and a list of our own on <body> work
// alike in the classic canvas and in Nodes 2.0, on both frontends. The button is last among the node's
// widgets and not saved, so saved workflows keep their widget values in the same order.
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";

import { el, redraw } from "./common.js";

const NODE_CLASS = "LoraWorkbenchImageFolder";
const FOLDER_WIDGET = "folder";
const BUTTON = "choose folder";
const STYLE_ID = "lora-workbench-folders-style";
const CSS = `
.lw-folders { position: fixed; z-index: 10000; box-sizing: border-box; min-width: 220px; max-width: 420px;
  max-height: 60vh; overflow-y: auto; padding: 4px; display: flex; flex-direction: column; gap: 2px;
  font: 12px/1.3 sans-serif; color: var(--input-text, #ddd); background: var(--comfy-menu-bg, #353535);
  border: 1px solid var(--border-color, #4e4e4e); border-radius: 6px; box-shadow: 0 4px 16px rgba(0, 0, 0, 0.45); }
.lw-folders-title { padding: 2px 4px; color: var(--descrip-text, #999); font-size: 11px; }
.lw-folders button { display: flex; justify-content: space-between; gap: 12px; width: 100%; padding: 4px 6px;
  text-align: left; font: inherit; color: inherit; background: transparent; border: 0; border-radius: 4px;
  cursor: pointer; }
.lw-folders button:hover, .lw-folders button:focus { background: var(--comfy-input-bg, #222); outline: none; }
.lw-folders button.lw-current { font-weight: bold; }
.lw-folders .lw-count { color: var(--descrip-text, #999); white-space: nowrap; }
.lw-folders-empty { padding: 4px 6px; max-width: 320px; }
`;

// Where the last press was: the button's callback gets no event in Nodes 2.0, and the list opens there.
let lastPointer = { x: 200, y: 200 };
let openList = null;

function injectStyle() {
  if (document.getElementById(STYLE_ID)) return;
  document.head.append(el("style", { id: STYLE_ID }, CSS));
}

/** The input folder's sub-folders: `[{name, images}]`. */
export async function inputFolders() {
  const response = await api.fetchApi("/lora_workbench/input_folders");
  if (!response.ok) throw new Error(`input folders: HTTP ${response.status}`);
  return (await response.json()).folders ?? [];
}

function closeList() {
  openList?.();
  openList = null;
}

/** Show the folders next to the pointer; `onPick(name)` when one is chosen. */
function showList(folders, current, onPick) {
  closeList();
  injectStyle();
  const items = folders.map(({ name, images }) =>
    el(
      "button",
      {
        type: "button",
        class: name === current ? "lw-current" : undefined,
        dataset: { folder: name },
        onclick: () => {
          closeList();
          onPick(name);
        },
      },
      el("span", {}, name),
      el("span.lw-count", {}, `${images} image${images === 1 ? "" : "s"}`),
    ),
  );
  const body = items.length
    ? items
    : [el("div.lw-folders-empty", {}, "No folders in ComfyUI's input folder yet: put your images in one (input/my_dog).")];
  const list = el(
    "div.lw-folders",
    { role: "menu", dataset: { testid: "lw-folders" } },
    el("div.lw-folders-title", {}, "Folders in ComfyUI's input folder"),
    ...body,
  );
  document.body.append(list);
  const box = list.getBoundingClientRect();
  list.style.left = `${Math.max(4, Math.min(lastPointer.x, window.innerWidth - box.width - 4))}px`;
  list.style.top = `${Math.max(4, Math.min(lastPointer.y + 4, window.innerHeight - box.height - 4))}px`;
  const outside = (e) => {
    if (!list.contains(e.target)) closeList();
  };
  const onKey = (e) => {
    if (e.key === "Escape") closeList();
    e.stopPropagation(); // keys typed here are not the graph's shortcuts
  };
  // Added after this press has ended, so the press that opened the list does not close it.
  setTimeout(() => document.addEventListener("pointerdown", outside, true), 0);
  list.addEventListener("keydown", onKey);
  items[0]?.focus({ preventScroll: true });
  openList = () => {
    document.removeEventListener("pointerdown", outside, true);
    list.remove();
  };
}

app.registerExtension({
  name: "LoraWorkbench.Folders",

  setup() {
    document.addEventListener("pointerdown", (e) => (lastPointer = { x: e.clientX, y: e.clientY }), true);
  },

  nodeCreated(node) {
    if (node.comfyClass !== NODE_CLASS) return;
    const folder = node.widgets?.find((w) => w.name === FOLDER_WIDGET);
    if (!folder) return;
    const button = node.addWidget("button", BUTTON, null, async () => {
      let folders;
      try {
        folders = await inputFolders();
      } catch (e) {
        console.warn("LoRA Workbench:", e);
        folders = [];
      }
      showList(folders, folder.value, (name) => {
        folder.value = name;
        folder.callback?.(name);
        redraw(node);
      });
    }, { serialize: false });
    button.label = BUTTON;
    button.serialize = false;
    button.tooltip = "Pick one of the folders in ComfyUI's input folder (or type any name into folder).";
  },
});
