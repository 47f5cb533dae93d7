// LoRA Info: a panel in the node with rank, alpha, base family, trigger words (click to copy)
// and training settings of the chosen file, from GET /lora_workbench/info.
import { app } from "../../scripts/app.js";

import { el, infoCache, infoPanel, injectStyle, redraw, refreshLoras } from "./common.js";
import { settingsLines } from "./lib/info.js";

const NODE_CLASS = "LoraWorkbenchInfo";
const NAME_WIDGET = "lora_name";

class InfoPanel {
  constructor(node, nameWidget) {
    this.node = node;
    this.nameWidget = nameWidget;
    this.root = el("div.lw-root.lw-info", { dataset: { testid: "lw-info" } });
    this.shown = undefined;
  }

  async update(force = false) {
    const name = this.nameWidget.value;
    if (!force && name === this.shown) return;
    this.shown = name;
    if (!name) {
      this.root.replaceChildren("No LoRA chosen");
      return;
    }
    this.root.dataset.state = "loading";
    this.root.replaceChildren("Reading…");
    const info = await infoCache.get(name);
    if (this.nameWidget.value !== name) return; // changed while loading
    this.render(info);
    redraw(this.node);
  }

  render(info) {
    const panel = infoPanel(info, this.root);
    const settings = settingsLines(info.training_settings);
    const children = [panel];
    if (settings.length) {
      children.push(
        el(
          "details",
          { dataset: { key: "training_settings" } },
          el("summary", {}, `Training settings (${settings.length})`),
          el("div.lw-settings", {}, settings.join("\n")),
        ),
      );
    } else if (info.exists !== false) {
      children.push(el("div.lw-sub", { dataset: { key: "training_settings" } }, "No training settings recorded"));
    }
    this.root.dataset.state = info.error ? "error" : "ready";
    this.root.replaceChildren(...children);
  }
}

app.registerExtension({
  name: "LoraWorkbench.Info",

  async refreshComboInNodes() {
    await refreshLoras();
    for (const node of app.graph?.nodes ?? []) node.lwInfoPanel?.update(true);
  },

  nodeCreated(node) {
    if (node.comfyClass !== NODE_CLASS) return;
    const nameWidget = node.widgets?.find((w) => w.name === NAME_WIDGET);
    if (!nameWidget) return;
    injectStyle();
    const panel = new InfoPanel(node, nameWidget);
    const widget = node.addDOMWidget("lora_info_panel", "lora_workbench_info", panel.root, {
      serialize: false,
      hideOnZoom: false,
      getValue: () => "",
      setValue: () => {},
      getMinHeight: () => 120,
    });
    widget.serialize = false;
    node.lwInfoPanel = panel;

    // The combo calls back on a pick (both renderers); loading a workflow sets the value and
    // then calls onConfigure.
    const callback = nameWidget.callback;
    nameWidget.callback = function (...args) {
      const r = callback?.apply(this, args);
      panel.update();
      return r;
    };
    const onConfigure = node.onConfigure;
    node.onConfigure = function (...args) {
      const r = onConfigure?.apply(this, args);
      panel.update();
      return r;
    };
    panel.update();
  },
});
