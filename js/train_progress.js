// Training progress inside the node: step/total, loss, elapsed and remaining time, and a live
// loss curve, from the server's `lora_workbench.train_progress` / `lora_workbench.train_done`
// events; with Training Previews connected, the validation loss on the same chart and the latest
// preview images (with and without the trigger) below it (`lora_workbench.train_validation`). The view is a DOM widget holding a <canvas>, so it draws the same in the classic
// renderer and in Nodes 2.0. It is added to the Train node when created, and to any node an
// event names that lacks it (so a run started before the page loaded still shows).
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";

import { el, injectStyle, redraw } from "./common.js";
import {
  PointSeries,
  ema,
  formatDuration,
  formatLoss,
  plotDomain,
  previewItems,
  reduceProgress,
  statusLine,
  toPixels,
} from "./lib/series.js";

const NODE_CLASS = "LoraWorkbenchTrain";
export const PROGRESS_EVENT = "lora_workbench.train_progress";
export const DONE_EVENT = "lora_workbench.train_done";
export const VALIDATION_EVENT = "lora_workbench.train_validation";
const WIDGET_NAME = "lora_train_progress";
const CAPACITY = 4000;
const PAD = { left: 40, right: 8, top: 8, bottom: 16 };
const COLORS = { loss: "rgba(90,160,255,0.55)", average: "rgb(255,170,40)", validation: "rgb(80,210,120)" };
const PREVIEW_STYLE = "display:flex;gap:4px;flex:none;";
const FIGURE_STYLE = "flex:1 1 0;min-width:0;margin:0;display:flex;flex-direction:column;align-items:center;";
const IMAGE_STYLE = "width:100%;aspect-ratio:1;object-fit:contain;border-radius:4px;background:var(--comfy-input-bg,#222);";
const CAPTION_STYLE = "font-size:10px;color:var(--descrip-text,#999);white-space:nowrap;overflow:hidden;max-width:100%;";

class ProgressView {
  constructor(node) {
    this.node = node;
    this.series = new PointSeries(CAPACITY);
    this.validation = new PointSeries(CAPACITY);
    this.validationBeforeRun = false; // an evaluation before the first step belongs to the run about to start
    this.previews = el("div.lw-previews", { dataset: { testid: "lw-train-previews" }, style: PREVIEW_STYLE });
    this.state = reduceProgress(undefined, { type: "reset" });
    this.stats = el("div.lw-stats", { dataset: { testid: "lw-train-stats" } });
    this.canvas = el("canvas", { dataset: { testid: "lw-loss-canvas" } });
    this.root = el(
      "div.lw-root.lw-progress",
      { dataset: { testid: "lw-train-progress" } },
      this.stats,
      el("div.lw-chart", {}, this.canvas),
      this.previews,
    );
    this.pending = false;
    this.renderStats();
    if (typeof ResizeObserver !== "undefined") {
      new ResizeObserver(() => this.schedule()).observe(this.canvas);
    }
  }

  /** Replace the series with the server's `[[step, loss], ...]` (a resumed run's history, a run's losses). */
  load(points) {
    this.series.clear();
    for (const [x, y] of points) this.series.push(Number(x), Number(y));
  }

  handle(type, detail) {
    const before = this.state;
    this.state = reduceProgress(this.state, { type, detail });
    if (type === "validation") {
      if (before.status !== "running" && !this.validationBeforeRun) {
        // The evaluation before a run's first step: the next run starts here, the last one's curve goes.
        this.validation.clear();
        this.validationBeforeRun = true;
      }
      this.validation.push(Number(detail.step), Number(detail.loss));
      this.showPreviews(detail);
    } else if (type === "progress") {
      // A new run (the reducer started over) clears the curve; a resumed run brings its checkpoint's history.
      const newRun = before.status !== "running" || this.state.step <= before.step;
      if (newRun) this.series.clear();
      if (newRun && !this.validationBeforeRun) {
        this.validation.clear();
        this.previews.replaceChildren();
      }
      this.validationBeforeRun = false;
      if (Array.isArray(detail.history) && detail.history.length) this.load(detail.history);
      this.series.push(Number(detail.step), Number(detail.loss));
    } else if (type === "done") {
      if (Array.isArray(detail.losses) && detail.losses.length) this.load(detail.losses);
      if (Array.isArray(detail.validation) && detail.validation.length) {
        this.validation.clear();
        for (const [x, y] of detail.validation) this.validation.push(Number(x), Number(y));
      }
    }
    this.root.dataset.status = this.state.status;
    this.root.dataset.outcome = this.state.outcome ?? "";
    this.root.dataset.step = String(this.state.step);
    this.root.dataset.resumedFrom = String(this.state.resumedFrom);
    this.root.dataset.points = String(this.series.length);
    this.root.dataset.validationPoints = String(this.validation.length);
    this.renderStats();
    this.schedule();
    redraw(this.node);
  }

