#!/usr/bin/env node
// Entry point: runs the bundled CLI from dist/bundle/ (built by `npm run build`, which `npm ci` runs via `prepare`).
import { existsSync } from "node:fs";
import module from "node:module";

const entry = new URL("../dist/bundle/compute-bridge.js", import.meta.url);
if (!existsSync(entry)) {
  process.stderr.write('{"level":"fatal","service":"compute-bridge","msg":"dist/bundle/ is missing; run `npm run build` first"}\n');
  process.exit(1);
}
// Node 22.1+ keeps V8's compiled code between starts (in $NODE_COMPILE_CACHE, else under the OS
// temp dir), which shortens the next start; Node 20 has no such cache and starts without it.
module.enableCompileCache?.();
const { main } = await import(entry.href);
const code = await main(process.argv.slice(2));
process.exitCode = code;
// `run` returns once the daemon has closed (or could not start): give the asynchronous log
// destination a moment to drain, then exit whatever is left (a stuck socket, a timer).
if (process.argv[2] === "run") setTimeout(() => process.exit(code), 300).unref();
else process.exit(code);
