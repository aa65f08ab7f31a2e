import { execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../../", import.meta.url));

/**
 * A module of the compiled build, which is what the daemon runs (bin/compute-bridge.js loads
 * dist/). dist/ is brought up to date first (tsc's incremental build: a second or two when
 * nothing changed), so a bench never measures stale output. Types come from the source:
 *   const { Store } = await fromDist<typeof import("../src/store/store.js")>("store/store.js");
 */
export async function fromDist<T>(modulePath: string): Promise<T> {
  buildOnce();
  return (await import(new URL(`../../dist/${modulePath}`, import.meta.url).href)) as T;
}

let built = false;
function buildOnce(): void {
  if (built) return;
  const tsc = path.join(path.dirname(createRequire(import.meta.url).resolve("typescript/package.json")), "bin", "tsc");
  execFileSync(process.execPath, [tsc, "-p", "tsconfig.build.json"], { cwd: ROOT, stdio: ["ignore", "inherit", "inherit"] });
  built = true;
}
