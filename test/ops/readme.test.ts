import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { startDaemon } from "../../src/daemon.js";
import { canonicalJson } from "../../src/util/canonical-json.js";
import { verifySignedDoc } from "../../src/util/identity.js";
import { LogSink } from "../helpers/daemon.js";
import { tempDir } from "../helpers/tmp.js";

/** The shell blocks of one README section, as written. */
function shellBlocks(readme: string, heading: string): string[] {
  const start = readme.indexOf(`\n## ${heading}\n`);
  assert.ok(start >= 0, `README has a "## ${heading}" section`);
  const end = readme.indexOf("\n## ", start + 1);
  const section = readme.slice(start, end < 0 ? undefined : end);
  return [...section.matchAll(/```sh\n([\s\S]*?)```/g)].map((m) => m[1]!);
}

describe("README", () => {
  it("the walk-through runs as written against a started daemon (config/dev.toml, its token)", async (t) => {
    const [walk] = shellBlocks(readFileSync("README.md", "utf8"), "Walk-through");
    assert.ok(walk);
    // config/dev.toml as `npm start` runs it, but on a free port and a temp state_dir (B and STATE say where).
    const dir = tempDir(t);
    const stateDir = path.join(dir, "state");
    const cfg = path.join(dir, "dev.toml");
    writeFileSync(
      cfg,
      readFileSync("config/dev.toml", "utf8")
        .replace('state_dir = "../.state/dev"', `state_dir = ${JSON.stringify(stateDir)}`)
        .replace('bind = "127.0.0.1:8787"', 'bind = "127.0.0.1:0"')
        .replace('token_file = "dev.token"', `token_file = ${JSON.stringify(path.resolve("config/dev.token"))}`),
    );
    const d = await startDaemon({ configFile: cfg, logDestination: new LogSink() });
    t.after(() => d.close());
    // Line by line as a terminal would run it (no `set -e`): every command must succeed anyway.
    // (spawn, not spawnSync: the daemon answering it runs in this process.)
    const child = spawn("bash", ["-c", walk!], { cwd: process.cwd(), env: { ...process.env, B: d.url, STATE: stateDir }, stdio: ["ignore", "pipe", "pipe"] });
    t.after(() => void child.kill("SIGKILL"));
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    const status = await new Promise<number | null>((resolve, reject) => {
      child.once("exit", (c) => resolve(c));
      setTimeout(() => reject(new Error(`the walk-through did not finish within 120 s:\n${stdout}\n${stderr}`)), 120_000).unref();
    });
    const r = { status, stdout, stderr };
    assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
    assert.equal(r.stderr, "", "no command complained");
    const out = r.stdout;
    const card = JSON.parse(readFileSync("/tmp/cb-card.json", "utf8"));
    const log = JSON.parse(readFileSync("/tmp/cb-log.json", "utf8"));
    assert.equal(card.provider_id, "dev-provider");
    assert.match(out, /\{"request_id":"demo-1","state":"provisioning","backend":"local"\}/, "the POST was accepted (202)");
    assert.equal(log.request_id, "demo-1");
    assert.equal(log.exit_code, 3);
    assert.ok(verifySignedDoc(log, card.public_key));
    assert.match(out, /^hello from the walk-through$/m, "the workload's stdout.log");
    assert.ok(out.includes(canonicalJson(log)) || out.includes(JSON.stringify(log)), "the ComputeLog's jsonl line");
    assert.match(out, /"grants":\[\{"request_id":"demo-1","state":"completed"/);
    assert.doesNotMatch(out, /"error":"/, "no error answer anywhere");
  });

  const verifyReady = !existsSync("dist/bundle/compute-bridge.js")
    ? "dist/ is not built (npm run build): npx compute-bridge runs the build"
    : spawnSync("python3", ["-c", "import cryptography"]).status !== 0
      ? "python3 with the cryptography module is not installed"
      : false;
  it("the walk-through's signature check runs as written (after the walk-through above)", { skip: verifyReady }, () => {
    const [, verify] = shellBlocks(readFileSync("README.md", "utf8"), "Walk-through");
    const r = spawnSync("bash", ["-c", verify!], { encoding: "utf8", timeout: 60_000 });
    assert.equal(r.status, 0, r.stdout + r.stderr);
    assert.equal(r.stdout, "ok  demo-1\nok    card dev-provider\nok    log demo-1\n");
  });
});
