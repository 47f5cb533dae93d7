// node --test tests/js/ : the LoRA chooser's filtering and ranking (js/lib/chooser.js) and the row
// helpers it and the stack editor use (js/lib/rows.js).
import assert from "node:assert/strict";
import { test } from "node:test";

import { filterLoras, initialIndex, moveHighlight } from "../../js/lib/chooser.js";
import { allOn, dragSteps, moveRow, splitName, stepStrength, toggleAll } from "../../js/lib/rows.js";

const LIST = [
  "lw_style.safetensors",
  "lw_plain.safetensors",
  "chars/lw_char.safetensors",
  "chars/old/hero.safetensors",
  "styles\\charcoal.safetensors",
  "character_sheet.pt",
];
const names = (entries) => entries.map((e) => e.name);

test("splitName separates folder, stem and extension, either separator", () => {
  assert.deepEqual(splitName("chars/lw_char.safetensors"), { folder: "chars/", base: "lw_char", ext: ".safetensors" });
  assert.deepEqual(splitName("a\\b\\c.pt"), { folder: "a/b/", base: "c", ext: ".pt" });
  assert.deepEqual(splitName("plain"), { folder: "", base: "plain", ext: "" });
  assert.deepEqual(splitName(""), { folder: "", base: "", ext: "" });
});

test("an empty query lists everything, root files first, then folder by folder", () => {
  const all = filterLoras(LIST, "  ");
  assert.deepEqual(names(all), [
    "lw_style.safetensors",
    "lw_plain.safetensors",
    "character_sheet.pt",
    "chars/lw_char.safetensors",
    "chars/old/hero.safetensors",
    "styles\\charcoal.safetensors",
  ]);
  assert.equal(all[3].folder, "chars/");
  assert.equal(all[5].folder, "styles/", "a Windows separator is shown as /");
});

test("a query keeps only names whose path holds every token, across the folder separator", () => {
  assert.deepEqual(names(filterLoras(LIST, "chars/lw_c")), ["chars/lw_char.safetensors"]);
  assert.deepEqual(names(filterLoras(LIST, "CHARS\\LW")), ["chars/lw_char.safetensors"], "case and separator");
  assert.deepEqual(names(filterLoras(LIST, "old hero")), ["chars/old/hero.safetensors"]);
  assert.deepEqual(names(filterLoras(LIST, "nothing")), []);
  assert.deepEqual(filterLoras(null, "x"), []);
});

test("ranking: file name prefix, then inside the file name, then folder name, then elsewhere", () => {
  // "char": character_sheet starts with it; charcoal too (longer path); lw_char holds it; hero only by folder.
  assert.deepEqual(names(filterLoras(LIST, "char")), [
    "character_sheet.pt",
    "styles\\charcoal.safetensors",
    "chars/lw_char.safetensors",
    "chars/old/hero.safetensors",
  ]);
  // The exact stem wins over a shorter prefix match.
  assert.deepEqual(names(filterLoras(["ab_longer.safetensors", "x/ab.safetensors"], "ab"))[0], "x/ab.safetensors");
});

test("initialIndex: an unused file for a new row, the current file for a replaced one, the best match when typing", () => {
  const entries = filterLoras(LIST, "");
  assert.equal(initialIndex(entries, { used: ["lw_style.safetensors"] }), 1);
  assert.equal(initialIndex(entries, { used: names(entries) }), 0, "all used: the first");
  assert.equal(initialIndex(entries, { current: "chars/lw_char.safetensors" }), 3);
  assert.equal(initialIndex(filterLoras(LIST, "lw"), { used: ["lw_plain.safetensors"], query: "lw" }), 0);
  assert.equal(initialIndex([], {}), -1);
});

test("moveHighlight wraps with the arrows and stops at the ends with page keys", () => {
  assert.equal(moveHighlight(0, 3, "ArrowDown"), 1);
  assert.equal(moveHighlight(2, 3, "ArrowDown"), 0);
  assert.equal(moveHighlight(0, 3, "ArrowUp"), 2);
  assert.equal(moveHighlight(-1, 3, "ArrowDown"), 0);
  assert.equal(moveHighlight(1, 30, "PageDown", 8), 9);
  assert.equal(moveHighlight(25, 30, "PageDown", 8), 29);
  assert.equal(moveHighlight(3, 30, "PageUp", 8), 0);
  assert.equal(moveHighlight(5, 30, "End"), 29);
  assert.equal(moveHighlight(5, 30, "Home"), 0);
  assert.equal(moveHighlight(5, 30, "a"), 5);
  assert.equal(moveHighlight(0, 0, "ArrowDown"), -1);
});

const row = (lora, on = true) => ({ on, lora, strength: 1, strength_clip: null });

test("toggleAll: all on -> all off; otherwise all on; rows keep their other fields", () => {
  const mixed = [row("a"), row("b", false), { ...row("c"), x: 1 }];
  assert.equal(allOn(mixed), false);
  const on = toggleAll(mixed);
  assert.deepEqual(on.map((r) => r.on), [true, true, true]);
  assert.equal(on[2].x, 1);
  const off = toggleAll(on);
  assert.deepEqual(off.map((r) => r.on), [false, false, false]);
  assert.deepEqual(toggleAll(off).map((r) => r.on), [true, true, true]);
  assert.deepEqual(toggleAll([]), []);
  assert.equal(allOn([]), false);
  assert.deepEqual(mixed.map((r) => r.on), [true, false, true], "the input is left alone");
});

test("move up/down as the row menu does it: neighbours swap, the ends stay", () => {
  const rows = [row("a"), row("b"), row("c")];
  assert.deepEqual(moveRow(rows, 1, 0).map((r) => r.lora), ["b", "a", "c"]);
  assert.deepEqual(moveRow(rows, 1, 2).map((r) => r.lora), ["a", "c", "b"]);
  assert.deepEqual(moveRow(rows, 2, 3).map((r) => r.lora), ["a", "b", "c"]);
});

test("stepStrength moves by whole steps without float drift; dragSteps truncates towards zero", () => {
  assert.equal(stepStrength(0.1, 4), 0.3);
  assert.equal(stepStrength(1, -20), 0);
  assert.ok(!Object.is(stepStrength(0.05, -1), -0));
  assert.equal(stepStrength(1, 1, 0.01), 1.01);
  assert.equal(stepStrength("abc", 2), 0.1);
  assert.equal(dragSteps(40), 10);
  assert.equal(dragSteps(3), 0);
  assert.equal(dragSteps(-9), -2);
});
