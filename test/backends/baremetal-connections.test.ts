// The bare-metal backend's SSH connections, restart and doctor, against real OpenSSH servers on
// 127.0.0.1 (test/fakes/sshd.ts) running the systemd stand-ins (test/fakes/bin): drops,
// keepalives, host-key pinning, unreachable machines, a server with fewer sessions, reconcile after
// a restart, doctor, and declines from config. Workloads on systemd machines are in
// baremetal.test.ts, virsh machines in baremetal-virsh.test.ts; the files run side by side.
//
//   node --import tsx --test test/backends/baremetal-connections.test.ts
//
// Synchronisation is by polling (short intervals) for an event (a file, a poll, a unit state),
// never by sleeping a fixed time; ceilings are generous, they only bound a failure.
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, afterEach, before, describe, it } from "node:test";
import { CapacityError, type ManagedBackend } from "../../src/backends/backend.js";
import type { ComputeGrant } from "../../src/domain/index.js";
import { Reservations } from "../../src/fleet/reservations.js";
import { ensureSshdInstalled, startSshd, type FakeSshd } from "../fakes/sshd.js";
import { scriptImage } from "../helpers/images.js";
import { alive, backend, grant, imageServer, machine, readPid, recorder, removeLeftovers, unitsOn, until, type ImageServer } from "./baremetal/harness.js";

const never = new AbortController().signal;



