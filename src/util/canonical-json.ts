import { hash } from "node:crypto";

/**
 * The JSON Canonicalization Scheme (RFC 8785, "JCS"): the bytes every digest and signature of the
 * bridge is computed over.
 *
 * - Object members sorted by their names as arrays of UTF-16 code units (RFC 8785 §3.2.3; what
 *   JavaScript's default sort compares), at every depth; no whitespace.
 * - Numbers as ECMAScript's Number::toString (§3.2.2.3): shortest round-trip digits, exponent
 *   from 1e21 and below 1e-6, `-0` as `0`; NaN and ±Infinity have no JSON form and are refused.
 * - Strings as ECMAScript's JSON.stringify escapes them (§3.2.2.2): `\b \t \n \f \r \" \\`, other
 *   control characters as lowercase `\u00xx`, everything else as is (UTF-8 on the wire); a lone
 *   surrogate is not I-JSON (RFC 7493) and is refused.
 * - JavaScript-only values: members whose value is `undefined` are left out (as JSON.stringify
 *   does), a Date is its ISO string; anything else without a JSON form (bigint, function) is refused.
 */
export function canonicalJson(value: unknown): string {
  return serialize(value, "$");
}

const LONE_SURROGATE = /\p{Surrogate}/u;

function serialize(v: unknown, at: string): string {
  if (v === null) return "null";
  switch (typeof v) {
    case "boolean":
      return v ? "true" : "false";
    case "number":
      if (!Number.isFinite(v)) throw new TypeError(`canonical JSON: ${at} is ${v}, which JSON cannot represent`);
      return JSON.stringify(v); // Number::toString; -0 gives "0"
    case "string":
      if (LONE_SURROGATE.test(v)) throw new TypeError(`canonical JSON: ${at} holds a lone surrogate (not I-JSON)`);
      return JSON.stringify(v);
    case "object": {
      if (Array.isArray(v)) return `[${v.map((x, i) => (x === undefined ? "null" : serialize(x, `${at}[${i}]`))).join(",")}]`;
      if (v instanceof Date) return serialize(v.toISOString(), at);
      const o = v as Record<string, unknown>;
      const parts: string[] = [];
      for (const k of Object.keys(o).sort()) {
        const x = o[k];
        if (x === undefined) continue;
        if (LONE_SURROGATE.test(k)) throw new TypeError(`canonical JSON: a member name in ${at} holds a lone surrogate (not I-JSON)`);
        parts.push(`${JSON.stringify(k)}:${serialize(x, `${at}.${k}`)}`);
      }
      return `{${parts.join(",")}}`;
    }
    default:
      throw new TypeError(`canonical JSON: ${at} is a ${typeof v}, which JSON cannot represent`);
  }
}

export function sha256Hex(data: string | Buffer): string {
  return hash("sha256", data, "hex");
}
