// node --test tests/js/ : training progress maths (js/lib/series.js) and info formatting (js/lib/info.js).
import assert from "node:assert/strict";
import { test } from "node:test";

import { InfoCache, infoRows, settingsLines } from "../../js/lib/info.js";
import {
  PointSeries,
  ema,
  formatDuration,
  formatLoss,
  niceScale,
  plotDomain,
  previewItems,
  reduceProgress,
  scaleLinear,
  statusLine,
  toPixels,
  viewQuery,
} from "../../js/lib/series.js";

test("PointSeries keeps the newest points in order when full", () => {
  const s = new PointSeries(3);
  for (let i = 1; i <= 5; i++) s.push(i, i * 10);
  assert.equal(s.length, 3);
  assert.equal(s.dropped, 2);
  assert.deepEqual(s.points(), [{ x: 3, y: 30 }, { x: 4, y: 40 }, { x: 5, y: 50 }]);
  assert.deepEqual(s.extent(), { xmin: 3, xmax: 5, ymin: 30, ymax: 50 });
});

test("PointSeries skips non-finite losses and restarts when steps go back", () => {
  const s = new PointSeries(10);
  s.push(1, 0.5);
  s.push(2, NaN);
  s.push(3, Infinity);
  assert.equal(s.length, 1);
  assert.equal(s.nonFinite, 2);
  s.push(1, 0.9); // a new run
  assert.deepEqual(s.points(), [{ x: 1, y: 0.9 }]);
  assert.equal(new PointSeries(10).extent(), null);
});

test("niceScale covers the data with 1-2-5 steps", () => {
  for (const [lo, hi] of [[0.0123, 0.4871], [1, 1], [-3, 7], [0, 0], [1e-5, 3e-5], [120, 80]]) {
    const { min, max, step } = niceScale(lo, hi);
    assert.ok(min <= Math.min(lo, hi) && max >= Math.max(lo, hi), `${lo},${hi} -> ${min},${max}`);
    const mant = step / 10 ** Math.floor(Math.log10(step));
    assert.ok([1, 2, 5].some((m) => Math.abs(mant - m) < 1e-9), `step ${step}`);
    assert.ok(max > min);
  }
  assert.deepEqual(niceScale(0.0123, 0.4871), { min: 0, max: 0.6, step: 0.2 });
  assert.deepEqual(niceScale(0.0123, 0.4871, 5), { min: 0, max: 0.5, step: 0.1 });
  assert.deepEqual(niceScale(NaN, 1), { min: 0, max: 1, step: 0.25 });
});

test("scaleLinear and toPixels put low loss at the bottom of the box", () => {
  assert.equal(scaleLinear(5, 0, 10, 0, 100), 50);
  assert.equal(scaleLinear(5, 5, 5, 0, 100), 50);
  const px = toPixels([{ x: 0, y: 0 }, { x: 10, y: 1 }], { x: 10, y: 20, w: 100, h: 50 }, { xmin: 0, xmax: 10, ymin: 0, ymax: 1 });
  assert.deepEqual(px, [[10, 70], [110, 20]]);
});

test("plotDomain spans the steps done so far, not the total", () => {
  const s = new PointSeries(100);
  s.push(1, 0.4);
  s.push(2, 0.2);
  s.push(30, 0.1);
  const d = plotDomain(s);
  assert.equal(d.xmin, 0);
  assert.equal(d.xmax, 30, "early in a long run the curve fills the width");
  assert.ok(d.ymin <= 0.1 && d.ymax >= 0.4);
  assert.equal(plotDomain(new PointSeries(5)).xmax, 1);
});

test("ema is bias corrected", () => {
  // Bias correction: a constant series averages to itself from the first point on.
  for (const v of ema([2, 2, 2])) assert.ok(Math.abs(v - 2) < 1e-12);
  const smooth = ema([1, 0, 1, 0], 0.5);
  assert.ok(smooth[3] > 0 && smooth[3] < 1);
  assert.deepEqual(ema([1, 3], 0), [1, 3]);
});

test("formatDuration", () => {
  assert.equal(formatDuration(0), "0:00");
  assert.equal(formatDuration(59.6), "1:00");
  assert.equal(formatDuration(754), "12:34");
  assert.equal(formatDuration(3723), "1:02:03");
  for (const bad of [null, undefined, -1, NaN, Infinity]) assert.equal(formatDuration(bad), "--:--");
});

test("formatLoss", () => {
  assert.equal(formatLoss(0.123456), "0.1235");
  assert.equal(formatLoss(0.00001234), "1.23e-5");
  assert.equal(formatLoss(0), "0");
  assert.equal(formatLoss(NaN), "-");
});

test("reduceProgress folds progress and done events", () => {
  let s = reduceProgress(undefined, { type: "progress", detail: { step: 3, total: 10, loss: 0.5, elapsed: 6, eta: 14 } });
  assert.deepEqual(
    [s.status, s.step, s.total, s.loss, s.elapsed, s.eta, s.resumedFrom],
    ["running", 3, 10, 0.5, 6, 14, 0],
  );
  s = reduceProgress(s, { type: "progress", detail: { step: 4, total: 10, loss: NaN, elapsed: 8 } });
  assert.equal(s.loss, 0.5, "a NaN loss keeps the last shown value");
  assert.equal(s.eta, null);
  s = reduceProgress(s, { type: "done", detail: { file: "me/step-000010.safetensors", path: "/o/me/step-000010.safetensors", steps: 10 } });
  assert.deepEqual([s.status, s.outcome, s.step, s.file, s.eta], ["done", "finished", 10, "me/step-000010.safetensors", null]);
  assert.equal(reduceProgress(s, { type: "reset" }).status, "idle");
  // A new run after a finished one starts from nothing (no old loss or file).
  const next = reduceProgress(s, { type: "progress", detail: { step: 1, total: 5, resumed_from: 0 } });
  assert.deepEqual([next.status, next.loss, next.file, next.total], ["running", null, null, 5]);
});