  renderStats() {
    const s = this.state;
    const item = (key, label, value) => el("span", { dataset: { key } }, `${label} `, el("b", {}, value));
    const numbers = [
      item("step", "Step", s.total ? `${s.step}/${s.total}` : String(s.step)),
      item("loss", "Loss", formatLoss(s.loss)),
      item("elapsed", "Elapsed", formatDuration(s.elapsed)),
    ];
    if (s.status === "running") numbers.push(item("eta", "Remaining", formatDuration(s.eta)));
    const line = statusLine(s);
    const status = el("div.lw-status", { dataset: { key: "status", kind: line.kind }, title: line.text });
    if (s.file) {
      // The checkpoint's file name in the line; its full path as the tooltip.
      const [head, tail] = line.text.split(s.file);
      status.append(head, el("span", { dataset: { key: "file" }, title: s.path || s.file }, s.file), tail ?? "");
      status.title = s.path ? `${line.text}\n${s.path}` : line.text;
    } else {
      status.append(line.text);
    }
    const rows = [status];
    if (s.status !== "idle") rows.unshift(el("div.lw-stat-line", {}, ...numbers));
    this.stats.replaceChildren(...rows);
  }

  /** Show the previews an evaluation brought (the newest replace the last), labelled with their step. */
  showPreviews(detail) {
    const items = previewItems(detail, (path) => api.apiURL(path));
    if (!items.length) return;
    const grew = !this.previews.childElementCount;
    this.previews.replaceChildren(
      ...items.map(({ src, label, prompt }) =>
        el(
          "figure",
          { style: FIGURE_STYLE, title: prompt },
          el("img", { src, alt: prompt, style: IMAGE_STYLE, dataset: { label, step: String(detail.step) } }),
          el("figcaption", { style: CAPTION_STYLE }, `${label}, step ${detail.step}`),
        ),
      ),
    );
    this.previews.dataset.step = String(detail.step);
    if (grew) growToFit(this.node);
  }

  /** Height the previews take at the node's width (0 without previews). */
  previewHeight() {
    const n = this.previews.childElementCount;
    if (!n) return 0;
    const width = Math.max(120, (this.node.size?.[0] ?? 280) - 20);
    return Math.round(width / n) + 18;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const h = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== w || canvas.height !== h) {
      canvas.width = w;
      canvas.height = h;
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    const cw = w / ratio;
    const ch = h / ratio;
    ctx.clearRect(0, 0, cw, ch);
    const box = { x: PAD.left, y: PAD.top, w: Math.max(1, cw - PAD.left - PAD.right), h: Math.max(1, ch - PAD.top - PAD.bottom) };
    const domain = plotDomain(this.series, this.validation);
    const style = getComputedStyle(this.root);
    const text = style.color || "#ccc";

    // Grid and y labels.
    ctx.font = "10px sans-serif";
    ctx.fillStyle = text;
    ctx.strokeStyle = "rgba(128,128,128,0.35)";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let v = domain.ymin; v <= domain.ymax + domain.yStep / 2; v += domain.yStep) {
      const [[, py]] = toPixels([{ x: domain.xmin, y: v }], box, domain);
      ctx.beginPath();
      ctx.moveTo(box.x, Math.round(py) + 0.5);
      ctx.lineTo(box.x + box.w, Math.round(py) + 0.5);
      ctx.stroke();
      ctx.fillText(formatLoss(Number(v.toPrecision(6))), box.x - 4, py);
    }
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText(`step ${domain.xmin}`, box.x, box.y + box.h + 3);
    ctx.textAlign = "right";
    ctx.fillText(String(domain.xmax), box.x + box.w, box.y + box.h + 3);

