#!/usr/bin/env node
// Entry point: runs the compiled CLI from dist/ (built by `npm run build`, which `npm ci` runs via `prepare`).
import { existsSync } from "node:fs";

const entry = new URL("../dist/cli.js", import.meta.url);
if (!existsSync(entry)) {
  process.stderr.write('{"level":"fatal","service":"compute-bridge","msg":"dist/ is missing; run `npm run build` first"}\n');
  process.exit(1);
}
const { main } = await import(entry.href);
const code = await main(process.argv.slice(2));
process.exitCode = code;
// `run` returns once the daemon has closed (or could not start): give the asynchronous log
// destination a moment to drain, then exit whatever is left (a stuck socket, a timer).
if (process.argv[2] === "run") setTimeout(() => process.exit(code), 300).unref();
else process.exit(code);
