// The training-progress widget's pure parts: a bounded series of (step, loss) points, axis
// scaling, time formatting. No DOM, no ComfyUI: tested with `node --test tests/js/`.

/**
 * A ring buffer of (step, loss) points that keeps the newest `capacity` points, in order.
 * Non-finite losses (a NaN step) are counted but not stored, so one bad step does not blank
 * the curve's scale.
 */
export class PointSeries {
  /** @param {number} capacity how many points to keep (at least 2) */
  constructor(capacity = 2000) {
    this.capacity = Math.max(2, Math.floor(capacity));
    this.clear();
  }

  clear() {
    this._xs = new Float64Array(this.capacity);
    this._ys = new Float64Array(this.capacity);
    this._start = 0;
    this.length = 0;
    this.dropped = 0;
    this.nonFinite = 0;
  }

  /** Add a point; a step not after the last one starts a new run (the series is cleared first). */
  push(x, y) {
    if (!Number.isFinite(y) || !Number.isFinite(x)) {
      this.nonFinite += 1;
      return;
    }
    if (this.length > 0 && x <= this.last().x) this.clear();
    const end = (this._start + this.length) % this.capacity;
    this._xs[end] = x;
    this._ys[end] = y;
    if (this.length < this.capacity) {
      this.length += 1;
    } else {
      this._start = (this._start + 1) % this.capacity;
      this.dropped += 1;
    }
  }

  /** The i-th kept point, oldest first. */
  at(i) {
    const j = (this._start + i) % this.capacity;
    return { x: this._xs[j], y: this._ys[j] };
  }

  last() {
    return this.length ? this.at(this.length - 1) : null;
  }

  /** Kept points, oldest first. */
  points() {
    const out = [];
    for (let i = 0; i < this.length; i++) out.push(this.at(i));
    return out;
  }

  /** {xmin, xmax, ymin, ymax} of the kept points, or null when empty. */
  extent() {
    if (!this.length) return null;
    let ymin = Infinity;
    let ymax = -Infinity;
    for (let i = 0; i < this.length; i++) {
      const y = this._ys[(this._start + i) % this.capacity];
      if (y < ymin) ymin = y;
      if (y > ymax) ymax = y;
    }
    return { xmin: this.at(0).x, xmax: this.last().x, ymin, ymax };
  }
}

/**
 * Exponential moving average of a list of values (what trainers plot beside the raw loss).
 * @param {number[]} values
 * @param {number} beta smoothing in [0, 1); 0 returns the values
 * @returns {number[]} bias-corrected averages, same length
 */
export function ema(values, beta = 0.9) {
  const out = [];
  let avg = 0;
  values.forEach((v, i) => {
    avg = beta * avg + (1 - beta) * v;
    out.push(beta === 0 ? v : avg / (1 - beta ** (i + 1)));
  });
  return out;
}

/**
 * A "nice" axis range and tick step covering [lo, hi] (1, 2, 5 times a power of ten).
 * @param {number} lo
 * @param {number} hi
 * @param {number} ticks about how many intervals
 * @returns {{min: number, max: number, step: number}}
 */
export function niceScale(lo, hi, ticks = 4) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return { min: 0, max: 1, step: 0.25 };
  if (lo > hi) [lo, hi] = [hi, lo];
  if (hi === lo) {
    // A flat line: give it a visible band around the value.
    const pad = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1;
    lo -= pad;
    hi += pad;
  }
  const raw = (hi - lo) / Math.max(1, ticks);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * mag;
  const min = Math.floor(lo / step + 1e-9) * step;
  const max = Math.ceil(hi / step - 1e-9) * step;
  return { min: round(min, step), max: round(max, step), step };
}

function round(value, step) {
  const digits = Math.max(0, -Math.floor(Math.log10(step)) + 1);
  return Number(value.toFixed(Math.min(20, digits)));
}

/**
 * Map a value from [d0, d1] to [r0, r1] (a degenerate domain maps to the middle).
 */