describe("bare-metal backend over SSH: connections, restart, doctor", () => {
  let tmp: string;
  let work: string;
  let srv: ImageServer;
  let A: FakeSshd;
  let B: FakeSshd;
  const open: ManagedBackend[] = [];
  const track = <T extends ManagedBackend>(b: T): T => (open.push(b), b);

  before(async () => {
    ensureSshdInstalled();
    tmp = mkdtempSync(path.join(os.tmpdir(), "cb-bm-conn-"));
    work = path.join(tmp, "work");
    srv = await imageServer();
    [A, B] = await Promise.all([startSshd(), startSshd()]);
  });

  after(async () => {
    await Promise.allSettled(open.map((b) => b.close?.()));
    await Promise.allSettled([A?.stop(), B?.stop()]);
    await srv?.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  afterEach(() => removeLeftovers([A, B]));

  function executable(name: string, body: string) {
    const img = scriptImage(tmp, name, body);
    return { ...srv.put(name, readFileSync(img.file)), format: "bundle" as const };
  }

  it("sshd killed mid-watch: the pool reconnects (backoff) and the watch finishes with the exit code", async () => {
    const gate = path.join(tmp, "drop.gate");
    const image = executable("gated", `while [ ! -e ${gate} ]; do sleep 0.05; done; exit 5`);
    const rec = recorder();
    const b = track(backend([machine("m1", A, work)], { rec }));
    await b.reconcile(new Set());
    const g = grant("drop-1");
    const inst = await b.provision(g, { image }, never);
    const watch = b.watchUntilExit(inst, new Date(g.valid_to), never);
    await until(() => (rec.calls.get("systemctl show:ok") ?? 0) >= 1, "the watch to poll");
    assert.ok((await A.dropSessions()) > 0, "sessions dropped");
    await until(() => rec.events.includes("m1:down"), "the drop to be noticed");
    await until(() => rec.events.lastIndexOf("m1:up") > rec.events.indexOf("m1:down"), "the reconnect", 60_000);
    writeFileSync(gate, "");
    const obs = await watch;
    assert.equal(obs.kind, "exited");
    assert.equal(obs.exit_code, 5);
    await b.terminate(inst);
  });

  it("keepalives detect a silent peer; the connection is re-opened", async () => {
    const rec = recorder();
    const b = track(backend([machine("m1", A, work)], { rec, cfg: { keepalive_interval_ms: 100, keepalive_count_max: 2 } }));
    await b.reconcile(new Set());
    assert.ok((await A.pauseSessions()) > 0);
    try {
      await until(() => rec.events.includes("m1:down"), "the keepalive timeout", 60_000);
      await until(() => rec.events.lastIndexOf("m1:up") > rec.events.indexOf("m1:down"), "the reconnect", 60_000);
    } finally {
      await A.resumeSessions();
    }
    await b.reconcile(new Set()); // a command on the new connection
  });

  it("host key mismatch: the machine is refused (no authentication), reported down, skipped by placement and doctor", async () => {
    const acceptedBefore = (A.logs().match(/Accepted publickey/g) ?? []).length;
    const rec = recorder();
    const b = track(backend([machine("m1", A, work, { region: "r9", host_key_sha256: `SHA256:${"A".repeat(43)}` }), machine("m2", B, work)], { rec }));
    await b.reconcile(new Set());
    const st = b.status() as { machines: Record<string, { state: string; reason?: string }>; machines_down: string[] };
    assert.equal(st.machines.m1!.state, "refused");
    assert.equal(st.machines.m1!.reason, "host_key_mismatch");
    assert.deepEqual(st.machines_down, ["m1"]);
    assert.equal(st.machines.m2!.state, "up");
    assert.match(b.stats().m1!.last_error ?? "", /host key mismatch: the server offered SHA256:\S+, the pinned host_key_sha256 is SHA256:A{43}/);
    const d = b.canSatisfy(grant("hk-1", 60_000, { region: "r9" }));
    assert.equal(d.ok === false && d.code, "backend_unavailable");
    await assert.rejects(b.provision(grant("hk-1", 60_000, { region: "r9" }), { image: executable("hk", "true") }, never), CapacityError);
    const checks = await b.check!();
    const ssh1 = checks.find((c) => c.check === "m1: ssh")!;
    assert.equal(ssh1.ok, false);
    assert.match(ssh1.detail, /host key mismatch/);
    assert.ok(checks.filter((c) => c.check.startsWith("m2: ")).every((c) => c.ok), JSON.stringify(checks));
    await b.reconcile(new Set()); // probed again: still refused
    assert.equal((b.status() as typeof st).machines.m1!.state, "refused");
    assert.equal((A.logs().match(/Accepted publickey/g) ?? []).length, acceptedBefore, "never authenticated to the impostor");
  });

  it("an unreachable machine is reported down, skipped by placement (grants go to the next one) and by doctor", async () => {
    const net = await import("node:net");
    const port = await new Promise<number>((resolve) => {
      const s = net.createServer().listen(0, "127.0.0.1", () => {
        const p = (s.address() as { port: number }).port;
        s.close(() => resolve(p));
      });
    });
    const rec = recorder();
    const dead = { ...machine("dead", A, work), port };
    const b = track(backend([dead, machine("m2", B, work)], { rec }));
    assert.equal(b.canSatisfy(grant("down-0")).ok, true, "before the first connect a machine counts as available");
    await b.reconcile(new Set());
    const st = b.status() as { machines: Record<string, { state: string; reason?: string }>; machines_down: string[] };
    assert.deepEqual(st.machines_down, ["dead"]);
    assert.equal(st.machines.dead!.reason, "unreachable");
    assert.ok(rec.events.includes("dead:down") && rec.events.includes("m2:up"), rec.events.join(","));
    const inst = await b.provision(grant("down-1"), { image: executable("down1", "exit 0") }, never);
    assert.equal(inst.details.machine, "m2", "first fit skips the machine that is down");
    const alone = track(backend([{ ...dead }], { rec: recorder() }));
    await alone.reconcile(new Set());
    const d = alone.canSatisfy(grant("down-2"));
    assert.equal(d.ok === false && d.code, "backend_unavailable");
    // Full and down: at_capacity comes first (backend.ts: the same order on every backend).
    const ledger = new Reservations();
    ledger.reserve({ request_id: "holds-all", backend: alone.name, placement: "dead", cpu_millicores: 4000, ram_mib: 4096 });
    const full = alone.canSatisfy(grant("down-3"), ledger.held(alone.name));
    assert.equal(full.ok === false && full.code, "at_capacity");
    const checks = await b.check!();
    assert.equal(checks.find((c) => c.check === "dead: ssh")!.ok, false);
    assert.match(checks.find((c) => c.check === "dead: ssh")!.detail, /ECONNREFUSED/);
    await b.terminate(inst);
  });

  it("doctor: read-only checks pass on a healthy machine and create nothing", async () => {
    const b = track(backend([machine("doc", A, work)]));
    const checks = await b.check!();
    assert.ok(checks.length >= 4);
    for (const c of checks) assert.ok(c.ok, `${c.check}: ${c.detail}`);
    assert.match(checks.find((c) => c.check === "doc: systemd")!.detail, /^systemd 252/);
    assert.equal(existsSync(path.join(work, "doc")), false, "work_dir not created");
    assert.deepEqual(unitsOn(A), []);
    // run_as: the user must exist on the machine.
    const withUser = await track(backend([machine("doc", A, work, { run_as: "nobody" })])).check!();
    assert.match(withUser.find((c) => c.check === "doc: run_as")?.detail ?? "", /workloads run as nobody \(uid 65534\)/);
    const noUser = (await track(backend([machine("doc", A, work, { run_as: "no_such_user_cb" })])).check!()).find((c) => c.check === "doc: run_as");
    assert.equal(noUser?.ok, false);
    assert.match(noUser?.detail ?? "", /user no_such_user_cb does not exist/);
  });

  it("restart: a new backend re-attaches live units (provision adopts, never starts twice) and removes orphans", async () => {
    const R = await startSshd();
    try {
      const starts = path.join(tmp, "restart.starts");
      const gate = path.join(tmp, "restart.gate");
      const orphanPid = path.join(tmp, "orphan.pid");
      const once = executable("once", `echo start >> ${starts}; while [ ! -e ${gate} ]; do sleep 0.05; done; exit 3`);
      const orphan = executable("orphan", `echo $$ > ${orphanPid}; exec sleep 600`);
      const b1 = track(backend([machine("r", R, work)]));
      const g = grant("live-1");
      const first = await b1.provision(g, { image: once }, never);
      await b1.provision(grant("orphan-1"), { image: orphan }, never);
      await until(() => existsSync(orphanPid) && existsSync(starts), "both workloads to start");
      mkdirSync(path.join(work, "r", "runs", "stale-1"), { recursive: true }); // leftovers of a finished grant
      await b1.close(); // the daemon stops; workloads outlive it

      const rec = recorder();
      const state2 = mkdtempSync(path.join(tmp, "state2-"));
      const b2 = track(backend([machine("r", R, work)], { rec, dir: state2 }));
      await b2.reconcile(new Set(["live-1"]));
      assert.deepEqual(unitsOn(R), ["cb-live-1.service"]);
      await until(() => !alive(readPid(orphanPid)), "the orphan to be stopped", 60_000);
      const orphans = readFileSync(path.join(state2, "orphans.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l));
      assert.deepEqual(orphans.map((o) => [o.type, o.backend, o.request_id, o.stopped.unit]), [["orphan", "baremetal", "orphan-1", "cb-orphan-1.service"]], "recorded before it was stopped; leftovers of a finished grant are no workload");
      assert.equal(existsSync(path.join(work, "r", "runs", "stale-1")), false);
      assert.equal(existsSync(path.join(work, "r", "runs", "orphan-1")), false);
      assert.ok(rec.events.includes("orphan:unit") && rec.events.includes("orphan:run_dir"), rec.events.join(","));
      const st = b2.status().machines as Record<string, { allocated_cpu_millicores: number; grants: number }>;
      assert.equal(st.r!.grants, 1, "the live grant's capacity counts again before any grant resumes");
      assert.equal(st.r!.allocated_cpu_millicores, 500);

      const again = await b2.provision(g, { image: once }, never);
      assert.equal(again.instance_id, first.instance_id);
      assert.equal(again.started_at, first.started_at);
      writeFileSync(gate, "");
      const obs = await b2.watchUntilExit(again, new Date(g.valid_to), never);
      assert.equal(obs.exit_code, 3);
      assert.equal(readFileSync(starts, "utf8"), "start\n", "the workload started exactly once");
      await b2.terminate(again);
      assert.deepEqual(unitsOn(R), []);
    } finally {
      await R.stop();
    }
  });
  it("adapts to a server that allows fewer sessions than max_channels_per_machine: commands queue, none fail", async () => {
    const S = await startSshd({ maxSessions: 2 });
    try {
      const image = executable("tiny", "exec sleep 600");
      const b = track(backend([machine("s", S, work)]));
      // More commands at once than the server allows sessions (2), fewer than the pool would open (8).
      const grants = Array.from({ length: 5 }, (_, i) => grant(`sess-${i}`, 60_000, { cpu_millicores: 100, ram_mib: 64 }));
      const insts = await Promise.all(grants.map((g) => b.provision(g, { image }, never)));
      assert.equal(unitsOn(S).length, 5);
      assert.ok(b.stats().s!.channel_limit <= 2, `limit adapted: ${b.stats().s!.channel_limit}`);
      await Promise.all(insts.map((i) => b.terminate(i)));
      assert.deepEqual(unitsOn(S), []);
    } finally {
      await S.stop();
    }
  });

  it("declines with reasons and reports capabilities from config only (no connection)", () => {
    const b = track(
      backend([
        machine("m1", A, work, { region: "r1", cpu_millicores: 2000, ram_mib: 1024 }),
        machine("t1", B, work, { region: "r2", mode: "virsh", tdx_capable: true, ovmf_path: "/usr/share/ovmf/OVMF.inteltdx.fd", cpu_millicores: 8000, ram_mib: 16384 }),
      ]),
    );
    assert.deepEqual(b.capabilities(), { regions: ["r1", "r2"], tdx_capable: true, max_cpu_millicores: 10000, max_ram_mib: 17408 });
    const code = (g: ComputeGrant) => {
      const s = b.canSatisfy(g);
      return s.ok ? "ok" : s.code;
    };
    assert.equal(code(grant("d1", 1000, { region: "eu-1" })), "region_not_served");
    assert.equal(code(grant("d2", 1000, { tdx_required: true })), "tdx_not_supported");
    assert.equal(code(grant("d3", 1000, { cpu_millicores: 4000 })), "too_large");
    assert.equal(code(grant("d4", 1000, { region: "r2", tdx_required: true })), "ok");
    assert.equal(code(grant("d5", 1000)), "ok");
    assert.deepEqual(b.stats().m1!.state, "idle", "nothing connected");
  });
});
