import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { before, describe, it } from "node:test";
// @ts-expect-error: a plain .mjs script (scripts/build.mjs), no types
import { build } from "../../scripts/build.mjs";
import { call } from "../helpers/http.js";
import { writeLocalConfig } from "../helpers/config.js";
import { tempDir } from "../helpers/tmp.js";

const ROOT = path.resolve(".");
const BIN = path.join(ROOT, "bin", "compute-bridge.js");

// What bin/compute-bridge.js runs is the bundle in dist/bundle/ (scripts/build.mjs): these tests
// run that artefact, brought up to date first (nothing to do when the sources did not change).
describe("the built entry (bin/compute-bridge.js runs dist/bundle/)", () => {
  before(async () => {
    await (build as (root: string, o: { ifChanged: boolean }) => Promise<boolean>)(ROOT, { ifChanged: true });
  });

  it("--version prints package.json's version", () => {
    const { version } = JSON.parse(readFileSync("package.json", "utf8")) as { version: string };
    assert.equal(execFileSync(process.execPath, [BIN, "--version"], { encoding: "utf8" }), `${version}\n`);
  });

  it("run starts, answers /healthz and /v1/provider-card, and stops with 0 on SIGTERM", async (t) => {
    const dir = tempDir(t);
    const config = writeLocalConfig(dir, { stateDir: path.join(dir, "state") });
    const proc = spawn(process.execPath, [BIN, "run", "--config", config], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    proc.stdout.on("data", (d: Buffer) => (out += d.toString()));
    proc.stderr.on("data", (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
    t.after(() => void (proc.exitCode === null && proc.kill("SIGKILL")));
    const url = await new Promise<string>((resolve, reject) => {
      const onData = () => {
        const line = out.split("\n").find((l) => l.includes('"msg":"compute-bridge listening"'));
        if (line) resolve((JSON.parse(line) as { url: string }).url);
      };
      proc.stdout.on("data", onData);
      void exited.then((code) => reject(new Error(`exited (${code}) before listening:\n${out}`)));
    });
    const health = await call(url, "GET", "/healthz", undefined, {}, null);
    assert.equal(health.status, 200);
    assert.deepEqual(health.body, { status: "ok" });
    const card = await call(url, "GET", "/v1/provider-card");
    assert.equal(card.status, 200);
    assert.equal((card.body as { provider_id: string }).provider_id, "test-provider");
    proc.kill("SIGTERM");
    assert.equal(await exited, 0, out);
  });
});
