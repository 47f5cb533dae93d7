// The LoRA chooser's list as data: which names match what was typed, in which order. No DOM, no
// ComfyUI: tested with `node --test tests/js/`.
import { groupByFolder, splitName } from "./rows.js";

function tokens(query) {
  return (query ?? "")
    .replace(/\\/g, "/")
    .toLowerCase()
    .split(/\s+/)
    .filter(Boolean);
}

/**
 * How well one name matches the typed tokens: lower is better, null when a token is not in it.
 * Per token: 0 the file name starts with it, 1 the file name holds it, 2 a folder name starts
 * with it, 3 elsewhere in the path (e.g. across the "/"). The whole query equal to the file name
 * (without extension) or to the path ranks first.
 */
function score(name, toks, whole) {
  const { folder, base, ext } = splitName(name);
  const path = `${folder}${base}${ext}`.toLowerCase();
  const file = base.toLowerCase();
  const folders = folder.toLowerCase().split("/").filter(Boolean);
  let total = 0;
  for (const t of toks) {
    if (!path.includes(t)) return null;
    if (file.startsWith(t)) total += 0;
    else if (file.includes(t)) total += 1;
    else if (folders.some((f) => f.startsWith(t))) total += 2;
    else total += 3;
  }
  if (whole === file || whole === `${folder}${base}`.toLowerCase() || whole === path) total -= 10;
  return total;
}

/**
 * The chooser's entries for a query: every token (whitespace-separated, case-insensitive, either
 * path separator) must occur in the name's path. An empty query lists everything, root files first
 * then folder by folder (as `groupByFolder`); otherwise best matches first, then shorter paths,
 * then alphabetically.
 * @param {string[]} available ComfyUI's LoRA list
 * @param {string} query what was typed
 * @returns {{name: string, folder: string, base: string, ext: string}[]}
 */
export function filterLoras(available, query) {
  const list = Array.isArray(available) ? available : [];
  const toks = tokens(query);
  const entry = (name) => ({ name, ...splitName(name) });
  if (!toks.length) return groupByFolder(list).flatMap((g) => g.names.map(entry));
  const whole = toks.join(" ");
  const hits = [];
  for (const name of list) {
    const s = score(name, toks, whole);
    if (s !== null) hits.push({ s, name });
  }
  hits.sort((a, b) => a.s - b.s || a.name.length - b.name.length || a.name.localeCompare(b.name));
  return hits.map((h) => entry(h.name));
}

/**
 * The entry to highlight when the list opens or the query changes: for a new row (nothing typed)
 * the first file the stack does not use yet, so Enter adds a different LoRA each time; for a
 * replaced row its current file; otherwise the first entry. -1 for an empty list.
 * @param {{name: string}[]} entries
 * @param {{used?: string[], current?: string, query?: string}} opts
 * @returns {number}
 */
export function initialIndex(entries, { used = [], current = "", query = "" } = {}) {
  if (!entries.length) return -1;
  if (tokens(query).length) return 0;
  if (current) {
    const i = entries.findIndex((e) => e.name === current);
    if (i >= 0) return i;
  }
  const taken = new Set(used);
  const free = entries.findIndex((e) => !taken.has(e.name));
  return free >= 0 ? free : 0;
}

/**
 * The highlighted index after a key: ArrowDown/ArrowUp move by one and wrap, PageDown/PageUp by
 * `page` and stop at the ends, Home/End jump. Other keys leave it.
 * @param {number} index
 * @param {number} count entries shown
 * @param {string} key KeyboardEvent.key
 * @param {number} page
 * @returns {number}
 */
export function moveHighlight(index, count, key, page = 8) {
  if (count <= 0) return -1;
  const clamp = (i) => Math.max(0, Math.min(count - 1, i));
  switch (key) {
    case "ArrowDown":
      return index < 0 ? 0 : (index + 1) % count;
    case "ArrowUp":
      return index < 0 ? count - 1 : (index - 1 + count) % count;
    case "PageDown":
      return clamp(index + page);
    case "PageUp":
      return clamp(index - page);
    case "Home":
      return 0;
    case "End":
      return count - 1;
    default:
      return index;
  }
}
