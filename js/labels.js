// Short input labels (the schema's `display_name` of an input, e.g. "LR" for learning_rate) on the
// pack's nodes. Frontend 1.49 shows them by itself; 1.32 labels a widget with its input name only.
// The input names are unchanged: workflows, prompts and the server use them.
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

app.registerExtension({
  name: "LoraWorkbench.Labels",

  nodeCreated(node) {
    if (!String(node.comfyClass ?? "").startsWith(PREFIX)) return;
    const names = displayNames(node.constructor?.nodeData);
    for (const widget of node.widgets ?? []) {
      // Only a label that is still the bare name (a translation, or one the user set, is kept).
      if (names[widget.name] && (!widget.label || widget.label === widget.name)) widget.label = names[widget.name];
    }
    for (const input of node.inputs ?? []) {
      if (names[input.name] && (!input.label || input.label === input.name)) input.label = names[input.name];
    }
  },
});
