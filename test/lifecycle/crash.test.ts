import assert from "node:assert/strict";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import path from "node:path";
import { describe, it } from "node:test";
import { spawnDaemon, type ChildDaemon } from "../helpers/child-daemon.js";
import { tickIn, writeLocalConfig } from "../helpers/config.js";
import { call, until } from "../helpers/http.js";
import { scriptImage } from "../helpers/images.js";
import { tempDir } from "../helpers/tmp.js";
import { aliveInRun, liveLocalRuns, workloadPid } from "../helpers/proc.js";

const TERMINAL = ["completed", "failed", "expired", "cancelled"];

/** Serves one file; responses are held until `release()` so grants stay mid-provision. */
async function slowImageServer(t: { after: (fn: () => void) => void }, file: string) {
  const held: (() => void)[] = [];
  let open = false;
  const server = http.createServer((_req, res) => {
    const send = () => res.end(readFileSync(file));
    if (open) send();
    else held.push(send);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  t.after(() => server.close());
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/image`,
    release: () => {
      open = true;
      held.splice(0).forEach((f) => f());
    },
  };
}

describe("crash safety", () => {
  it("kill -9 while grants provision, run and terminate: every grant ends once, with a ComputeLog, nothing left running", async (t) => {
    const dir = tempDir(t);
    const stateDir = path.join(dir, "state");
    const starts = path.join(dir, "starts");
    const gate = path.join(dir, "gate");
    const config = writeLocalConfig(dir, { stateDir, logLevel: "info", imageAllowCidrs: ["127.0.0.1/32"] });
    const img = scriptImage(dir, "work", `echo "$ID" >> ${starts}; while [ ! -e ${gate} ]; do sleep 0.02; done; exit 5`);
    // The held grants get an image of their own: one already in the local image cache (filled by
    // the grants that run) would let them start without waiting for the download.
    const heldImg = scriptImage(dir, "held-work", `: held; echo "$ID" >> ${starts}; while [ ! -e ${gate} ]; do sleep 0.02; done; exit 5`);
    const slow = await slowImageServer(t, heldImg.file);
    let daemon: ChildDaemon | null = await spawnDaemon(config);
    t.after(async () => {
      if (daemon) await daemon.kill9();
    });

    const post = (url: string, id: string, image: { url: string; sha256: string }, validIn = 300) =>
      call(url, "POST", "/v1/grants", {
        grant: { request_id: id, region: "local", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: tickIn(validIn) },
        envelope: { image: { url: image.url, sha256: image.sha256, format: "bundle" }, env: { ID: id } },
      });

    // 20 grants that start running, 10 stuck mid-provision (image download held), 3 that will expire while the daemon is down.
    const running = Array.from({ length: 20 }, (_, i) => `run-${i}`);
    const provisioning = Array.from({ length: 10 }, (_, i) => `prov-${i}`);
    const expiring = Array.from({ length: 3 }, (_, i) => `exp-${i}`);
    for (const id of running) assert.equal((await post(daemon.url, id, img)).status, 202);
    for (const id of provisioning) assert.equal((await post(daemon.url, id, { url: slow.url, sha256: heldImg.sha256 })).status, 202);
    // Valid for 15 s: long enough to be accepted and started on a loaded machine, short enough to pass while the daemon is down.
    const expiringValidIn = 15;
    const expiresAtMs = Date.now() + expiringValidIn * 1000;
    for (const id of expiring) assert.equal((await post(daemon.url, id, img, expiringValidIn)).status, 202);
    // Every running grant started (the expiring ones may or may not have: either way they end expired).
    const startedIds = () => (existsSync(starts) ? readFileSync(starts, "utf8").trim().split("\n") : []);
    await until(() => running.every((id) => startedIds().includes(id)), "the 20 running grants' workloads to start", 120_000);
    const states = await call(daemon.url, "GET", "/v1/grants?limit=1000");
    assert.ok(states.body.grants.some((g: { state: string }) => g.state === "provisioning"), `some grants are mid-provision at the kill: ${JSON.stringify(states.body.grants.map((g: { request_id: string; state: string }) => [g.request_id, g.state]))}`);

    await daemon.kill9();
    daemon = null;
    // The daemon is gone; workloads keep running under their supervisors. Let the expiring ones pass valid_to.
    slow.release();
    await until(() => Date.now() >= expiresAtMs + 1000, "the expiring grants' valid_to to pass while the daemon is down", 30_000, 100);

    daemon = await spawnDaemon(config);
    // Let the gate open only after the restart re-attached; then kill again while grants are finishing.
    writeFileSync(gate, "");
    await until(async () => {
      const r = await call(daemon!.url, "GET", "/v1/grants?state=terminating&limit=1000");
      const c = await call(daemon!.url, "GET", "/v1/grants?state=completed&limit=1000");
      return r.body.grants.length + c.body.grants.length > 0;
    }, "some grants to reach terminating/completed");
    await daemon.kill9();
    daemon = await spawnDaemon(config);

    const all = [...running, ...provisioning, ...expiring];
    await until(async () => {
      const r = await call(daemon!.url, "GET", "/v1/grants?limit=1000");
      return r.body.grants.length === all.length && r.body.grants.every((g: { state: string }) => TERMINAL.includes(g.state));
    }, "every grant to reach a terminal state", 120_000, 100);

    for (const id of all) {
      const log = await call(daemon.url, "GET", `/v1/grants/${id}/log`);
      assert.equal(log.status, 200, `ComputeLog for ${id}`);
    }
    const final = (await call(daemon.url, "GET", "/v1/grants?limit=1000")).body.grants as { request_id: string; state: string }[];
    for (const g of final.filter((x) => running.includes(x.request_id) || provisioning.includes(x.request_id))) assert.equal(g.state, "completed", `${g.request_id} completed`);
    for (const id of running) assert.equal((await call(daemon.url, "GET", `/v1/grants/${id}/log`)).body.exit_code, 5);
    for (const g of final.filter((x) => expiring.includes(x.request_id))) assert.equal(g.state, "expired", `${g.request_id} expired while the daemon was down`);

    const started = readFileSync(starts, "utf8").trim().split("\n");
    const counts = new Map<string, number>();
    for (const s of started) counts.set(s, (counts.get(s) ?? 0) + 1);
    for (const [id, n] of counts) assert.equal(n, 1, `${id} started ${n} times`);
    for (const id of [...running, ...provisioning]) assert.equal(counts.get(id), 1, `${id} ran exactly once`);

    // No supervisor or workload left running.
    assert.deepEqual([...liveLocalRuns(stateDir).keys()], [], "no supervisor or workload still alive");
    assert.equal(await daemon.stop(), 0, "graceful stop exits 0");
    daemon = null;
  });

  it("SIGTERM stops within 10 s without terminating workloads; the next start resumes them", async (t) => {
    const dir = tempDir(t);
    const stateDir = path.join(dir, "state");
    const gate = path.join(dir, "gate");
    const config = writeLocalConfig(dir, { stateDir });
    const img = scriptImage(dir, "work", `while [ ! -e ${gate} ]; do sleep 0.02; done; exit 9`);
    let daemon: ChildDaemon | null = await spawnDaemon(config);
    t.after(async () => {
      if (daemon) await daemon.kill9();
    });
    const r = await call(daemon.url, "POST", "/v1/grants", {
      grant: { request_id: "term-1", region: "local", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: tickIn(300) },
      envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" } },
    });
    assert.equal(r.status, 202);
    await until(async () => (await call(daemon!.url, "GET", "/v1/grants/term-1")).body.state === "running", "running");
    const pid = await workloadPid(path.join(stateDir, "local", "runs", "term-1"));
    const t0 = Date.now();
    assert.equal(await daemon.stop(), 0);
    daemon = null;
    assert.ok(Date.now() - t0 < 10_000, "stopped within 10 s");
    assert.ok(aliveInRun(pid, path.join(stateDir, "local", "runs", "term-1")), "the workload kept running");
    daemon = await spawnDaemon(config);
    writeFileSync(gate, "");
    await until(async () => (await call(daemon!.url, "GET", "/v1/grants/term-1")).body.state === "completed", "completed after restart");
    assert.equal((await call(daemon.url, "GET", "/v1/grants/term-1/log")).body.exit_code, 9);
  });
});
