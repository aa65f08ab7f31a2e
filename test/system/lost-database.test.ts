import assert from "node:assert/strict";
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { startDaemon } from "../../src/daemon.js";
import { ALLOW_NEW_DATABASE, LostDatabaseError } from "../../src/store/state-check.js";
import { tickIn } from "../helpers/config.js";
import { LogSink, startTestDaemon } from "../helpers/daemon.js";
import { call, until } from "../helpers/http.js";
import { scriptImage } from "../helpers/images.js";
import { alive } from "../helpers/proc.js";


describe("lost database", { timeout: 60_000 }, () => {
  it("an empty bridge.db in a used state dir refuses to start; started over deliberately, the orphan is stopped only with a record", async (t) => {
    const first = await startTestDaemon(t);
    const pids = path.join(first.dir, "pids");
    const img = scriptImage(first.dir, "long", `echo $$ > ${pids}; exec sleep 600`);
    const body = {
      grant: { request_id: "kept-1", region: "local", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: tickIn(600) },
      envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" }, command: ["./workload"] },
    };
    assert.equal((await call(first.url, "POST", "/v1/grants", body)).status, 202);
    await until(async () => (await call(first.url, "GET", "/v1/grants/kept-1")).body.state === "running", "the workload to run");
    const wl = Number(await until(() => existsSync(pids) && readFileSync(pids, "utf8").trim(), "its pid"));
    t.after(() => {
      try {
        process.kill(wl, "SIGKILL");
      } catch {
        /* stopped */
      }
    });
    await first.d.close(); // workloads keep running across a restart

    // A bad restore: the database is there but empty.
    writeFileSync(path.join(first.stateDir, "bridge.db"), "");
    rmSync(path.join(first.stateDir, "bridge.db-wal"), { force: true });
    rmSync(path.join(first.stateDir, "bridge.db-shm"), { force: true });
    await assert.rejects(startDaemon({ configFile: first.configFile, logDestination: new LogSink() }), (e: unknown) => {
      assert.ok(e instanceof LostDatabaseError, String(e));
      assert.match(e.message, /identity\.key.*1 local run directory/);
      assert.match(e.message, /empty \(0 bytes\)/);
      return true;
    });
    assert.ok(alive(wl), "nothing was stopped");
    assert.equal(existsSync(path.join(first.stateDir, "daemon.pid")), false, "the state dir lock was released");

    // The operator starts over on purpose: the workload has no grant now; it is stopped, and recorded.
    writeFileSync(path.join(first.stateDir, ALLOW_NEW_DATABASE), "");
    const logs = new LogSink();
    const second = await startDaemon({ configFile: first.configFile, logDestination: logs });
    t.after(() => second.close());
    await second.ready;
    await until(() => !alive(wl), "the orphan to be stopped", 10_000);
    const records = readFileSync(path.join(first.stateDir, "orphans.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l));
    assert.equal(records.length, 1);
    assert.equal(records[0].type, "orphan");
    assert.equal(records[0].backend, "local");
    assert.equal(records[0].request_id, "kept-1");
    assert.ok(records[0].stopped.processes.some((p: { pid: number; cmdline: string }) => p.pid === wl && /sleep 600/.test(p.cmdline)), JSON.stringify(records[0]));
    assert.match(logs.text, /stopping orphaned local workload/);
    assert.equal(existsSync(path.join(first.stateDir, ALLOW_NEW_DATABASE)), false);
  });
});
