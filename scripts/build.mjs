#!/usr/bin/env node
// Compile src/ to dist/ (tsc -p tsconfig.build.json: type-checks, one module per source file),
// bundle the daemon into dist/bundle/ (what bin/compute-bridge.js runs), and stamp the build.
//   node scripts/build.mjs               always build (npm run build, npm ci's prepare)
//   node scripts/build.mjs --if-changed  only when an input changed since the last stamp (npm start)
//
// Why a bundle: at start-up Node resolves, reads and links every module file one by one, and the
// daemon's dependencies are about 400 files (zod alone 95, @opentelemetry/api 51, semver 47,
// fastify 32, prom-client 32). The bundle takes 13-21 % less CPU to listening with every backend
// configured (bench/core.ts prints both, bundled and not). What stays outside the bundle, loaded from node_modules
// as before: native modules (better-sqlite3, ssh2 and its optional native parts) and the cloud
// SDKs, which their backends import on first use. Splitting keeps that laziness: each backend is
// its own chunk, loaded only when its section is configured, with its external imports inside it.
// Inputs: every file and directory under src/ (a deleted file changes its directory's mtime),
// tsconfig.json, tsconfig.build.json, package.json and package-lock.json.
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const INPUT_FILES = ["tsconfig.json", "tsconfig.build.json", "package.json", "package-lock.json"];
export const STAMP = "dist/.build-stamp";
export const BUNDLE_DIR = "dist/bundle";
/** Loaded from node_modules at run time, never bundled (see above). */
export const EXTERNAL = ["better-sqlite3", "ssh2", "@aws-sdk/*", "@smithy/*", "@google-cloud/*", "google-auth-library", "@azure/*"];

/**
 * Bundle src/cli.ts (and the store's writer thread, which store.ts starts from the file beside
 * it) into dist/bundle/ with esbuild, replacing what was there.
 */
export async function bundle(root) {
  const esbuild = await import("esbuild");
  const out = path.join(root, BUNDLE_DIR);
  rmSync(out, { recursive: true, force: true });
  const { version } = JSON.parse(readFileSync(path.join(root, "package.json"), "utf8"));
  await esbuild.build({
    absWorkingDir: root,
    entryPoints: { "compute-bridge": "src/cli.ts", "writer-thread": "src/store/writer-thread.ts" },
    outdir: BUNDLE_DIR,
    chunkNames: "chunk-[hash]",
    bundle: true,
    splitting: true,
    format: "esm",
    platform: "node",
    target: "node20.12",
    sourcemap: true,
    external: EXTERNAL,
    logLevel: "warning",
    // The version is fixed at build time (version.ts reads package.json otherwise).
    define: { __CB_VERSION__: JSON.stringify(version) },
    // Bundled CommonJS dependencies (fastify, pino, prom-client) call require() for Node's own modules.
    banner: { js: 'import { createRequire as __cbCreateRequire } from "node:module";\nconst require = __cbCreateRequire(import.meta.url);' },
  });
}

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

/**
 * Build (unless ifChanged and nothing changed); returns whether it built. Throws if the compiler
 * or the bundler fails. `tsc` and `bundler` replace the real ones (tests).
 */
export async function build(root, { ifChanged = false, tsc, bundler = bundle } = {}) {
  if (ifChanged && !isStale(root)) return false;
  const started = Date.now();
  const cmd = tsc ?? [process.execPath, path.join(path.dirname(createRequire(import.meta.url).resolve("typescript/package.json")), "bin", "tsc"), "-p", "tsconfig.build.json"];
  const r = spawnSync(cmd[0], cmd.slice(1), { cwd: root, stdio: "inherit" });
  if (r.status !== 0) throw new Error(`the build failed (${cmd.slice(1).join(" ")}: exit ${r.status ?? r.signal})`);
  try {
    await bundler(root);
  } catch (e) {
    throw new Error(`the build failed (bundling ${BUNDLE_DIR}: ${e.message})`);
  }
  // The stamp carries the time the build started: an edit made while it ran counts as a change.
  const stamp = path.join(root, STAMP);
  writeFileSync(stamp, `${new Date(started).toISOString()}\n`);
  utimesSync(stamp, new Date(started), new Date(started));
  return true;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
  try {
    const built = await build(root, { ifChanged: process.argv.includes("--if-changed") });
    if (!built) process.stderr.write("build: dist/ is up to date\n");
  } catch (e) {
    process.stderr.write(`${e.message}\n`);
    process.exit(1);
  }
}