export function scaleLinear(value, d0, d1, r0, r1) {
  if (d1 === d0) return (r0 + r1) / 2;
  return r0 + ((value - d0) / (d1 - d0)) * (r1 - r0);
}

/**
 * Pixel polyline for the points inside a plot box (see `plotDomain` for the x range).
 * @param {{x:number,y:number}[]} points
 * @param {{x:number,y:number,w:number,h:number}} box
 * @param {{xmin:number,xmax:number,ymin:number,ymax:number}} domain
 * @returns {number[][]} [[px, py], ...]
 */
export function toPixels(points, box, domain) {
  return points.map((p) => [
    scaleLinear(p.x, domain.xmin, domain.xmax, box.x, box.x + box.w),
    scaleLinear(p.y, domain.ymin, domain.ymax, box.y + box.h, box.y),
  ]);
}

/**
 * The plot domain for a series (and any further series drawn on the same axes): x from step 0 (or the first kept step once old points were dropped)
 * to the last step done, so the curve fills the width from the first steps of a long run on (the total
 * is in the stats line, not in the axis); y a nice range over the kept losses.
 */
export function plotDomain(series, ...others) {
  let e = series.extent();
  // Further series (the validation loss) share the axes: y covers them too, x never starts before the losses'.
  for (const other of others) {
    const o = other?.extent?.();
    if (!o) continue;
    e = e
      ? { xmin: e.xmin, xmax: Math.max(e.xmax, o.xmax), ymin: Math.min(e.ymin, o.ymin), ymax: Math.max(e.ymax, o.ymax) }
      : o;
  }
  if (!e) return { xmin: 0, xmax: 1, ymin: 0, ymax: 1, yStep: 0.25 };
  const y = niceScale(e.ymin, e.ymax, 4);
  const xmin = series.dropped ? e.xmin : Math.min(0, e.xmin);
  return { xmin, xmax: Math.max(e.xmax, xmin + 1), ymin: y.min, ymax: y.max, yStep: y.step };
}

/**
 * The query of ComfyUI's `/view` route for an image the server saved ({filename, subfolder, type}), e.g. a
 * training preview in the temp folder; the caller prefixes it with the server's API base (`api.apiURL`).
 * @returns {string|null} null when the entry names no file
 */
export function viewQuery(image) {
  if (!image || typeof image.filename !== "string" || !image.filename) return null;
  const params = new URLSearchParams({
    filename: image.filename,
    subfolder: image.subfolder ?? "",
    type: image.type ?? "temp",
  });
  return `/view?${params.toString()}`;
}

/**
 * The previews a validation event brings: `{src, label, prompt}` per image that names a file.
 * @param {{images?: object[]}} detail the `lora_workbench.train_validation` event's detail
 * @param {(path: string) => string} url how a `/view` query becomes a URL (the page's `api.apiURL`)
 */
export function previewItems(detail, url = (p) => p) {
  const images = Array.isArray(detail?.images) ? detail.images : [];
  return images
    .map((image) => ({ query: viewQuery(image), label: String(image?.label ?? ""), prompt: String(image?.prompt ?? "") }))
    .filter((item) => item.query)
    .map(({ query, label, prompt }) => ({ src: url(query), label, prompt }));
}

/**
 * Seconds as "m:ss" or "h:mm:ss"; "--:--" for unknown (null, negative, not finite).
 * @param {number|null} seconds
 * @returns {string}
 */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds) || seconds < 0) return "--:--";
  const total = Math.round(seconds);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const ss = String(s).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

/**
 * Loss with 4 significant digits (exponent form for very small or large values).
 * @param {number|null} loss
 * @returns {string}
 */
export function formatLoss(loss) {
  if (loss === null || loss === undefined || !Number.isFinite(loss)) return "-";
  const a = Math.abs(loss);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return loss.toExponential(2);
  return Number(loss.toPrecision(4)).toString();
}

