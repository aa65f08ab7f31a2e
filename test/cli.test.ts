import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { main } from "../src/cli.js";
import { tempDir } from "./helpers/tmp.js";

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
});
