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
import { signedLogAndCard } from "./helpers/signed.js";

async function runCli(args: string[]) {
  let out = "";
  let err = "";
  const code = await main(args, { out: (s) => (out += s), err: (s) => (err += s) });
  return { code, out, err };
}

describe("CLI", () => {
  it("--version, -V, version and --help; per-command --help", async () => {
    const pkg = JSON.parse(readFileSync("package.json", "utf8")).version;
    for (const v of [["--version"], ["-V"], ["version"]]) {
      const r = await runCli(v);
      assert.equal(r.code, 0, v.join(" "));
      assert.equal(r.out.trim(), pkg);
    }
    const h = await runCli(["--help"]);
    assert.equal(h.code, 0);
    for (const c of ["run", "check-config", "card", "grants", "doctor", "verify-log", "version"]) assert.match(h.out, new RegExp(`^  ${c} `, "m"));
    assert.match(h.out, /Exit codes: 0 ok; 1 .*; 2 usage error/);
    assert.match(h.out, /COMPUTE_BRIDGE_CONFIG, else \/etc\/compute-bridge\/bridge\.toml/);
    for (const c of ["run", "check-config", "card", "grants", "doctor", "verify-log"]) {
      const r = await runCli([c, "--help"]);
      assert.equal(r.code, 0, `${c} --help: ${r.err}`);
      assert.match(r.out, new RegExp(`compute-bridge ${c}`));
      assert.equal(r.err, "");
      assert.deepEqual(await runCli(["help", c]), r);
    }
    assert.match((await runCli(["run", "--help"])).out, /--log-level/);
    assert.equal((await runCli([])).code, 2);
  });

  it("unknown commands and flags, missing and bad values: exit 2 with the reason", async () => {
    const cases: [string[], RegExp][] = [
      [["bogus"], /unknown command "bogus"/],
      [["card", "--bogus-flag"], /card: Unknown option '--bogus-flag'/],
      [["run", "--log-level", "loud"], /--log-level must be one of fatal, error, warn, info, debug, trace, silent \(got "loud"\)/],
      [["run", "--config"], /Option '-c, --config <value>' argument missing/],
      [["doctor", "extra"], /doctor: unexpected argument "extra"/],
      [["grants"], /grants needs list, show ID or cancel ID/],
      [["grants", "show"], /grants show needs a request id/],
      [["grants", "list", "--state", "nope"], /--state must be one of provisioning, running, /],
      [["verify-log", "x.json"], /verify-log needs --card CARD/],
      [["check-config", "a.toml", "--config", "b.toml"], /give the file once/],
    ];
    for (const [args, re] of cases) {
      const r = await runCli(args);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.err}`);
      assert.match(r.err, re, args.join(" "));
    }
  });

  it("--config defaults to $COMPUTE_BRIDGE_CONFIG, then /etc/compute-bridge/bridge.toml; check-config takes it as a flag too", async (t) => {
    const saved = process.env.COMPUTE_BRIDGE_CONFIG;
    t.after(() => (saved === undefined ? delete process.env.COMPUTE_BRIDGE_CONFIG : (process.env.COMPUTE_BRIDGE_CONFIG = saved)));
    delete process.env.COMPUTE_BRIDGE_CONFIG;
    const def = await runCli(["check-config"]);
    assert.equal(def.code, 2);
    assert.match(def.err, /\/etc\/compute-bridge\/bridge\.toml/);
    process.env.COMPUTE_BRIDGE_CONFIG = "config/example.toml";
    const env = await runCli(["check-config"]);
    assert.equal(env.code, 0, env.err);
    assert.equal(JSON.parse(env.out).provider_id, "acme-compute");
    delete process.env.COMPUTE_BRIDGE_CONFIG;
    for (const args of [["check-config", "--config", "config/example.toml"], ["check-config", "--config=config/example.toml"], ["check-config", "-c", "config/example.toml"]]) {
      const r = await runCli(args);
      assert.equal(r.code, 0, `${args.join(" ")}: ${r.err}`);
      assert.equal(JSON.parse(r.out).provider_id, "acme-compute");
    }
  });

  it("run: a config that cannot start the daemon is one JSON fatal line and exit 2", async (t) => {
    const r = await runCli(["run", "--config", path.join(tempDir(t), "missing.toml")]);
    assert.equal(r.code, 2);
    assert.equal(r.err, "");
    const lines = r.out.trim().split("\n");
    assert.equal(lines.length, 1);
    const l = JSON.parse(lines[0]!);
    assert.equal(l.level, "fatal");
    assert.equal(l.msg, "compute-bridge could not start");
    assert.match(l.err.message, /cannot read the config file/);
  });

  it("verify-log checks a ComputeLog (or compute-log.jsonl) against the card: exit 0, 1 on a tampered log", async (t) => {
    const td = await startTestDaemon(t);
    const { log, card, logFile, dir } = await signedLogAndCard(td.url, "vl-1", 3);
    const ok = await runCli(["verify-log", logFile, "--card", card]);
    assert.equal(ok.code, 0, ok.err);
    assert.equal(ok.out, "ok  vl-1\n");
    const jsonl = path.join(td.stateDir, "compute-log.jsonl");
    await until(() => readFileSync(jsonl, "utf8").includes("vl-1"), "the jsonl line");
    assert.equal((await runCli(["verify-log", jsonl, "--card", card])).code, 0);
    writeFileSync(logFile, JSON.stringify({ ...log, exit_code: 0 }));
    const bad = await runCli(["verify-log", logFile, "--card", card]);
    assert.equal(bad.code, 1);
    assert.equal(bad.out, "FAIL  vl-1  signature does not verify\n");
    const other = JSON.parse(readFileSync(card, "utf8"));
    writeFileSync(card, JSON.stringify({ ...other, provider_id: "someone-else" }));
    const badCard = await runCli(["verify-log", logFile, "--card", card]);
    assert.equal(badCard.code, 1);
    assert.match(badCard.err, /card's own signature does not verify/);
    assert.equal((await runCli(["verify-log", path.join(dir, "nope.json"), "--card", card])).code, 2);
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
    const r = await runCli(["check-config", "--config", f]);
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
    await until(async () => (await td.d.store.get("cli-1"))?.state === "running", "running");
    const list = await runCli(["grants", "list", "--config", f]);
    assert.equal(list.code, 0, list.err);
    assert.match(list.out, /^REQUEST_ID\s+STATE/);
    assert.match(list.out, /cli-1\s+running\s+local\s+local-cli-1/);
    const show = await runCli(["grants", "show", "cli-1", "--config", f]);
    assert.equal(JSON.parse(show.out).state, "running");
    assert.ok(!show.out.includes("PRIVATE KEY"), "show never prints the per-grant private key");
    const cancel = await runCli(["grants", "cancel", "cli-1", "--config", f]);
    assert.equal(cancel.code, 0, cancel.err);
    await until(async () => (await td.d.store.get("cli-1"))?.state === "cancelled", "cancelled");
    const shown = JSON.parse((await runCli(["grants", "show", "cli-1", "--config", f])).out);
    assert.equal(shown.compute_log.exit_reason, "cancelled");
    const missing = await runCli(["grants", "show", "nope", "--config", f]);
    assert.equal(missing.code, 1);
    assert.match(missing.err, /404/);
    assert.equal((await runCli(["grants", "show", "--config", f])).code, 2);
  });

  it("healthcheck asks /healthz (or /readyz) on metrics_bind when set, else on the listener", async (t) => {
    const plain = await startTestDaemon(t);
    const f = path.join(plain.dir, "cli.toml");
    writeFileSync(f, readFileSync(plain.configFile, "utf8").replace('bind = "127.0.0.1:0"', `bind = "${plain.url.replace("http://", "")}"`));
    const ok = await runCli(["healthcheck", "--config", f]);
    assert.equal(ok.code, 0, ok.err);
    assert.equal(ok.out, `ok /healthz on ${plain.url.replace("http://", "")}\n`);
    await plain.d.ready;
    assert.equal((await runCli(["healthcheck", "--ready", "--config", f])).code, 0);

    const sep = await startTestDaemon(t, { listenerExtra: 'metrics_bind = "127.0.0.1:0"' });
    const mb = sep.d.metricsUrl!.replace("http://", "");
    assert.equal((await call(sep.d.metricsUrl!, "GET", "/healthz", undefined, {}, null)).status, 200, "the metrics listener serves the probes");
    assert.equal((await call(sep.d.metricsUrl!, "GET", "/readyz", undefined, {}, null)).status, (await sep.d.ready, 200));
    const g = path.join(sep.dir, "cli.toml");
    writeFileSync(g, readFileSync(sep.configFile, "utf8").replace('metrics_bind = "127.0.0.1:0"', `metrics_bind = "${mb}"`));
    const viaMetrics = await runCli(["healthcheck", "--config", g]);
    assert.equal(viaMetrics.code, 0, viaMetrics.err);
    assert.equal(viaMetrics.out, `ok /healthz on ${mb}\n`);

    await plain.d.close();
    const down = await runCli(["healthcheck", "--config", f]);
    assert.equal(down.code, 1);
    assert.match(down.err, /ECONNREFUSED/);
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

describe("CLI: prices and budgets", () => {
  it("check-config prints the price table and the caps on stderr, the card alone on stdout", async () => {
    const out: string[] = [];
    const err: string[] = [];
    const code = await main(["check-config", "--config", "config/example.toml"], { out: (s: string) => void out.push(s), err: (s: string) => void err.push(s) } as never);
    assert.equal(code, 0);
    JSON.parse(out.join(""));
    const e = err.join("");
    assert.match(e, /fleet\s+policy\s+ordered/);
    assert.match(e, /aws\s+price m6i\.large\s+0\.096 USD\/h/);
    assert.match(e, /baremetal\s+price rack1-a\s+0\.02 USD per 1,000 millicores-hour, 0\.003 USD per GiB-hour/);
  });
});
