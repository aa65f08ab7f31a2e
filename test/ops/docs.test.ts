import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import type { z } from "zod";
import { BootConfig } from "../../src/config/schema.js";

/** Every object key anywhere in a zod schema, as "section.key" paths (records and arrays looked through). */
function keys(s: z.ZodType, prefix: string, out: Set<string>): Set<string> {
  const def = (s as unknown as { _zod: { def: Record<string, unknown> & { type: string } } })._zod.def;
  switch (def.type) {
    case "object":
      for (const [k, v] of Object.entries(def.shape as Record<string, z.ZodType>)) {
        out.add(`${prefix}${k}`);
        keys(v, `${prefix}${k}.`, out);
      }
      break;
    case "optional":
    case "nullable":
    case "default":
    case "prefault":
    case "readonly":
    case "catch":
      keys(def.innerType as z.ZodType, prefix, out);
      break;
    case "pipe":
      keys(def.in as z.ZodType, prefix, out);
      break;
    case "record":
      keys(def.valueType as z.ZodType, `${prefix}*.`, out);
      break;
    case "array":
      keys(def.element as z.ZodType, prefix, out);
      break;
    case "union":
      for (const o of def.options as z.ZodType[]) keys(o, prefix, out);
      break;
  }
  return out;
}

describe("docs", () => {
  it("config/example.toml documents every key of the boot config schema", () => {
    const text = readFileSync("config/example.toml", "utf8");
    const missing = [...keys(BootConfig, "", new Set())]
      .map((p) => p.split(".").at(-1)!)
      .filter((k, i, a) => a.indexOf(k) === i)
      // As `key = ...` (in a line, a comment or an inline table) or as a [table] name.
      .filter((k) => !new RegExp(`(^|[\\s{,#])${k}\\s*=|\\[[^\\]]*\\b${k}\\b[^\\]]*\\]`, "m").test(text));
    assert.deepEqual(missing, [], "keys of src/config/schema.ts that config/example.toml does not mention");
  });
});