test("statusLine says the run's real state", () => {
  const run = (detail) => reduceProgress(undefined, { type: "progress", detail });
  const end = (s, detail) => statusLine(reduceProgress(s, { type: "done", detail }));
  assert.equal(statusLine(reduceProgress(undefined, { type: "reset" })).text, "Waiting for training to start");
  assert.equal(statusLine(run({ step: 3, total: 9 })).text, "Running");
  const resumed = run({ step: 33, total: 40, resumed_from: 32 });
  assert.equal(statusLine(resumed).text, "Running, resumed from step 32");
  const file = "my_lora/step-000012.safetensors";
  assert.deepEqual(end(run({ step: 12, total: 40 }), { state: "cancelled", steps: 12, file }), {
    text: `Cancelled at step 12; checkpoint ${file}`,
    kind: "cancelled",
  });
  assert.equal(
    end(resumed, { state: "finished", steps: 40, resumed_from: 32, file }).text,
    `Finished at step 40, resumed from step 32; checkpoint ${file}`,
  );
  assert.equal(
    end(undefined, { state: "already finished", steps: 40, resumed_from: 40, file }).text,
    `Already finished at step 40, nothing trained; checkpoint ${file}`,
  );
  const already = reduceProgress(undefined, { type: "done", detail: { state: "already finished", steps: 9, total: 7 } });
  assert.deepEqual([already.step, already.total], [9, 9]);
  assert.equal(
    end(run({ step: 5 }), { state: "failed", steps: 0, message: "RuntimeError: boom" }).text,
    "Failed after step 0: RuntimeError: boom; no checkpoint",
  );
});

test("infoRows and settingsLines", () => {
  const rows = infoRows({ rank: 8, alpha: [4, 8], base_family: "sd1" });
  assert.deepEqual(rows.map((r) => r.value), ["8", "4, 8", "SD 1.x"]);
  assert.deepEqual(infoRows({ rank: null, alpha: null, base_family: null }).map((r) => r.value), ["-", "-", "-"]);
  assert.deepEqual(settingsLines({ lr: 0.0001, b: { x: 1 } }), ['b: {"x":1}', "lr: 0.0001"]);
  assert.deepEqual(settingsLines(null), []);
});

test("InfoCache fetches each name once and caches failures", async () => {
  let calls = 0;
  const cache = new InfoCache(async (name) => {
    calls += 1;
    if (name === "bad") throw new Error("boom");
    return { name, exists: true };
  });
  const [a, b] = await Promise.all([cache.get("x"), cache.get("x")]);
  assert.equal(a, b);
  assert.equal(calls, 1);
  const bad = await cache.get("bad");
  assert.deepEqual([bad.exists, bad.error], [false, "boom"]);
  assert.equal(cache.peek("x").exists, true);
  cache.clear();
  await cache.get("x");
  assert.equal(calls, 3);
});

test("plotDomain covers the validation series too", () => {
  const loss = new PointSeries(100);
  loss.push(1, 0.4);
  loss.push(10, 0.3);
  const val = new PointSeries(100);
  val.push(0, 0.9);
  val.push(10, 0.05);
  const d = plotDomain(loss, val);
  assert.equal(d.xmin, 0);
  assert.equal(d.xmax, 10);
  assert.ok(d.ymin <= 0.05 && d.ymax >= 0.9, "y spans both curves");
  assert.deepEqual(plotDomain(loss, new PointSeries(5)), plotDomain(loss), "an empty validation series changes nothing");
  const onlyVal = plotDomain(new PointSeries(5), val);
  assert.ok(onlyVal.ymax >= 0.9 && onlyVal.xmax === 10, "the step-0 evaluation shows before the first step");
});

test("previewItems turns a validation event's images into /view URLs", () => {
  const detail = {
    step: 3,
    images: [
      { filename: "lora_workbench_preview_7_000003_0.png", subfolder: "", type: "temp", label: "with trigger", prompt: "a sks dog" },
      { filename: "", type: "temp" },
      { filename: "x y&z.png", subfolder: "a/b", type: "temp", label: "without trigger" },
    ],
  };
  const items = previewItems(detail, (p) => `/api${p}`);
  assert.equal(items.length, 2, "an entry without a file name is left out");
  assert.equal(items[0].src, "/api/view?filename=lora_workbench_preview_7_000003_0.png&subfolder=&type=temp");
  assert.equal(items[0].label, "with trigger");
  assert.equal(items[0].prompt, "a sks dog");
  assert.equal(viewQuery(detail.images[2]), "/view?filename=x+y%26z.png&subfolder=a%2Fb&type=temp");
  assert.deepEqual(previewItems({}), []);
  assert.equal(viewQuery(null), null);
});