const IDLE = Object.freeze({
  status: "idle",
  outcome: null,
  step: 0,
  total: 0,
  loss: null,
  elapsed: null,
  eta: null,
  resumedFrom: 0,
  message: "",
  file: null,
  path: null,
});

/**
 * The state a progress widget shows, folded from events: pure, so the widget only draws it.
 * `status` is idle, running or done; `outcome` (when done) is the server's state: finished, cancelled,
 * already finished or failed. `file` is the last checkpoint as the server names it, `path` its full path.
 * @param {object} state previous state (or undefined for a fresh one)
 * @param {{type: "progress"|"done"|"reset", detail: object}} event
 * @returns {object} new state
 */
export function reduceProgress(state, event) {
  const s = state ?? IDLE;
  const d = event.detail ?? {};
  const num = (v, fallback) => (v !== null && v !== undefined && Number.isFinite(Number(v)) ? Number(v) : fallback);
  if (event.type === "reset") return { ...IDLE };
  if (event.type === "progress") {
    const step = num(d.step, 0);
    // A step not after the shown one is a new run: nothing of the old one carries over.
    const base = s.status === "running" && step > s.step ? s : IDLE;
    return {
      ...base,
      status: "running",
      outcome: null,
      step,
      total: num(d.total, base.total),
      loss: Number.isFinite(d.loss) ? d.loss : base.loss,
      elapsed: Number.isFinite(d.elapsed) ? d.elapsed : base.elapsed,
      eta: Number.isFinite(d.eta) ? d.eta : null,
      resumedFrom: num(d.resumed_from, base.resumedFrom),
      message: "",
      file: null,
      path: null,
    };
  }
  if (event.type === "done") {
    // How the run ended, as the server says: finished, cancelled, already finished, failed (older servers: none).
    const outcome = d.state ?? "finished";
    const steps = num(d.steps, NaN);
    const losses = Array.isArray(d.losses) ? d.losses : [];
    const lastLoss = losses.length ? Number(losses[losses.length - 1][1]) : NaN;
    return {
      ...s,
      status: "done",
      outcome,
      message: d.message ?? "",
      step: Number.isFinite(steps) && (steps > 0 || outcome !== "finished") ? steps : s.step,
      // An already finished run may hold more steps than the settings now ask for: never "Step 9/7".
      total: Math.max(num(d.total, s.total), Number.isFinite(steps) ? steps : 0),
      loss: Number.isFinite(lastLoss) ? lastLoss : s.loss,
      elapsed: num(d.elapsed, s.elapsed),
      eta: null,
      resumedFrom: num(d.resumed_from, s.resumedFrom),
      file: d.file ?? null,
      path: d.path ?? null,
    };
  }
  return s;
}

/**
 * The view's status line: what the run is doing or how it ended, with its checkpoint file.
 * @returns {{text: string, kind: string}} kind: idle, running, finished, cancelled, already, failed
 */
export function statusLine(s) {
  const resumed = s.resumedFrom > 0 ? `resumed from step ${s.resumedFrom}` : "";
  if (s.status === "idle") return { text: "Waiting for training to start", kind: "idle" };
  if (s.status === "running") return { text: resumed ? `Running, ${resumed}` : "Running", kind: "running" };
  const saved = s.file ? `checkpoint ${s.file}` : "no checkpoint";
  const from = resumed ? `, ${resumed}` : "";
  if (s.outcome === "cancelled") return { text: `Cancelled at step ${s.step}${from}; ${saved}`, kind: "cancelled" };
  if (s.outcome === "failed") return { text: `Failed after step ${s.step}: ${s.message}; ${saved}`, kind: "failed" };
  if (s.outcome === "already finished") {
    return { text: `Already finished at step ${s.step}, nothing trained; ${saved}`, kind: "already" };
  }
  return { text: `Finished at step ${s.step}${from}; ${saved}`, kind: "finished" };
}
