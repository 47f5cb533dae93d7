// A new Train LoRA node's seed starts as "fixed": ComfyUI gives every INT named "seed" a
// "control after generate" widget set to "randomize", which would retrain from scratch (a new
// run) at every queue; Training Previews' seed fixes its previews' noise and validation draws, so it
// starts "fixed" too. Loaded workflows keep the value they were saved with.
import { app } from "../../scripts/app.js";

const NODE_CLASSES = new Set(["LoraWorkbenchTrain", "LoraWorkbenchTrainingPreviews"]);

app.registerExtension({
  name: "LoraWorkbench.TrainSeed",

  nodeCreated(node) {
    if (!NODE_CLASSES.has(node.comfyClass)) return;
    const seed = node.widgets?.find((w) => w.name === "seed");
    const control =
      seed?.linkedWidgets?.find((w) => Array.isArray(w.options?.values) && w.options.values.includes("fixed")) ??
      node.widgets?.find((w) => w.name === "control_after_generate");
    if (control) control.value = "fixed";
  },
});
