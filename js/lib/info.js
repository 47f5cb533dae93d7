// Turning a `/lora_workbench/info` answer into what the panels show. No DOM, no ComfyUI.

/** Family ids (lora/metadata.py) to display names. */
export const FAMILY_NAMES = { sd1: "SD 1.x", sd2: "SD 2.x", sdxl: "SDXL", sd3: "SD3", flux: "Flux" };

function listOrOne(value) {
  if (Array.isArray(value)) return value.length ? value.map(String).join(", ") : "-";
  return value === null || value === undefined || value === "" ? "-" : String(value);
}

/**
 * Settings as "key: value" strings, sorted by key; objects as compact JSON.
 * @param {object|null} settings
 * @returns {string[]}
 */
export function settingsLines(settings) {
  if (!settings || typeof settings !== "object") return [];
  return Object.keys(settings)
    .sort()
    .map((k) => {
      const v = settings[k];
      return `${k}: ${v !== null && typeof v === "object" ? JSON.stringify(v) : String(v)}`;
    });
}

/**
 * Label/value pairs for the LoRA Info panel.
 * @param {object|null} info the route's JSON
 * @returns {{label: string, value: string, key: string}[]}
 */
export function infoRows(info) {
  if (!info) return [];
  return [
    { key: "rank", label: "Rank", value: listOrOne(info.rank) },
    { key: "alpha", label: "Alpha", value: listOrOne(info.alpha) },
    { key: "base_family", label: "Base", value: FAMILY_NAMES[info.base_family] ?? listOrOne(info.base_family) },
  ];
}

/**
 * A small cache of info answers by name with at most one request in flight per name.
 * `fetcher(name)` returns a Promise of the JSON; failures are cached as {exists:false, error}.
 */
export class InfoCache {
  constructor(fetcher) {
    this.fetcher = fetcher;
    this.values = new Map();
    this.pending = new Map();
  }

  /** The cached answer (or undefined). */
  peek(name) {
    return this.values.get(name);
  }

  /** The answer for `name`, fetched once. */
  get(name) {
    if (this.values.has(name)) return Promise.resolve(this.values.get(name));
    if (this.pending.has(name)) return this.pending.get(name);
    const p = Promise.resolve()
      .then(() => this.fetcher(name))
      .catch((e) => ({ name, exists: false, error: String(e?.message ?? e) }))
      .then((value) => {
        this.values.set(name, value);
        this.pending.delete(name);
        return value;
      });
    this.pending.set(name, p);
    return p;
  }

  /** Forget every answer (the LoRA list was refreshed: files may have changed). */
  clear() {
    this.values.clear();
  }
}
