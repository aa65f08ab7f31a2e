import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { main } from "../src/cli.js";
import { tempDir } from "./helpers/tmp.js";
import { startTestDaemon } from "./helpers/daemon.js";
import { tickIn } from "./helpers/config.js";
import { call, until } from "./helpers/http.js";
import { scriptImage } from "./helpers/images.js";

async function runCli(args: string[]) {
  let out = "";
  let err = "";
  const code = await main(args, { out: (s) => (out += s), err: (s) => (err += s) });
  return { code, out, err };
}

describe("CLI", () => {
  it("--version and --help", async () => {
    const v = await runCli(["--version"]);
    assert.equal(v.code, 0);
    assert.equal(v.out.trim(), JSON.parse(readFileSync("package.json", "utf8")).version);
    const h = await runCli(["--help"]);
    assert.equal(h.code, 0);
    assert.match(h.out, /check-config/);
    assert.equal((await runCli(["bogus"])).code, 2);
    assert.equal((await runCli(["run"])).code, 2, "run without --config is a usage error");
  });

  it("check-config validates the documented example and prints a card", async () => {
    const r = await runCli(["check-config", "config/example.toml"]);
    assert.equal(r.code, 0, r.err);
    const card = JSON.parse(r.out);
    assert.equal(card.provider_id, "acme-compute");
    assert.match(card.config_digest, /^[0-9a-f]{64}$/);
  });

  it("check-config exits 2 with the key path on a broken config", async (t) => {
    const dir = tempDir(t);
    const f = path.join(dir, "bad.toml");
    writeFileSync(f, readFileSync("config/dev.toml", "utf8").replace("max_concurrent = 8", "max_concurrent = -1"));
    const r = await runCli(["check-config", f]);
    assert.equal(r.code, 2);
    assert.match(r.err, /backends\.local\.max_concurrent/);
    const missing = await runCli(["check-config", path.join(dir, "nope.toml")]);
    assert.equal(missing.code, 2);
    assert.match(missing.err, /cannot read the config file/);
  });

  it("card prints the signed card with the persistent identity", async (t) => {
    const dir = tempDir(t);
    const f = path.join(dir, "dev.toml");
    writeFileSync(f, readFileSync("config/dev.toml", "utf8").replace('state_dir = "../.state/dev"', `state_dir = ${JSON.stringify(path.join(dir, "state"))}`));
    const a = await runCli(["card", "--config", f]);
    const b = await runCli(["card", "--config", f]);
    assert.equal(a.code, 0, a.err);
    assert.equal(JSON.parse(a.out).public_key, JSON.parse(b.out).public_key);
    assert.deepEqual(JSON.parse(a.out).regions, ["local"]);
  });

  it("grants list/show/cancel talk to the running daemon", async (t) => {
    const td = await startTestDaemon(t);
    // the CLI reads bind from the config: point it at the daemon's real port
    const f = path.join(td.dir, "cli.toml");
    writeFileSync(f, readFileSync(td.configFile, "utf8").replace('bind = "127.0.0.1:0"', `bind = "${td.url.replace("http://", "")}"`));
    const img = scriptImage(tempDir(t), "forever", "sleep 600");
    await call(td.url, "POST", "/v1/grants", {
      grant: { request_id: "cli-1", region: "local", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: tickIn(120) },
      envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" } },
    });
    await until(() => td.d.store.get("cli-1")?.state === "running", "running");
    const list = await runCli(["grants", "list", "--config", f]);
    assert.equal(list.code, 0, list.err);
    assert.match(list.out, /^REQUEST_ID\s+STATE/);
    assert.match(list.out, /cli-1\s+running\s+local\s+local-cli-1/);
    const show = await runCli(["grants", "show", "cli-1", "--config", f]);
    assert.equal(JSON.parse(show.out).state, "running");
    assert.ok(!show.out.includes("PRIVATE KEY"), "show never prints the per-grant private key");
    const cancel = await runCli(["grants", "cancel", "cli-1", "--config", f]);
    assert.equal(cancel.code, 0, cancel.err);
    await until(() => td.d.store.get("cli-1")?.state === "cancelled", "cancelled");
    const shown = JSON.parse((await runCli(["grants", "show", "cli-1", "--config", f])).out);
    assert.equal(shown.compute_log.exit_reason, "cancelled");
    const missing = await runCli(["grants", "show", "nope", "--config", f]);
    assert.equal(missing.code, 1);
    assert.match(missing.err, /404/);
    assert.equal((await runCli(["grants", "show", "--config", f])).code, 2);
  });

  it("doctor prints a table of checks and fails on an unreadable token", async (t) => {
    const dir = tempDir(t);
    const f = path.join(dir, "dev.toml");
    writeFileSync(path.join(dir, "dev.token"), "x-token-123456\n");
    writeFileSync(f, readFileSync("config/dev.toml", "utf8").replace('state_dir = "../.state/dev"', `state_dir = ${JSON.stringify(path.join(dir, "state"))}`));
    const ok = await runCli(["doctor", "--config", f]);
    assert.equal(ok.code, 0, ok.out + ok.err);
    assert.match(ok.out, /local\s+state directory writable\s+ok/);
    assert.match(ok.out, /listener\s+token readable\s+ok/);
    writeFileSync(f, readFileSync(f, "utf8").replace('token_file = "dev.token"', 'token_file = "missing.token"'));
    const bad = await runCli(["doctor", "--config", f]);
    assert.equal(bad.code, 1);
    assert.match(bad.out, /listener\s+token readable\s+FAIL\s+listener.token_file: cannot read/);
  });
});
