import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { describe, it } from "node:test";
import { DROPPED_DEFAULTS } from "../../src/metrics/metrics.js";
import { tickIn } from "../helpers/config.js";
import { startTestDaemon } from "../helpers/daemon.js";
import { call, until } from "../helpers/http.js";
import { scriptImage } from "../helpers/images.js";
import { tempDir } from "../helpers/tmp.js";

const promtool = spawnSync("sh", ["-c", "command -v promtool"], { encoding: "utf8" }).stdout.trim();

describe("/metrics", () => {
  it("passes `promtool check metrics` (Prometheus's linter) with every metric family populated", { skip: promtool ? false : "promtool is not installed (Debian package prometheus; scripts/test-deps.sh installs it as root)" }, async (t) => {
    const { url, d } = await startTestDaemon(t);
    const img = scriptImage(tempDir(t), "m", "exit 0");
    const grant = (id: string, region = "local") => ({
      grant: { request_id: id, region, tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: tickIn(120) },
      envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" } },
    });
    await call(url, "POST", "/v1/grants", grant("pm-1"));
    await call(url, "POST", "/v1/grants", grant("pm-2", "elsewhere"));
    await until(async () => (await d.store.get("pm-1"))?.state === "completed", "completed");
    const text = (await call(url, "GET", "/metrics")).text;
    const r = spawnSync(promtool, ["check", "metrics"], { input: text, encoding: "utf8", timeout: 60_000 });
    assert.equal(r.status, 0, `promtool check metrics:\n${r.stdout}${r.stderr}`);
    assert.equal((r.stdout + r.stderr).trim(), "", "no lint findings");
  });

  it("Node.js and process metrics under their stock names, without gauges named *_total", async (t) => {
    const { url } = await startTestDaemon(t);
    const text = (await call(url, "GET", "/metrics")).text;
    const types = new Map([...text.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((m) => [m[1]!, m[2]!]));
    for (const name of ["process_cpu_seconds_total", "process_resident_memory_bytes", "nodejs_eventloop_lag_p99_seconds", "nodejs_heap_size_used_bytes", "nodejs_active_handles", "cb_grants_in_flight"]) assert.ok(types.has(name), name);
    assert.ok(![...types.keys()].some((n) => n.startsWith("cb_process_") || n.startsWith("cb_nodejs_")), "no cb_ prefix on the defaults");
    for (const [name, type] of types) if (name.endsWith("_total")) assert.equal(type, "counter", `${name} is a ${type}`);
    for (const n of DROPPED_DEFAULTS) assert.ok(!types.has(n), n);
  });
});
