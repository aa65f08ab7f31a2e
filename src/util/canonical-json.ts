import { hash } from "node:crypto";

/**
 * Deterministic JSON: object keys sorted at every depth, no whitespace, `undefined` members
 * dropped. Used for digests and signatures, so the same data always gives the same bytes.
 */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(sortDeep(value));
}

function sortDeep(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(sortDeep);
  if (v instanceof Date) return v.toISOString();
  if (v !== null && typeof v === "object") {
    const out: Record<string, unknown> = {};
    for (const k of Object.keys(v).sort()) {
      const x = (v as Record<string, unknown>)[k];
      if (x !== undefined) out[k] = sortDeep(x);
    }
    return out;
  }
  return v;
}

export function sha256Hex(data: string | Buffer): string {
  return hash("sha256", data, "hex");
}
