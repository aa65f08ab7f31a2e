import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { tempDir } from "../helpers/tmp.js";

/** Dockerfile instructions with continuation lines joined. */
function instructions(text: string): { op: string; args: string; stage: number }[] {
  const out: { op: string; args: string; stage: number }[] = [];
  let stage = -1;
  const joined = text.replace(/\\\n/g, " ");
  for (const raw of joined.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([A-Z]+)\s+(.*)$/);
    assert.ok(m, `unparseable Dockerfile line: ${line}`);
    if (m[1] === "FROM") stage++;
    out.push({ op: m[1]!, args: m[2]!, stage });
  }
  return out;
}

describe("packaging", () => {
  it("Dockerfile: multi-stage, slim Node 24 LTS runtime, non-root, state volume, healthcheck, no secrets", () => {
    const ins = instructions(readFileSync("Dockerfile", "utf8"));
    const froms = ins.filter((i) => i.op === "FROM");
    assert.equal(froms.length, 2);
    assert.match(froms[0]!.args, /^node:24-\S+ AS build$/);
    assert.match(froms[1]!.args, /^node:24-bookworm-slim AS runtime$/);
    // The runtime is one of the versions package.json's engines admits.
    const engines = JSON.parse(readFileSync("package.json", "utf8")).engines.node as string;
    assert.equal(engines, "^20.12.0 || ^22.0.0 || ^24.0.0");
    assert.ok(engines.includes(`^${froms[1]!.args.match(/^node:(\d+)/)![1]}.`));
    const runtime = ins.filter((i) => i.stage === 1);
    assert.ok(runtime.some((i) => i.op === "COPY" && i.args.startsWith("--from=build") && i.args.includes("node_modules")));
    const user = runtime.filter((i) => i.op === "USER").at(-1);
    assert.ok(user && user.args !== "root" && user.args !== "0", "runs as a non-root user");
    assert.ok(runtime.some((i) => i.op === "VOLUME" && i.args.includes("/var/lib/compute-bridge")));
    const hc = runtime.find((i) => i.op === "HEALTHCHECK");
    assert.ok(hc && hc.args.includes('"healthcheck"'), "the health check uses the CLI (metrics_bind or TLS listener alike)");
    assert.ok(runtime.some((i) => i.op === "ENV" && i.args === "COMPUTE_BRIDGE_CONFIG=/etc/compute-bridge/bridge.toml"));
    for (const i of ins) {
      assert.ok(!(i.op === "ENV" || i.op === "ARG") || !/TOKEN|SECRET|PASSWORD|KEY/i.test(i.args), `no secret in ${i.op} ${i.args}`);
      assert.ok(!(i.op === "COPY" || i.op === "ADD") || !/\.token|secret|\.key\b|\.pem/.test(i.args), `no secret files copied: ${i.args}`);
    }
    // Everything the build stage copies exists in the repository.
    for (const i of ins.filter((x) => x.op === "COPY" && !x.args.startsWith("--from"))) {
      for (const src of i.args.split(/\s+/).slice(0, -1)) assert.ok(existsSync(src), `COPY source ${src} exists`);
    }
    const ignore = readFileSync(".dockerignore", "utf8");
    assert.match(ignore, /\*\.token/);
  });

  it("systemd unit: hardened, and accepted by systemd-analyze verify where it exists", (t) => {
    const unit = readFileSync("config/compute-bridge.service", "utf8");
    for (const k of ["Type=exec", "User=compute-bridge", "StateDirectory=compute-bridge", "ConfigurationDirectory=compute-bridge", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes", "Restart=on-failure", "RestartSec=", "TimeoutStopSec=15", "KillMode=process"])
      assert.ok(unit.includes(k), `unit has ${k}`);
    const analyze = spawnSync("sh", ["-c", "command -v systemd-analyze"], { encoding: "utf8" }).stdout.trim();
    if (!analyze) {
      t.diagnostic("systemd-analyze not installed (Debian package systemd); skipped the verify step");
      return;
    }
    // verify checks that ExecStart's binary exists: point it at this machine's node for the check.
    const dir = tempDir(t);
    const copy = path.join(dir, "compute-bridge.service");
    writeFileSync(copy, unit.replace("/usr/bin/node /opt/compute-bridge/bin/compute-bridge.js", `${process.execPath} ${path.resolve("bin/compute-bridge.js")}`));
    const r = spawnSync(analyze, ["verify", copy], { encoding: "utf8", env: { ...process.env, SYSTEMD_LOG_LEVEL: "warning" } });
    const relevant = (r.stderr + r.stdout).split("\n").filter((l) => l.includes("compute-bridge.service"));
    assert.deepEqual(relevant, [], `systemd-analyze verify complained:\n${r.stderr}`);
    void execFileSync;
  });
});

describe("grafana dashboard", () => {
  it("is valid JSON and only queries metrics the bridge exports", async (t) => {
    const dash = JSON.parse(readFileSync("config/grafana-dashboard.json", "utf8")) as { panels: { targets: { expr: string }[] }[] };
    const { startTestDaemon } = await import("../helpers/daemon.js");
    const { call } = await import("../helpers/http.js");
    const td = await startTestDaemon(t);
    const exported = (await call(td.url, "GET", "/metrics")).text;
    const names = new Set([...exported.matchAll(/^# TYPE (\S+)/gm)].map((m) => m[1]!));
    for (const p of dash.panels)
      for (const target of p.targets)
        for (const m of target.expr.matchAll(/\b((?:cb|process|nodejs)_[a-z0-9_]+)/g)) {
          const base = m[1]!.replace(/_(bucket|sum|count)$/, "");
          assert.ok(names.has(base), `dashboard queries ${m[1]}, which /metrics does not export`);
        }
  });
});