    // Where a resumed run took over from its checkpoint: a dashed line.
    const resumed = this.state.resumedFrom;
    if (resumed > domain.xmin && resumed < domain.xmax) {
      const [[rx]] = toPixels([{ x: resumed, y: domain.ymin }], box, domain);
      ctx.save();
      ctx.setLineDash([3, 3]);
      ctx.strokeStyle = "rgba(160,160,160,0.8)";
      ctx.beginPath();
      ctx.moveTo(Math.round(rx) + 0.5, box.y);
      ctx.lineTo(Math.round(rx) + 0.5, box.y + box.h);
      ctx.stroke();
      ctx.restore();
    }

    const points = this.series.points();
    if (!points.length && !this.validation.length) return;
    // Raw loss, thin; its moving average, thick (the trend a user reads).
    const line = (pts, color, width) => {
      const px = toPixels(pts, box, domain);
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.beginPath();
      px.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      if (px.length === 1) ctx.lineTo(px[0][0] + 1, px[0][1]);
      ctx.stroke();
    };
    line(points, COLORS.loss, 1);
    const smooth = ema(points.map((p) => p.y), 0.9);
    line(points.map((p, i) => ({ x: p.x, y: smooth[i] })), COLORS.average, 2);
    const held = this.validation.points();
    if (held.length) {
      // The validation loss: a line through its evaluations, each marked with a dot, and a small legend.
      line(held, COLORS.validation, 2);
      ctx.fillStyle = COLORS.validation;
      for (const [x, y] of toPixels(held, box, domain)) {
        ctx.beginPath();
        ctx.arc(x, y, 2.5, 0, 2 * Math.PI);
        ctx.fill();
      }
      ctx.textAlign = "right";
      ctx.textBaseline = "top";
      // The newest validation loss is in the legend (the stats line has no room left for it).
      ctx.fillText(`validation ${formatLoss(held[held.length - 1].y)}`, box.x + box.w - 2, box.y + 2);
      ctx.fillStyle = COLORS.average;
      ctx.fillText("loss (avg)", box.x + box.w - 2, box.y + 14);
    }
  }
}

function viewFor(node, create) {
  if (!node) return null;
  if (node.lwTrainProgress) return node.lwTrainProgress;
  if (!create || typeof node.addDOMWidget !== "function") return null;
  injectStyle();
  const view = new ProgressView(node);
  const widget = node.addDOMWidget(WIDGET_NAME, "lora_workbench_progress", view.root, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => 180 + view.previewHeight(),
  });
  widget.serialize = false;
  node.lwTrainProgress = view;
  if (node.graph && node.computeSize && node.setSize) {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0], 280), Math.max(node.size[1], size[1])]);
  }
  return view;
}

/** Make the node tall enough for its widgets (the previews add a row under the chart). */
function growToFit(node) {
  if (!node?.computeSize || !node?.setSize) return;
  const size = node.computeSize();
  node.setSize([node.size[0], Math.max(node.size[1], size[1])]);
}

/** The node an event names: its id as the executor sends it (subgraph ids as "a:b" resolve to the last part in the root graph's lookup). */
function eventNode(detail) {
  const id = detail?.node;
  if (id === null || id === undefined) return null;
  const graph = app.graph;
  return graph?.getNodeById?.(id) ?? graph?.getNodeById?.(Number(id)) ?? null;
}

app.registerExtension({
  name: "LoraWorkbench.TrainProgress",

  async setup() {
    api.addEventListener(PROGRESS_EVENT, ({ detail }) => viewFor(eventNode(detail), true)?.handle("progress", detail));
    api.addEventListener(DONE_EVENT, ({ detail }) => viewFor(eventNode(detail), true)?.handle("done", detail));
    api.addEventListener(VALIDATION_EVENT, ({ detail }) =>
      viewFor(eventNode(detail), true)?.handle("validation", detail),
    );
  },

  nodeCreated(node) {
    if (node.comfyClass !== NODE_CLASS) return;
    viewFor(node, true);
  },
});
