// node --test tests/js/ : the LoRA Stack row model (js/lib/rows.js).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  addRow,
  clipStrength,
  formatStrength,
  groupByFolder,
  missingRows,
  moveRow,
  nextLora,
  normalizeRow,
  overLimit,
  parseRows,
  removeRow,
  resolveLora,
  serializeRows,
  strengthSum,
  toggleRow,
  updateRow,
} from "../../js/lib/rows.js";

const row = (lora, strength = 1, on = true, strength_clip = null) => ({ on, lora, strength, strength_clip });

test("parseRows fills defaults and keeps unknown keys", () => {
  const { rows, error } = parseRows('[{"lora": "a.safetensors"}, {"on": false, "lora": "b", "strength": "0.5", "x": 1}]');
  assert.equal(error, null);
  assert.deepEqual(rows[0], { on: true, lora: "a.safetensors", strength: 1, strength_clip: null });
  assert.deepEqual(rows[1], { on: false, lora: "b", strength: 0.5, strength_clip: null, x: 1 });
});

test("parseRows: empty text and the node default are no rows", () => {
  for (const v of ["", "  ", "[]", undefined, null]) assert.deepEqual(parseRows(v), { rows: [], error: null }, String(v));
});

test("parseRows reports bad JSON and non-lists instead of throwing", () => {
  assert.match(parseRows("[{").error, /not valid JSON/);
  assert.match(parseRows('{"lora": "a"}').error, /must be a JSON list/);
  assert.deepEqual(parseRows("[{").rows, []);
});

test("normalizeRow: non-numeric strengths fall back, strength_clip stays null unless a number", () => {
  assert.equal(normalizeRow({ strength: "abc" }).strength, 1);
  assert.equal(normalizeRow({ strength: Infinity }).strength, 1);
  assert.equal(normalizeRow({ strength_clip: 0.25 }).strength_clip, 0.25);
  assert.equal(normalizeRow({ strength_clip: "0.4" }).strength_clip, 0.4);
  assert.equal(normalizeRow({ strength_clip: "nope" }).strength_clip, null);
  assert.equal(normalizeRow(null).lora, "");
});

test("serializeRows round-trips through parseRows with a fixed key order", () => {
  const rows = [row("a.safetensors", 0.8), row("sub/b.safetensors", -0.5, false, 0.3)];
  const text = serializeRows(rows);
  assert.equal(text.indexOf('"on"') < text.indexOf('"lora"'), true);
  assert.deepEqual(parseRows(text).rows, rows);
  assert.equal(serializeRows([]), "[]");
});

test("add, remove, move, toggle, update return new lists and leave the input alone", () => {
  const start = [row("a"), row("b"), row("c")];
  const frozen = JSON.stringify(start);
  assert.deepEqual(addRow(start, "d", 0.5).map((r) => r.lora), ["a", "b", "c", "d"]);
  assert.equal(addRow(start, "d", 0.5)[3].strength, 0.5);
  assert.deepEqual(removeRow(start, 1).map((r) => r.lora), ["a", "c"]);
  assert.deepEqual(removeRow(start, 7).map((r) => r.lora), ["a", "b", "c"]);
  assert.deepEqual(moveRow(start, 2, 0).map((r) => r.lora), ["c", "a", "b"]);
  assert.deepEqual(moveRow(start, 0, 99).map((r) => r.lora), ["b", "c", "a"]);
  assert.deepEqual(moveRow(start, 0, -1).map((r) => r.lora), ["a", "b", "c"]);
  assert.equal(toggleRow(start, 1)[1].on, false);
  assert.equal(toggleRow(toggleRow(start, 1), 1)[1].on, true);
  assert.equal(toggleRow(start, 1, true)[1].on, true);
  assert.equal(updateRow(start, 2, { strength: "0.3" })[2].strength, 0.3);
  assert.equal(JSON.stringify(start), frozen);
});

test("clipStrength: null means the model strength", () => {
  assert.equal(clipStrength(row("a", 0.7)), 0.7);
  assert.equal(clipStrength(row("a", 0.7, true, 0)), 0);
});

test("strengthSum adds |model strength| of enabled rows with a file", () => {
  const rows = [row("a", 0.7), row("b", -0.7), row("c", 0.6), row("d", 5, false), row("", 3), row("None", 3)];
  assert.equal(strengthSum(rows), 2.0);
  assert.equal(overLimit(strengthSum(rows)), false, "exactly 2.0 is not over");
  assert.equal(overLimit(strengthSum(updateRow(rows, 2, { strength: 0.61 }))), true);
  assert.equal(strengthSum([]), 0);
});

test("resolveLora mirrors lora.stack.resolve_lora_name", () => {
  const available = ["a.safetensors", "sub/b.safetensors", "x/c.safetensors", "y/c.safetensors"];
  assert.equal(resolveLora("a.safetensors", available), "a.safetensors");
  assert.equal(resolveLora("sub\\b.safetensors", available), "sub/b.safetensors");
  assert.equal(resolveLora("A", available), "a.safetensors");
  assert.equal(resolveLora("b.safetensors", available), "sub/b.safetensors");
  assert.equal(resolveLora("/home/me/loras/sub/b.safetensors", available), "sub/b.safetensors");
  assert.equal(resolveLora("c.safetensors", available), null, "ambiguous basename");
  assert.equal(resolveLora("/m/x/c.safetensors", available), "x/c.safetensors");
  assert.equal(resolveLora("gone.safetensors", available), null);
});

test("missingRows flags files not in the list, including disabled rows; nothing before the list loads", () => {
  const rows = [row("a.safetensors"), row("gone.safetensors", 1, false), row(""), row("sub/b")];
  assert.deepEqual(missingRows(rows, ["a.safetensors", "sub/b.safetensors"]), [1]);
  assert.deepEqual(missingRows(rows, null), []);
});

test("nextLora picks an unused file first", () => {
  assert.equal(nextLora([row("a")], ["a", "b"]), "b");
  assert.equal(nextLora([row("a"), row("b")], ["a", "b"]), "a");
  assert.equal(nextLora([], []), "");
});

test("groupByFolder puts the root first and keeps list order inside a folder", () => {
  const groups = groupByFolder(["z.safetensors", "s/b.safetensors", "a.safetensors", "s/a.safetensors", "r\\q.safetensors"]);
  assert.deepEqual(groups.map((g) => g.folder), ["", "r", "s"]);
  assert.deepEqual(groups[0].names, ["z.safetensors", "a.safetensors"]);
  assert.deepEqual(groups[2].names, ["s/b.safetensors", "s/a.safetensors"]);
});

test("formatStrength uses two decimals and no negative zero", () => {
  assert.equal(formatStrength(1), "1.00");
  assert.equal(formatStrength(-0.001), "0.00");
  assert.equal(formatStrength(-0.75), "-0.75");
});
