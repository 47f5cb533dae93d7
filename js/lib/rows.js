// The LoRA Stack's rows as data: (de)serialisation of the `rows` widget value, the editing
// operations, the strength sum and the missing-file check. No DOM, no ComfyUI: tested with
// `node --test tests/js/`.
//
// The widget value is a JSON list of {"on", "lora", "strength", "strength_clip"} objects; a
// null strength_clip means "same as strength". That string is what a saved workflow holds and
// what the Python node parses, so every operation returns new rows and `serializeRows` is the
// one way back to text.

/** Summed |model strength| of enabled rows above which images tend to break (DESIGN.md). */
export const STRENGTH_LIMIT = 2.0;

/** File extensions ComfyUI lists in `models/loras`, as `lora/stack.py` strips them. */
export const LORA_EXTENSIONS = [".safetensors", ".ckpt", ".pt", ".pth", ".bin"];

const KNOWN_KEYS = ["on", "lora", "strength", "strength_clip"];

function toNumber(value, fallback) {
  const n = typeof value === "string" && value.trim() !== "" ? Number(value) : value;
  return typeof n === "number" && Number.isFinite(n) ? n : fallback;
}

/**
 * Return a row with every field present and typed; unknown keys are kept (a newer version's
 * fields survive an edit in an older UI).
 * @param {object} raw a row as parsed from JSON (or a partial one)
 * @returns {{on: boolean, lora: string, strength: number, strength_clip: number|null}}
 */
export function normalizeRow(raw) {
  const src = raw && typeof raw === "object" && !Array.isArray(raw) ? raw : {};
  const row = {
    on: src.on === undefined ? true : Boolean(src.on),
    lora: typeof src.lora === "string" ? src.lora : src.lora == null ? "" : String(src.lora),
    strength: toNumber(src.strength, 1.0),
    strength_clip:
      src.strength_clip === null || src.strength_clip === undefined ? null : toNumber(src.strength_clip, null),
  };
  for (const [k, v] of Object.entries(src)) {
    if (!KNOWN_KEYS.includes(k)) row[k] = v;
  }
  return row;
}

/**
 * Parse the `rows` widget value.
 * @param {string|Array|undefined|null} value the widget value (text, or an already parsed list)
 * @returns {{rows: Array, error: string|null}} rows with defaults; on bad input no rows and a message
 */
export function parseRows(value) {
  if (Array.isArray(value)) return { rows: value.map(normalizeRow), error: null };
  const text = typeof value === "string" ? value.trim() : "";
  if (!text) return { rows: [], error: null };
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    return { rows: [], error: `rows are not valid JSON (${e.message})` };
  }
  if (!Array.isArray(parsed)) return { rows: [], error: `rows must be a JSON list, got ${typeof parsed}` };
  return { rows: parsed.map(normalizeRow), error: null };
}

/**
 * Return the `rows` widget text for a list of rows (compact JSON, fixed key order).
 * @param {Array} rows
 * @returns {string}
 */
export function serializeRows(rows) {
  return JSON.stringify(rows.map(normalizeRow));
}

/** Return the rows with a new row appended. */
export function addRow(rows, lora = "", strength = 1.0) {
  return [...rows, normalizeRow({ on: true, lora, strength, strength_clip: null })];
}

/** Return the rows without row `index` (unchanged when out of range). */
export function removeRow(rows, index) {
  if (index < 0 || index >= rows.length) return rows.slice();
  return rows.filter((_, i) => i !== index);
}

/** Return the rows with row `from` moved to position `to` (clamped). */
export function moveRow(rows, from, to) {
  const out = rows.slice();
  if (from < 0 || from >= out.length) return out;
  const target = Math.max(0, Math.min(out.length - 1, to));
  const [row] = out.splice(from, 1);
  out.splice(target, 0, row);
  return out;
}

/** Return the rows with row `index`'s fields replaced by `patch` (normalised). */
export function updateRow(rows, index, patch) {
  return rows.map((row, i) => (i === index ? normalizeRow({ ...row, ...patch }) : row));
}

/** Return the rows with row `index` switched on/off (`on` omitted: flipped). */
export function toggleRow(rows, index, on) {
  const row = rows[index];
  if (!row) return rows.slice();
  return updateRow(rows, index, { on: on === undefined ? !row.on : Boolean(on) });
}

/** The CLIP strength a row applies: its own, or its model strength when null. */
export function clipStrength(row) {
  return row.strength_clip === null || row.strength_clip === undefined ? row.strength : row.strength_clip;
}

/** Whether a row counts: switched on and naming a file. */
export function isActive(row) {
  return Boolean(row.on) && typeof row.lora === "string" && row.lora !== "" && row.lora !== "None";
}

/**
 * Summed |model strength| of the enabled rows, rounded to 1e-9 so 0.7 + 0.7 + 0.6 is 2.
 * @param {Array} rows
 * @returns {number}
 */
export function strengthSum(rows) {
  const sum = rows.filter(isActive).reduce((acc, row) => acc + Math.abs(toNumber(row.strength, 0)), 0);
  return Math.round(sum * 1e9) / 1e9;
}

/** Whether a strength sum is past the limit (strictly above: exactly 2.0 is allowed). */
export function overLimit(sum, limit = STRENGTH_LIMIT) {
  return sum > limit;
}

function norm(name) {
  return name.replace(/\\/g, "/").trim().replace(/^\/+|\/+$/g, "");
}

