#!/usr/bin/env node
// Compile src/ to dist/ (tsc -p tsconfig.build.json) and stamp the build.
//   node scripts/build.mjs               always build (npm run build, npm ci's prepare)
//   node scripts/build.mjs --if-changed  only when an input changed since the last stamp (npm start)
// Inputs: every file and directory under src/ (a deleted file changes its directory's mtime),
// tsconfig.json, tsconfig.build.json, package.json and package-lock.json.
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const INPUT_FILES = ["tsconfig.json", "tsconfig.build.json", "package.json", "package-lock.json"];
export const STAMP = "dist/.build-stamp";

/** The newest mtime (ms) of the build's inputs under `root`. */
export function newestInput(root) {
  let newest = 0;
  const see = (p) => {
    if (existsSync(p)) newest = Math.max(newest, statSync(p).mtimeMs);
  };
  const walk = (dir) => {
    see(dir);
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else see(p);
    }
  };
  if (existsSync(path.join(root, "src"))) walk(path.join(root, "src"));
  for (const f of INPUT_FILES) see(path.join(root, f));
  return newest;
}

/** Is dist/ older than its inputs (or not stamped at all)? */
export function isStale(root) {
  const stamp = path.join(root, STAMP);
  return !existsSync(stamp) || newestInput(root) > statSync(stamp).mtimeMs;
}

/** Build (unless ifChanged and nothing changed); returns whether it built. Throws if the compiler fails. */
export function build(root, { ifChanged = false, tsc } = {}) {
  if (ifChanged && !isStale(root)) return false;
  const started = Date.now();
  const cmd = tsc ?? [process.execPath, path.join(path.dirname(createRequire(import.meta.url).resolve("typescript/package.json")), "bin", "tsc"), "-p", "tsconfig.build.json"];
  const r = spawnSync(cmd[0], cmd.slice(1), { cwd: root, stdio: "inherit" });
  if (r.status !== 0) throw new Error(`the build failed (${cmd.slice(1).join(" ")}: exit ${r.status ?? r.signal})`);
  // The stamp carries the time the build started: an edit made while it ran counts as a change.
  const stamp = path.join(root, STAMP);
  writeFileSync(stamp, `${new Date(started).toISOString()}\n`);
  utimesSync(stamp, new Date(started), new Date(started));
  return true;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
  try {
    const built = build(root, { ifChanged: process.argv.includes("--if-changed") });
    if (!built) process.stderr.write("build: dist/ is up to date\n");
  } catch (e) {
    process.stderr.write(`${e.message}\n`);
    process.exit(1);
  }
}
