import assert from "node:assert/strict";
import { mkdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
// @ts-expect-error: a plain .mjs script (scripts/build.mjs), no types
import { build, isStale, STAMP } from "../../scripts/build.mjs";
import { tempDir } from "../helpers/tmp.js";

type Build = (root: string, o?: { ifChanged?: boolean; tsc?: string[]; bundler?: (root: string) => Promise<void> }) => Promise<boolean>;

describe("npm start builds only when the sources changed (scripts/build.mjs)", () => {
  it("builds when unstamped or an input is newer, not otherwise; a failed build leaves it stale", async (t) => {
    const root = tempDir(t);
    mkdirSync(path.join(root, "src/sub"), { recursive: true });
    mkdirSync(path.join(root, "dist"));
    for (const f of ["src/a.ts", "src/sub/b.ts", "tsconfig.json", "package.json"]) writeFileSync(path.join(root, f), "x");
    const runs = path.join(root, "runs");
    const fakeTsc = [process.execPath, "-e", `require("fs").appendFileSync(${JSON.stringify(runs)}, "built\\n")`];
    const count = () => readFileSync(runs, "utf8").split("\n").filter(Boolean).length;
    const past = (f: string, s: number) => utimesSync(path.join(root, f), new Date(Date.now() - s * 1000), new Date(Date.now() - s * 1000));
    const bundled: string[] = [];
    const bundler = async (r: string) => void bundled.push(r);
    const b = (r: string, o: Parameters<Build>[1] = {}) => (build as Build)(r, { bundler, ...o });

    assert.equal(isStale(root), true, "never built");
    assert.equal(await b(root, { ifChanged: true, tsc: fakeTsc }), true);
    for (const f of ["src/a.ts", "src/sub/b.ts", "src/sub", "src", "tsconfig.json", "package.json"]) past(f, 60);
    assert.equal(isStale(root), false);
    assert.equal(await b(root, { ifChanged: true, tsc: fakeTsc }), false, "nothing changed: no build");
    assert.equal(count(), 1);

    writeFileSync(path.join(root, "src/sub/b.ts"), "changed");
    assert.equal(await b(root, { ifChanged: true, tsc: fakeTsc }), true, "a changed source rebuilds");
    past("src/sub/b.ts", 60);
    past("src/sub", 60);
    assert.equal(isStale(root), false);
    rmSync(path.join(root, "src/a.ts"));
    assert.equal(isStale(root), true, "a deleted source (its directory's mtime) rebuilds");
    await assert.rejects(b(root, { ifChanged: true, tsc: [process.execPath, "-e", "process.exit(2)"] }), /the build failed/);
    assert.equal(isStale(root), true, "still stale after a failed build");
    await assert.rejects(b(root, { ifChanged: true, tsc: fakeTsc, bundler: async () => Promise.reject(new Error("esbuild said no")) }), /the build failed \(bundling dist\/bundle: esbuild said no\)/);
    assert.equal(isStale(root), true, "still stale after a failed bundle");
    assert.equal(await b(root, { tsc: fakeTsc }), true, "without --if-changed it always builds");
    assert.equal(count(), 4);
    assert.equal(bundled.length, 3, "every successful compile is bundled");
    assert.match(readFileSync(path.join(root, STAMP as string), "utf8"), /^\d{4}-/);
  });

  it("package.json: start's prestart is the --if-changed build; build and prepare always build", () => {
    const s = JSON.parse(readFileSync("package.json", "utf8")).scripts;
    assert.equal(s.prestart, "node scripts/build.mjs --if-changed");
    assert.equal(s.build, "node scripts/build.mjs");
    assert.equal(s.prepare, "node scripts/build.mjs");
  });
});
