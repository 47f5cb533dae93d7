// Short input labels (the schema's `display_name` of an input, e.g. "batch size" for batch_size) on the
// pack's nodes. Frontend 1.49 shows them by itself; 1.32 labels a widget with its input name only.
// The input names are unchanged: workflows, prompts and the server use them.
// Advanced inputs ("advanced": true in the node definition): frontend 1.49 hides them behind "Show
// advanced" by itself, in both renderings. 1.32's canvas has half of it (litegraph's `widget.advanced`, the
// node menu's "Show Advanced"): it does not copy the flag onto widgets and lays out hidden ones as gaps; this
// does both. 1.32's Nodes 2.0 shows every widget.
import { app } from "../../scripts/app.js";

const PREFIX = "LoraWorkbench";

/** `{input name: display_name}` of a node definition (V1 format: input.required / input.optional). */
export function displayNames(nodeData) {
  const names = {};
  for (const group of [nodeData?.input?.required, nodeData?.input?.optional]) {
    for (const [name, spec] of Object.entries(group ?? {})) {
      const label = Array.isArray(spec) ? spec[1]?.display_name : undefined;
      if (typeof label === "string" && label) names[name] = label;
    }
  }
  return names;
}

/**
 * Frontend 1.32's canvas: mark the widget advanced (not drawn until "Show Advanced") and give it no height
 * meanwhile, since that frontend's widget layout keeps room for every widget, drawn or not.
 */
function hideWhenNotAdvanced(node, widget) {
  widget.advanced = true;
  const own = widget.computeSize;
  widget.computeSize = function (width) {
    if (!node.showAdvanced) return [0, -4];
    return own ? own.call(this, width) : [width, LiteGraph.NODE_WIDGET_HEIGHT];
  };
}

/** Size the node to its shown widgets now and whenever the node menu's "Show/Hide Advanced" toggles them. */
function fitWhenToggled(node) {
  const fit = () => node.setSize([node.size[0], node.computeSize()[1]]);
  const toggle = node.toggleAdvanced;
  if (typeof toggle === "function") {
    node.toggleAdvanced = function () {
      toggle.call(this);
      fit();
    };
  }
  // After the frontend's own sizing, which follows the extensions' nodeCreated hooks; a loaded node gets its
  // saved size later still.
  queueMicrotask(fit);
}

app.registerExtension({
  name: "LoraWorkbench.Labels",

  nodeCreated(node) {
    if (!String(node.comfyClass ?? "").startsWith(PREFIX)) return;
    const names = displayNames(node.constructor?.nodeData);
    let marked = false;
    for (const widget of node.widgets ?? []) {
      // Only a label that is still the bare name (a translation, or one the user set, is kept).
      if (names[widget.name] && (!widget.label || widget.label === widget.name)) widget.label = names[widget.name];
      if (widget.options?.advanced && widget.advanced === undefined) {
        hideWhenNotAdvanced(node, widget);
        marked = true;
      }
    }
    if (marked) fitWhenToggled(node);
    for (const input of node.inputs ?? []) {
      if (names[input.name] && (!input.label || input.label === input.name)) input.label = names[input.name];
    }
  },
});
