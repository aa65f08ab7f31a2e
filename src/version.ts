import { readFileSync } from "node:fs";

/** Set by the bundler (scripts/build.mjs) to package.json's version; undefined elsewhere. */
declare const __CB_VERSION__: string | undefined;

/** The package version: fixed in the bundle, else read once from package.json next to src/ or dist/. */
export const VERSION: string = typeof __CB_VERSION__ === "string" ? __CB_VERSION__ : (() => {
  try {
    const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as { version?: string };
    return pkg.version ?? "0.0.0";
  } catch {
    return "0.0.0";
  }
})();
