// A new Train LoRA node's seed starts as "fixed": ComfyUI gives every INT named "seed" a
// "control after generate" widget set to "randomize", which would retrain from scratch (a new
// run) at every queue. Loaded workflows keep the value they were saved with.
import { app } from "../../scripts/app.js";

const NODE_CLASS = "LoraWorkbenchTrain";

app.registerExtension({
  name: "LoraWorkbench.TrainSeed",

  nodeCreated(node) {
    if (node.comfyClass !== NODE_CLASS) return;
    const seed = node.widgets?.find((w) => w.name === "seed");
    const control =
      seed?.linkedWidgets?.find((w) => Array.isArray(w.options?.values) && w.options.values.includes("fixed")) ??
      node.widgets?.find((w) => w.name === "control_after_generate");
    if (control) control.value = "fixed";
  },
});
