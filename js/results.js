// What a run produced, shown in the node that produced it: Apply LoRA Stack's report and Save LoRA's
// saved file (its name as the LoRA pickers list it, the full path as the tooltip). After Save LoRA
// writes a file the pickers do not list yet, ComfyUI's node definitions are refreshed (what pressing
// R does), so the new LoRA is in every LoRA combo and in our stack editor at once.
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";

import { el, injectStyle, lorasNow, redraw } from "./common.js";

const APPLY = "LoraWorkbenchApplyStack";
const SAVE = "LoraWorkbenchSave";
const WIDGET_NAME = "lora_workbench_result";
const PLACEHOLDER = { [APPLY]: "The report appears here after a run.", [SAVE]: "The saved file appears here." };
const HEIGHT = { [APPLY]: 80, [SAVE]: 32 };

function viewFor(node) {
  if (node.lwResult) return node.lwResult;
  if (typeof node.addDOMWidget !== "function") return null;
  injectStyle();
  const root = el(
    "div.lw-root.lw-result",
    // Nodes 2.0 sizes a DOM widget to its content: the same room as the classic canvas's minimum height.
    { dataset: { testid: "lw-result", state: "empty" }, style: `min-height: ${HEIGHT[node.comfyClass] - 24}px;` },
    PLACEHOLDER[node.comfyClass],
  );
  const widget = node.addDOMWidget(WIDGET_NAME, "lora_workbench_result", root, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => HEIGHT[node.comfyClass],
  });
  widget.serialize = false;
  node.lwResult = root;
  fit(node);
  return root;
}

/** Grow the node (classic canvas) so the result view has its height; never shrink what the user sized. */
function fit(node) {
  if (!node.computeSize || !node.setSize) return;
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
}

/** Show a node's output (the server's `ui` dict) in its result view. */
function show(node, output) {
  const root = viewFor(node);
  if (!root) return;
  const text = output?.text?.[0] ?? "";
  if (node.comfyClass === SAVE) {
    const name = output?.lora_name?.[0] ?? text;
    root.replaceChildren("Saved ", el("b", { dataset: { key: "lora" }, title: text }, name));
    root.title = text;
  } else {
    root.replaceChildren(text);
    root.title = text;
  }
  root.dataset.state = "shown";
  redraw(node);
}

/** The node an event names (subgraph ids as "a:b" resolve to the last part). */
function eventNode(detail) {
  const id = String(detail?.display_node ?? detail?.node ?? "").split(":").pop();
  if (!id) return null;
  return app.graph?.getNodeById?.(id) ?? app.graph?.getNodeById?.(Number(id)) ?? null;
}

app.registerExtension({
  name: "LoraWorkbench.Results",

  async setup() {
    api.addEventListener("executed", async ({ detail }) => {
      const node = eventNode(detail);
      if (!node || (node.comfyClass !== APPLY && node.comfyClass !== SAVE)) return;
      show(node, detail.output);
      const name = detail.output?.lora_name?.[0];
      if (node.comfyClass === SAVE && name && !(lorasNow() ?? []).includes(name)) {
        // ComfyUI's own refresh: every LoRA combo (LoraLoader, ...) and, through LoraWorkbench.Info's
        // refreshComboInNodes hook, our stack editor's list.
        await app.refreshComboInNodes();
      }
    });
  },

  nodeCreated(node) {
    if (node.comfyClass === APPLY || node.comfyClass === SAVE) viewFor(node);
  },
});