function stem(name) {
  const low = name.toLowerCase();
  for (const ext of LORA_EXTENSIONS) {
    if (low.endsWith(ext)) return name.slice(0, -ext.length);
  }
  return name;
}

function basename(name) {
  const parts = name.split("/");
  return parts[parts.length - 1];
}

/**
 * The entry of `available` that `name` means, mirroring `lora.stack.resolve_lora_name`:
 * exact; either separator; without extension; unique basename; unique path suffix.
 * @param {string} name
 * @param {string[]} available ComfyUI's LoRA list
 * @returns {string|null} the entry, or null when nothing (or more than one) matches
 */
export function resolveLora(name, available) {
  if (!name) return null;
  if (available.includes(name)) return name;
  const target = norm(name);
  const byNorm = available.find((a) => norm(a) === target);
  if (byNorm !== undefined) return byNorm;
  const stemHits = available.filter((a) => stem(norm(a)).toLowerCase() === stem(target).toLowerCase());
  if (stemHits.length === 1) return stemHits[0];
  const base = stem(basename(target)).toLowerCase();
  const byBase = available.filter((a) => stem(basename(norm(a))).toLowerCase() === base);
  if (byBase.length === 1) return byBase[0];
  if (byBase.length > 1) {
    const suffix = byBase.filter((a) => stem(target).toLowerCase().endsWith(stem(norm(a)).toLowerCase()));
    if (suffix.length === 1) return suffix[0];
  }
  return null;
}

/**
 * Indices of rows naming a file that ComfyUI's LoRA list does not have (empty rows excluded).
 * Disabled rows are included: the server validates every row when the prompt is queued.
 * @param {Array} rows
 * @param {string[]|null} available the list; null (not loaded yet) reports nothing
 * @returns {number[]}
 */
export function missingRows(rows, available) {
  if (!Array.isArray(available)) return [];
  const out = [];
  rows.forEach((row, i) => {
    if (row.lora && row.lora !== "None" && resolveLora(row.lora, available) === null) out.push(i);
  });
  return out;
}

/**
 * A LoRA to preselect for a new row: the first of `available` not used yet, else the first.
 * @returns {string}
 */
export function nextLora(rows, available) {
  const used = new Set(rows.map((r) => r.lora));
  return available.find((a) => !used.has(a)) ?? available[0] ?? "";
}

/**
 * Group LoRA names by folder for a picker: [{folder, names}], root first, in list order.
 * @param {string[]} available
 * @returns {{folder: string, names: string[]}[]}
 */
export function groupByFolder(available) {
  const groups = new Map();
  for (const name of available) {
    const n = norm(name);
    const cut = n.lastIndexOf("/");
    const folder = cut < 0 ? "" : n.slice(0, cut);
    if (!groups.has(folder)) groups.set(folder, []);
    groups.get(folder).push(name);
  }
  const folders = [...groups.keys()].sort((a, b) => (a === "" ? -1 : b === "" ? 1 : a.localeCompare(b)));
  return folders.map((folder) => ({ folder, names: groups.get(folder) }));
}

/** Strength shown with two decimals, without "-0.00". */
export function formatStrength(value) {
  const n = toNumber(value, 0);
  const s = n.toFixed(2);
  return s === "-0.00" ? "0.00" : s;
}

/** Whether every row is switched on (false for no rows: there is nothing to switch off). */
export function allOn(rows) {
  return rows.length > 0 && rows.every((row) => row.on);
}

/**
 * "Toggle All": every row off when all are on, otherwise every row on (a partly-on stack turns
 * fully on first, as a header checkbox in an indeterminate state does).
 * @param {Array} rows
 * @returns {Array} new rows
 */
export function toggleAll(rows) {
  const on = !allOn(rows);
  return rows.map((row) => normalizeRow({ ...row, on }));
}

/** The step of the strength boxes (drag, wheel, arrow keys), as ComfyUI's LoRA loader's strength widget. */
export const STRENGTH_STEP = 0.05;
/** Screen pixels of horizontal drag per step. */
export const DRAG_PX_PER_STEP = 4;

/**
 * `value` moved by `steps` steps, rounded to the step's decimals so repeated steps do not drift
 * (0.1 + 0.05 * 4 is 0.30000000000000004 in floats).
 * @param {number} value
 * @param {number} steps whole steps, negative to lower
 * @param {number} step
 * @returns {number}
 */
export function stepStrength(value, steps, step = STRENGTH_STEP) {
  const n = Math.round((toNumber(value, 0) + steps * step) * 1e6) / 1e6;
  return n === 0 ? 0 : n; // no -0
}

/**
 * Whole steps for a horizontal drag of `dx` screen pixels (towards zero: a drag shorter than one
 * step changes nothing).
 * @param {number} dx
 * @param {number} pxPerStep
 * @returns {number}
 */
export function dragSteps(dx, pxPerStep = DRAG_PX_PER_STEP) {
  return Math.trunc(dx / pxPerStep);
}

/**
 * A LoRA name split for display: folder prefix with its trailing "/", the file's stem, and its
 * extension ("chars/lw_char.safetensors" -> "chars/", "lw_char", ".safetensors").
 * @param {string} name
 * @returns {{folder: string, base: string, ext: string}}
 */
export function splitName(name) {
  const n = norm(name ?? "");
  const cut = n.lastIndexOf("/");
  const folder = cut < 0 ? "" : n.slice(0, cut + 1);
  const file = n.slice(cut + 1);
  const base = stem(file);
  return { folder, base, ext: file.slice(base.length) };
}
