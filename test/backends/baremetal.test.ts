// The bare-metal backend against real OpenSSH servers on 127.0.0.1 (test/fakes/sshd.ts, one per
// simulated machine) running the systemd / libvirt stand-ins (test/fakes/bin).
//
//   node --import tsx --test test/backends/baremetal.test.ts
//
// Synchronisation is by polling (short intervals), never by sleeping a fixed time.
import assert from "node:assert/strict";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, afterEach, before, describe, it } from "node:test";
import { CapacityError, ImageVerificationError, InvalidRequestError, type ManagedBackend } from "../../src/backends/backend.js";
import { bindingDigest } from "../../src/attestation/binding.js";
import { verifyTdxQuote } from "../../src/attestation/verify.js";
import type { ComputeGrant, ProvisionedInstance } from "../../src/domain/index.js";
import { Reservations } from "../../src/fleet/reservations.js";
import { shJoin } from "../../src/util/shell.js";
import { ensureSshdInstalled, startSshd, type FakeSshd } from "../fakes/sshd.js";
import { until } from "../helpers/http.js";
import { bundleImage, scriptImage } from "../helpers/images.js";
import {
  alive,
  backend,
  domainsOn,
  TD_QUOTE,
  grant,
  imageServer,
  installGuestCommand,
  lineLogger,
  machine,
  qcow2,
  recorder,
  sshRun,
  unitConf,
  unitState,
  unitsOn,
  virshBinDir,
  type ImageServer,
} from "./baremetal/harness.js";

const never = new AbortController().signal;

/** What the manager hands terminate() when it only knows the request_id. */
function placeholder(g: ComputeGrant): ProvisionedInstance {
  return { request_id: g.request_id, backend: "baremetal", instance_id: "", region: g.region, host: null, ssh_port: null, ssh_user: null, host_key_sha256: null, started_at: new Date(0).toISOString(), cpu_millicores: g.cpu_millicores, ram_mib: g.ram_mib, details: {} };
}

function readPid(file: string): number {
  return Number(readFileSync(file, "utf8").trim());
}

describe("bare-metal backend over SSH", () => {
  let tmp: string;
  let work: string;
  let srv: ImageServer;
  let A: FakeSshd;
  let B: FakeSshd;
  const open: ManagedBackend[] = [];
  const track = <T extends ManagedBackend>(b: T): T => (open.push(b), b);

  before(async () => {
    ensureSshdInstalled();
    tmp = mkdtempSync(path.join(os.tmpdir(), "cb-bm-"));
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

  // A test that failed half-way must not leave its units to the next one, whose assertions would
  // then fail too (a passing test has asserted by now that it left nothing behind).
  afterEach(async () => {
    for (const s of [A, B]) {
      const units = unitsOn(s).filter((u) => /^[A-Za-z0-9._-]+\.service$/.test(u));
      if (units.length > 0) await sshRun(s, shJoin(["/bin/sh", "-c", 'for u; do systemctl stop "$u"; systemctl reset-failed "$u"; done >/dev/null 2>&1; exit 0', "cb-cleanup", ...units]));
    }
  });

  /** A bundle served over http: { url, sha256, format }. */
  function bundle(name: string, body: string) {
    const img = bundleImage(tmp, name, body);
    return { ...srv.put(`${name}.tar.gz`, readFileSync(img.file)), format: "bundle" as const };
  }
  function executable(name: string, body: string) {
    const img = scriptImage(tmp, name, body);
    return { ...srv.put(name, readFileSync(img.file)), format: "bundle" as const };
  }

  it("runs a bundle to completion: exit code, CPU and peak memory from the host, env applied, limits set", async () => {
    const out = path.join(tmp, "run1.out");
    const gate = path.join(tmp, "run1.gate");
    // Busy first (CPU the host must account), then it waits for the gate: peak memory is what
    // `systemctl show` samples while the unit runs (the stand-in has no cgroup whose memory.peak
    // the ExecStopPost recorder could read), so the test lets a poll see it running before it ends.
    const image = bundle("run1", `echo "$GREETING" > ${out}; i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; while [ ! -e ${gate} ]; do sleep 0.05; done; exit 7`);
    const rec = recorder();
    const b = track(backend([machine("m1", A, work)], { rec }));
    const g = grant("run-1");
    const inst = await b.provision(g, { image, env: { GREETING: "hello" } }, never);
    assert.equal(inst.instance_id, "m1/cb-run-1.service");
    assert.equal(inst.details.machine, "m1");
    assert.deepEqual(unitsOn(A), ["cb-run-1.service"]);
    // The unit as systemd reports it: the grant's limits, RemainAfterExit, no --collect, RuntimeMaxSec.
    const show = await sshRun(A, "systemctl show cb-run-1.service -p RemainAfterExit,CPUQuotaPerSecUSec,MemoryMax,RuntimeMaxUSec,CollectMode");
    assert.match(show.stdout, /^RuntimeMaxUSec=(\d+s|1min)$/m);
    assert.match(show.stdout, /^RemainAfterExit=yes$/m);
    assert.match(show.stdout, /^CPUQuotaPerSecUSec=500ms$/m);
    assert.match(show.stdout, /^MemoryMax=268435456$/m);
    assert.match(show.stdout, /^CollectMode=inactive$/m);

    const watch = b.watchUntilExit(inst, new Date(g.valid_to), never);
    await until(() => existsSync(out), "the workload to run");
    const polls = () => rec.calls.get("systemctl show:ok") ?? 0;
    const seen = polls();
    // Two more completed polls: the second one began after the workload was running.
    await until(() => polls() >= seen + 2, "a status poll while the workload runs", 60_000);
    writeFileSync(gate, "");
    const obs = await watch;
    assert.equal(obs.kind, "exited");
    assert.equal(obs.exit_code, 7);
    assert.equal(obs.failure, null);
    assert.ok(obs.cpu_seconds !== null && obs.cpu_seconds > 0, `cpu seconds measured: ${obs.cpu_seconds}`);
    assert.ok(obs.peak_memory_mib !== null && obs.peak_memory_mib > 0, `peak memory measured: ${obs.peak_memory_mib}`);
    assert.equal(readFileSync(out, "utf8"), "hello\n");

    await b.terminate(inst);
    assert.deepEqual(unitsOn(A), []);
    assert.equal(existsSync(path.join(work, "m1", "runs", "run-1")), false, "run directory removed");
    await b.terminate(inst); // idempotent
    assert.equal((b.status().machines as Record<string, { grants: number }>).m1!.grants, 0);
  });

  it("a single executable runs as ./workload; exit 0 is read from the unit and final usage from ExecStopPost", async () => {
    const out = path.join(tmp, "exe1.out");
    const image = executable("exe1", `pwd > ${out}; echo "$@" >> ${out}; exit 0`);
    const b = track(backend([machine("m1", A, work)]));
    const g = grant("exe-1");
    const inst = await b.provision(g, { image, command: ["./workload", "one", "two"] }, never);
    const obs = await b.watchUntilExit(inst, new Date(g.valid_to), never);
    assert.equal(obs.kind, "exited");
    assert.equal(obs.exit_code, 0);
    assert.ok(obs.cpu_seconds !== null);
    assert.equal(readFileSync(out, "utf8"), `${path.join(work, "m1", "runs", "exe-1", "work")}\none two\n`);
    // The watch stopped the exited unit so its ExecStopPost recorded the end.
    const final = readFileSync(path.join(work, "m1", "runs", "exe-1", "final"), "utf8");
    assert.match(final, /^exit_code=exited$/m);
    assert.match(final, /^exit_status=0$/m);
    await b.terminate(inst);
    assert.deepEqual(unitsOn(A), []);
  });

  it("run_as: the workload runs as that user in a work directory it owns; the recorder still writes the root-owned run directory", { skip: process.getuid?.() !== 0 ? "needs root (the unit changes user)" : false }, async () => {
    // Parents of work_dir are traversable, as /var/lib is on a host.
    const root = mkdtempSync(path.join(os.tmpdir(), "cb-bm-runas-"));
    chmodSync(root, 0o711);
    try {
      const image = executable("whoami", `[ "$(id -un)" = nobody ] && touch mine && exit 7; exit 3`);
      const b = track(backend([machine("m1", A, root, { run_as: "nobody" })]));
      const g = grant("runas-1");
      const inst = await b.provision(g, { image }, never);
      const obs = await b.watchUntilExit(inst, new Date(g.valid_to), never);
      assert.equal(obs.exit_code, 7, "the workload ran as nobody");
      const run = path.join(root, "m1", "runs", "runas-1");
      assert.equal(statSync(path.join(run, "work", "mine")).uid, 65534, "and wrote its own work directory");
      assert.equal(statSync(run).uid, 0, "the run directory stays root's");
      assert.match(readFileSync(path.join(run, "final"), "utf8"), /^exit_status=7$/m, "ExecStopPost (+, full privileges) recorded the end");
      await b.terminate(inst);
      assert.deepEqual(unitsOn(A), []);

      // A user the machine does not have: a clear setup error, nothing started.
      const missing = track(backend([machine("m1", A, root, { run_as: "no_such_user_cb" })]));
      await assert.rejects(missing.provision(grant("runas-2"), { image }, never), /run_as user no_such_user_cb does not exist/);
      assert.deepEqual(unitsOn(A), []);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  it("refuses an image whose sha256 does not match: ImageVerificationError, nothing ran, nothing left behind", async () => {
    const canary = path.join(tmp, "canary-mismatch");
    const image = executable("evil", `touch ${canary}`);
    const rec = recorder();
    const b = track(backend([machine("m1", A, work)], { rec }));
    const wrong = "0".repeat(64);
    await assert.rejects(b.provision(grant("bad-hash-1"), { image: { ...image, sha256: wrong } }, never), ImageVerificationError);
    assert.equal(existsSync(canary), false, "nothing ran");
    assert.deepEqual(unitsOn(A), []);
    const images = path.join(work, "m1", "images");
    assert.deepEqual(existsSync(images) ? readdirSync(images).filter((f) => f.includes(wrong)) : [], [], "no cached or partial image");
    assert.equal(existsSync(path.join(work, "m1", "runs", "bad-hash-1")), false, "no run directory");
    assert.equal((b.status().machines as Record<string, { grants: number }>).m1!.grants, 0, "the capacity is given back");
  });

  it("expiry: the watch returns expired at valid_to (RuntimeMaxSec set too) and terminate stops the workload", async () => {
    const pidFile = path.join(tmp, "exp1.pid");
    const image = executable("sleeper", `echo $$ > ${pidFile}; exec sleep 600`);
    const b = track(backend([machine("m1", A, work)]));
    const g = grant("exp-1", 1500);
    const inst = await b.provision(g, { image, command: ["./workload"] }, never);
    await until(() => existsSync(pidFile), "the workload to start");
    const pid = readPid(pidFile);
    const t0 = Date.now();
    const obs = await b.watchUntilExit(inst, new Date(g.valid_to), never);
    assert.equal(obs.kind, "expired");
    assert.equal(obs.exit_code, null);
    // At valid_to, not when the workload would end by itself (600 s); the ceiling is generous for a loaded machine.
    assert.ok(Date.now() >= g.valid_to - 50 && Date.now() - t0 < 30_000);
    assert.ok(alive(pid), "still running until terminate");
    await b.terminate(inst);
    await until(() => !alive(pid), "the workload to be stopped", 60_000);
    assert.deepEqual(unitsOn(A), []);
  });

  it("a watch resumed after valid_to still reports how the workload ended before it", async () => {
    const image = executable("quick", "exit 4");
    const b = track(backend([machine("m1", A, work)]));
    const g = grant("late-1", 800);
    const inst = await b.provision(g, { image }, never);
    // The workload has ended (on a loaded machine `exit 4` can take longer than valid_to) and
    // valid_to has passed: only then is this the case under test.
    await until(async () => (await unitState(A, "cb-late-1.service")).ActiveState === "failed", "the workload to end");
    await until(() => Date.now() > g.valid_to + 50, "valid_to to pass");
    const obs = await b.watchUntilExit(inst, new Date(g.valid_to), never);
    assert.equal(obs.kind, "exited");
    assert.equal(obs.exit_code, 4);
    await b.terminate(inst);
    // And one still running past valid_to is expired at once.
    const g2 = grant("late-2", 800);
    const i2 = await b.provision(g2, { image: executable("late-sleeper", "exec sleep 600") }, never);
    await until(() => Date.now() > g2.valid_to + 50, "valid_to to pass");
    assert.equal((await b.watchUntilExit(i2, new Date(g2.valid_to), never)).kind, "expired");
    await b.terminate(i2);
    assert.deepEqual(unitsOn(A), []);
  });

  it("slow image downloads never take the last channels: status polls and terminates keep flowing", async () => {
    const gate = path.join(tmp, "slow.gate");
    const running = executable("slow-running", `while [ ! -e ${gate} ]; do sleep 0.05; done; exit 2`);
    const slow = executable("slow-image", "# not cached yet\nexec sleep 600");
    const rec = recorder();
    const b = track(backend([machine("m1", A, work)], { rec }));
    const g = grant("slow-watch");
    const inst = await b.provision(g, { image: running }, never);
    const release = srv.hold("slow-image");
    const pending = Array.from({ length: 8 }, (_, i) => b.provision(grant(`slow-${i}`, 60_000, { cpu_millicores: 100, ram_mib: 64 }), { image: slow }, never));
    try {
      await until(() => srv.held() >= 6, "six downloads in flight");
      const diag = b.diagnostics().m1!;
      assert.equal(diag.channels_in_use, 6, "long commands stop at limit - 2");
      assert.equal(diag.queued, 2);
      const watch = b.watchUntilExit(inst, new Date(g.valid_to), never);
      writeFileSync(gate, "");
      assert.equal((await watch).exit_code, 2, "the watch finished while the downloads hung");
      assert.equal(srv.held(), 6, "...and they still hang");
    } finally {
      release();
      const done = await Promise.allSettled(pending);
      await Promise.all([inst, ...done.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []))].map((i) => b.terminate(i)));
    }
    assert.ok(b.diagnostics().m1!.channels_peak <= 8);
    assert.deepEqual(unitsOn(A), []);
  });

  /** Processes on this host (the machines are local sshds) whose command line mentions `s`. */
  function processesWith(s: string): number[] {
    const out: number[] = [];
    for (const pid of readdirSync("/proc").filter((d) => /^\d+$/.test(d))) {
      try {
        if (readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(s)) out.push(Number(pid));
      } catch {
        /* gone */
      }
    }
    return out;
  }
  const partsIn = (dir: string) => (existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith(".part")) : []);

  it("cancel (the provision's signal) stops the host's image download at once: curl gone, partial file removed", async () => {
    const hung = executable("hung-cancel", "exit 0");
    const b = track(backend([machine("m1", A, work)]));
    const release = srv.hold("hung-cancel");
    const cancel = new AbortController();
    try {
      const p = b.provision(grant("fetch-cancel"), { image: hung }, cancel.signal);
      await until(() => srv.held() >= 1, "the download to start");
      await until(() => processesWith("hung-cancel").some((pid) => readFileSync(`/proc/${pid}/cmdline`, "utf8").startsWith("curl")), "curl to run on the host");
      cancel.abort(Object.assign(new Error("cancelled"), { name: "AbortError" }));
      await assert.rejects(p, (e: unknown) => (e as Error).name === "AbortError");
      await until(() => processesWith("hung-cancel").length === 0, "the host's fetch (curl and its script) to stop", 60_000);
      assert.deepEqual(partsIn(path.join(work, "images")), []);
    } finally {
      release();
    }
  });

  it("a download the image server never answers ends at valid_to with a fetch error naming no address", async () => {
    const hung = executable("hung-expiry", "exit 0");
    const b = track(backend([machine("m1", A, work)]));
    const release = srv.hold("hung-expiry");
    try {
      const g = grant("fetch-expiry", 3000);
      await assert.rejects(b.provision(g, { image: hung }, never), (e: unknown) => {
        assert.match((e as Error).message, /timed out/);
        assert.doesNotMatch((e as Error).message, /127\.0\.0\.1|port \d/);
        return true;
      });
      assert.ok(Date.now() < g.valid_to + 30_000, "ended at valid_to (not at the 30-minute fetch timeout)");
      assert.deepEqual(partsIn(path.join(work, "images")), []);
    } finally {
      release();
    }
  });

  it("cancel: terminate stops a running workload; a placeholder (instance_id '') is found by request_id on any machine", async () => {
    const pidFile = path.join(tmp, "cancel1.pid");
    const image = executable("forever", `echo $$ > ${pidFile}; exec sleep 600`);
    const b = track(backend([machine("m1", A, work), machine("m2", B, work)]));
    const g = grant("cancel-1");
    const inst = await b.provision(g, { image }, never);
    const watching = new AbortController();
    const watch = b.watchUntilExit(inst, new Date(g.valid_to), watching.signal);
    await until(() => existsSync(pidFile), "the workload to start");
    const pid = readPid(pidFile);
    // The bridge cancels: it stops watching, then terminates; a restarted bridge knows only the request_id.
    watching.abort();
    await assert.rejects(watch, (e: Error) => e.name === "AbortError");
    const fresh = track(backend([machine("m1", A, work), machine("m2", B, work)]));
    await fresh.terminate(placeholder(g));
    await until(() => !alive(pid), "the workload to be stopped", 60_000);
    assert.deepEqual(unitsOn(A), []);
    assert.equal(existsSync(path.join(work, "m1", "runs", "cancel-1")), false);
    await fresh.terminate(placeholder(g));
    await b.terminate(inst);
  });

  it("placement never oversubscribes: 20 concurrent grants on 2 machines, routed on stale data, checked again at provision", async () => {
    const image = executable("idle", "exec sleep 600");
    const rec = recorder();
    const small = { cpu_millicores: 2000, ram_mib: 2048 };
    const b = track(backend([machine("m1", A, work, small), machine("m2", B, work, small)], { rec }));
    const grants = Array.from({ length: 20 }, (_, i) => grant(`conc-${i}`, 60_000, { cpu_millicores: 500, ram_mib: 256 }));
    assert.ok(grants.every((g) => b.canSatisfy(g).ok), "each looks satisfiable on its own");
    const results = await Promise.allSettled(grants.map((g) => b.provision(g, { image }, never)));
    const ok = results.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
    const failed = results.flatMap((r) => (r.status === "rejected" ? [r.reason as Error] : []));
    assert.equal(ok.length, 8);
    assert.ok(failed.every((e) => e instanceof CapacityError), failed.map((e) => e.message).join("; "));
    assert.equal(ok.filter((i) => i.details.machine === "m1").length, 4, "first fit in config order");
    assert.equal(ok.filter((i) => i.details.machine === "m2").length, 4);
    assert.equal(unitsOn(A).length, 4, "the machine itself runs 4");
    assert.equal(unitsOn(B).length, 4);
    // Admission decides from reservations: with these eight held where they run, a ninth is declined.
    const ledger = new Reservations();
    for (const i of ok) ledger.reserve({ request_id: i.request_id, backend: b.name, placement: String(i.details.machine), cpu_millicores: 500, ram_mib: 256 });
    const d = b.canSatisfy(grant("conc-extra", 60_000, { cpu_millicores: 500, ram_mib: 256 }), ledger.held(b.name));
    assert.equal(d.ok === false && d.code, "at_capacity");
    ledger.release(ok.find((i) => i.details.machine === "m2")!.request_id);
    assert.deepEqual(b.canSatisfy(grant("conc-extra", 60_000, { cpu_millicores: 500, ram_mib: 256 }), ledger.held(b.name)), { ok: true, placement: "m2" }, "placed where a reservation was released");
    for (const m of Object.values(b.diagnostics())) assert.ok(m.channels_peak <= 8, `at most 8 channels per connection (peak ${m.channels_peak})`);
    // Free two slots on m1: the next grants go there, and still never beyond.
    const onM1 = ok.filter((i) => i.details.machine === "m1");
    await Promise.all(onM1.slice(0, 2).map((i) => b.terminate(i)));
    const more = await Promise.allSettled([0, 1, 2].map((i) => b.provision(grant(`conc-more-${i}`, 60_000, { cpu_millicores: 500, ram_mib: 256 }), { image }, never)));
    const placed = more.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
    assert.deepEqual(placed.map((i) => i.details.machine), ["m1", "m1"]);
    assert.ok(more[2]!.status === "rejected" && more[2]!.reason instanceof CapacityError);
    const st = b.status().machines as Record<string, { allocated_cpu_millicores: number; grants: number }>;
    assert.equal(st.m1!.allocated_cpu_millicores, 2000);
    assert.equal(st.m2!.allocated_cpu_millicores, 2000);
    await Promise.all([...ok.slice(2), ...onM1.slice(2), ...placed].filter((v, i, a) => a.indexOf(v) === i).map((i) => b.terminate(i)));
    assert.deepEqual(unitsOn(A), []);
    assert.deepEqual(unitsOn(B), []);
    assert.equal(st && (b.status().machines as Record<string, { grants: number }>).m1!.grants, 0);
  });

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
    assert.match(b.diagnostics().m1!.last_error ?? "", /host key mismatch: the server offered SHA256:\S+, the pinned host_key_sha256 is SHA256:A{43}/);
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

  it("hostile request ids, URLs, env values and command words never execute (canary absent) and arrive literally", async () => {
    const canary = path.join(tmp, "canary-hostile");
    const outDir = path.join(tmp, "hostile-out");
    mkdirSync(outDir);
    const hostile = [
      `$(touch ${canary})`,
      `\`touch ${canary}\``,
      `'; touch ${canary}; '`,
      `"; touch ${canary}; "`,
      `\ntouch ${canary}\n`,
      `a b\tc;|&<>*?[x] ~ #`,
      `\\'\\"\\$\\\``,
      `\${IFS}touch\${IFS}${canary}`,
      `%n %i %% -p ExecStartPre=/bin/touch ${canary}`,
      `--setenv=X=1 -- /bin/touch ${canary}`,
    ];
    const envScript = hostile.map((_, i) => `printf '%s' "$H${i}" > ${outDir}/env.${i}`).join("\n");
    const image = bundle("hostile", `i=0; for a in "$@"; do printf '%s' "$a" > ${outDir}/arg.$i; i=$((i+1)); done\n${envScript}`);
    const b = track(backend([machine("m1", A, work)]));

    for (const id of [`x'; touch ${canary}; '`, `$(touch ${canary})`, "a\nb", "..", "../../etc", `\`touch ${canary}\``])
      await assert.rejects(b.provision(grant(id), { image }, never), InvalidRequestError, `request id ${JSON.stringify(id)}`);
    await assert.rejects(b.provision(grant("file-1"), { image: { ...image, url: `file:///etc/shadow` } }, never), InvalidRequestError);

    const url = `${image.url}?q=$(touch ${canary})&r=';touch ${canary};'&s=\`touch ${canary}\`#"$(touch ${canary})"`;
    const g = grant("hostile-1");
    const env = Object.fromEntries(hostile.map((v, i) => [`H${i}`, v]));
    const inst = await b.provision(g, { image: { ...image, url }, command: ["./run", ...hostile], env }, never);
    const obs = await b.watchUntilExit(inst, new Date(g.valid_to), never);
    assert.equal(obs.exit_code, 0);
    assert.equal(existsSync(canary), false, "no hostile value executed");
    hostile.forEach((v, i) => {
      assert.equal(readFileSync(path.join(outDir, `env.${i}`), "utf8"), v, `env H${i} literal`);
      const arg = readFileSync(path.join(outDir, `arg.${i}`), "utf8");
      // systemd expands $VAR in ExecStart= arguments, so the backend sends "$" as "$$"; the
      // systemd-run stand-in does not expand, so it hands the workload "$$" (see the report).
      assert.ok(arg === v || arg === v.replace(/\$/g, "$$$$"), `command word ${i} literal: ${JSON.stringify(arg)}`);
    });
    assert.ok(srv.requests.some((r) => r.startsWith("/hostile.tar.gz?q=$(touch")), "curl requested the URL as given");
    await b.terminate(inst);
    assert.equal(existsSync(canary), false);
  });

  it("adapts to a server that allows fewer sessions than max_channels_per_machine: commands queue, none fail", async () => {
    const S = await startSshd({ maxSessions: 2 });
    try {
      const image = executable("tiny", "exec sleep 600");
      const b = track(backend([machine("s", S, work)]));
      const grants = Array.from({ length: 8 }, (_, i) => grant(`sess-${i}`, 60_000, { cpu_millicores: 100, ram_mib: 64 }));
      const insts = await Promise.all(grants.map((g) => b.provision(g, { image }, never)));
      assert.equal(unitsOn(S).length, 8);
      assert.ok(b.diagnostics().s!.channel_limit <= 2, `limit adapted: ${b.diagnostics().s!.channel_limit}`);
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
    assert.deepEqual(b.diagnostics().m1!.state, "idle", "nothing connected");
  });

  describe("virsh machines (TDX)", () => {
    let T: FakeSshd;
    let V: FakeSshd;
    before(async () => {
      const bin = virshBinDir(path.join(tmp, "virsh-tools"));
      [T, V] = await Promise.all([startSshd({ binDir: bin }), startSshd({ binDir: bin })]);
      installGuestCommand(T);
      installGuestCommand(V);
    });
    after(async () => {
      await Promise.allSettled([T?.stop(), V?.stop()]);
    });
    // As above: a failed test's guests and deadline units do not reach the next test.
    afterEach(async () => {
      for (const s of [T, V]) {
        const doms = domainsOn(s).filter((d) => /^[A-Za-z0-9._-]+$/.test(d));
        const units = unitsOn(s).filter((u) => /^[A-Za-z0-9._-]+\.service$/.test(u));
        if (doms.length + units.length === 0) continue;
        const script = 'n=$1; shift; i=0; for x; do i=$((i+1)); if [ $i -le "$n" ]; then virsh destroy "$x"; virsh undefine --nvram "$x"; else systemctl stop "$x"; systemctl reset-failed "$x"; fi; done >/dev/null 2>&1; exit 0';
        await sshRun(s, shJoin(["/bin/sh", "-c", script, "cb-cleanup", String(doms.length), ...doms, ...units]));
      }
    });
    const tdxMachine = (name: string, s: FakeSshd, over: Record<string, unknown> = {}) =>
      machine(name, s, work, { mode: "virsh", tdx_capable: true, ovmf_path: "/usr/share/ovmf/OVMF.inteltdx.fd", ...over });

    it("doctor: a TDX machine's libvirt must offer TDX guests (its domcapabilities), a plain virsh machine is not asked", async () => {
      // T's libvirt answers as a TDX host's does; V's as libvirt 9 (Debian 12), which has no TDX.
      mkdirSync(path.join(T.stateDir, "libvirt"), { recursive: true });
      writeFileSync(path.join(T.stateDir, "libvirt", "tdx-host"), "");
      const checks = await track(backend([tdxMachine("tdxok", T), tdxMachine("tdxno", V), tdxMachine("plain", V, { tdx_capable: false, ovmf_path: undefined })])).check!();
      const tdx = (name: string) => checks.find((c) => c.check === `${name}: tdx`);
      assert.equal(tdx("tdxok")?.ok, true, JSON.stringify(checks));
      assert.match(tdx("tdxok")!.detail, /libvirt offers TDX guests here/);
      assert.equal(tdx("tdxno")?.ok, false);
      assert.match(tdx("tdxno")!.detail, /no <tdx supported='yes'\/>/);
      assert.equal(tdx("plain"), undefined);
      // Everything else on the TDX machine passes (the OVMF file aside: it is not on this host).
      for (const c of checks.filter((c) => c.check.startsWith("tdxok: ") && c.check !== "tdxok: ovmf")) assert.ok(c.ok, `${c.check}: ${c.detail}`);
    });

    it("a TDX grant lands only on the TDX machine: <launchSecurity type='tdx'> defined, TD quote attached, overlay removed at the end", async () => {
      const disk = { ...srv.put("guest.qcow2", qcow2(2 * 1024 ** 3)), format: "disk" as const };
      const rec = recorder();
      const b = track(backend([machine("m1", A, work), tdxMachine("tdx1", T)], { rec }));
      const key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0k3mP1vWbP6YbXbXQFh7lWlWnE2x0Hj0oQb1Q2b3c tenant@example";
      const g = grant("td-1", 60_000, { tdx_required: true, cpu_millicores: 1500, ram_mib: 512 });
      const nonce = "c0ffee".repeat(8);
      const inst = await b.provision(g, { image: disk, ssh_public_key: key, attestation_nonce: nonce }, never);
      assert.equal(inst.details.machine, "tdx1");
      assert.equal(inst.details.tdx, "yes");
      assert.equal(inst.host, "127.0.0.1");
      assert.equal(inst.ssh_user, "root");
      // The TD ran the compute-bridge.attest credential: its quote, read back from the console log
      // on the host, with the binding of (request_id, nonce, host key) the TD wrote as REPORTDATA.
      const ev = inst.attestation;
      assert.ok(ev && ev.status === "present", JSON.stringify(ev));
      assert.equal(ev.platform, "baremetal");
      assert.equal(ev.nonce, nonce);
      assert.deepEqual(Buffer.from(ev.blobs.td_quote!, "base64"), TD_QUOTE);
      assert.equal(ev.binding.digest, bindingDigest("td-1", nonce, null).toString("hex"));
      const inblob = readFileSync(path.join(T.stateDir, "libvirt", "domains", "cb-td-1", "td", "tsm", "cb-td-1", "inblob"));
      assert.equal(inblob.toString("hex"), ev.binding.digest, "the stand-in configfs-tsm got the binding as REPORTDATA");
      assert.deepEqual(verifyTdxQuote(Buffer.from(ev.blobs.td_quote!, "base64"), { now: new Date("2026-06-01T00:00:00Z") }).checks, { structure: true, signature: true, pck_chain: true });
      assert.deepEqual(domainsOn(T), ["cb-td-1"]);
      const xml = readFileSync(path.join(T.stateDir, "libvirt", "domains", "cb-td-1", "domain.xml"), "utf8");
      assert.match(xml, /<launchSecurity type='tdx'>\s*<policy>0x10000000<\/policy>/);
      assert.match(xml, /<memoryBacking><source type='anonymous'\/><access mode='private'\/><\/memoryBacking>/);
      assert.match(xml, /<loader type='rom'>\/usr\/share\/ovmf\/OVMF.inteltdx.fd<\/loader>/);
      assert.match(xml, /<memory unit='MiB'>512<\/memory>/);
      assert.match(xml, /<vcpu placement='static'>2<\/vcpu>/);
      assert.match(xml, /<global_quota>150000<\/global_quota>/);
      assert.ok(xml.includes(`ssh.authorized_keys.root=${Buffer.from(`${key}\n`).toString("base64")}`), "key injected as an SMBIOS credential");
      const runDir = path.join(work, "tdx1", "runs", "td-1");
      const overlay = await sshRun(T, `qemu-img info -f qcow2 --output=json ${runDir}/disk.qcow2`);
      assert.equal(JSON.parse(overlay.stdout)["backing-filename"], path.join(work, "tdx1", "images", disk.sha256));
      assert.ok((await sshRun(T, "virsh -c qemu:///system dumpxml cb-td-1")).stdout.includes("<launchSecurity type='tdx'>"));

      // A plain bundle grant in the same region goes to the systemd machine, never the TD host.
      const plain = await b.provision(grant("plain-1"), { image: executable("plain", "exec sleep 600") }, never);
      assert.equal(plain.details.machine, "m1");
      // A TDX grant cannot run a bundle here (failover to another backend).
      await assert.rejects(b.provision(grant("td-bundle", 60_000, { tdx_required: true }), { image: executable("tdb", "true") }, never), CapacityError);

      const watch = b.watchUntilExit(inst, new Date(g.valid_to), never);
      // Usage is sampled while the guest runs (a shut-off domain has no CPU or RSS statistics).
      await until(() => (rec.calls.get("virsh domstats:ok") ?? 0) >= 1, "a usage sample");
      writeFileSync(path.join(T.stateDir, "poweroff-cb-td-1"), "");
      const obs = await watch;
      assert.equal(obs.kind, "exited");
      assert.equal(obs.exit_code, 0);
      assert.equal(obs.failure, null);
      assert.ok(obs.cpu_seconds !== null && obs.peak_memory_mib !== null && obs.peak_memory_mib > 0, JSON.stringify(obs));
      await b.terminate(inst);
      assert.deepEqual(domainsOn(T), []);
      assert.equal(existsSync(runDir), false, "overlay, console log and XML removed");
      await b.terminate(inst);
      await b.terminate(plain);
    });

    it("the host destroys a guest at valid_to on its own (cb-deadline unit) while the bridge is away; the resumed watch says expired; terminate stops a pending deadline", async () => {
      const disk = { ...srv.put("guest.qcow2", qcow2(2 * 1024 ** 3)), format: "disk" as const };
      const plain = (over: Record<string, unknown> = {}) => tdxMachine("v1", V, { tdx_capable: false, ovmf_path: undefined, ...over });
      const logs: string[] = [];
      const b = track(backend([plain()], { log: lineLogger(logs) }));
      const g = grant("dl-1", 2500);
      const inst = await b.provision(g, { image: disk }, never);
      // systemd-run created the deadline unit (its journal file stays; on a slow machine the unit
      // may have run and been collected by now, so it is not looked for in the unit list here).
      assert.ok(existsSync(path.join(V.stateDir, "systemd", "logs", "cb-deadline-dl-1.service.log")), JSON.stringify(unitsOn(V)));
      assert.ok(!logs.some((l) => /no host-side deadline/.test(l)), "the deadline was set");
      assert.match((await b.check!()).find((c) => c.check === "v1: systemd-run")?.detail ?? "", /host-side deadline/);
      // Nobody watches (the bridge is away): the host ends the guest at valid_to by itself.
      const state = async () => (await sshRun(V, "virsh -c qemu:///system domstate --reason cb-dl-1")).stdout.trim();
      await until(async () => (await state()) === "shut off (destroyed)", "the host's deadline to destroy the guest", 60_000);
      assert.ok(Date.now() >= g.valid_to, "not before valid_to");
      // The bridge is back: the watch resumed after valid_to reports expiry, not a lost guest.
      const b2 = track(backend([plain()]));
      const obs = await b2.watchUntilExit(inst, new Date(g.valid_to), never);
      assert.equal(obs.kind, "expired");
      assert.equal(obs.failure, null);
      await b2.terminate(inst);
      assert.deepEqual(domainsOn(V), []);
      assert.ok(!unitsOn(V).some((u) => u.startsWith("cb-deadline-dl-1")), JSON.stringify(unitsOn(V)));

      // Terminated before valid_to: its deadline is stopped with it.
      const early = await b2.provision(grant("dl-2", 60_000), { image: disk }, never);
      assert.ok(unitsOn(V).includes("cb-deadline-dl-2.service"));
      assert.match(unitConf(V, "cb-deadline-dl-2.service"), /destroy/);
      await b2.terminate(early);
      assert.deepEqual(domainsOn(V), []);
      assert.ok(!unitsOn(V).some((u) => u.startsWith("cb-deadline-dl-2")), JSON.stringify(unitsOn(V)));
    });

    it("a host where systemd-run fails still runs the guest (the bridge's watch enforces valid_to) and says why", async (t) => {
      const bin = virshBinDir(path.join(tmp, "virsh-no-systemd"));
      rmSync(path.join(bin, "systemd-run"));
      // What Debian's systemd-run says in a container without systemd as PID 1.
      writeFileSync(path.join(bin, "systemd-run"), "#!/bin/sh\necho 'System has not been booted with systemd as init system (PID 1). Can'\\''t operate.' >&2\necho 'Failed to connect to bus: Host is down' >&2\nexit 1\n", { mode: 0o755 });
      const N = await startSshd({ binDir: bin });
      t.after(() => N.stop());
      installGuestCommand(N);
      const disk = { ...srv.put("guest.qcow2", qcow2(2 * 1024 ** 3)), format: "disk" as const };
      const logs: string[] = [];
      const b = track(backend([tdxMachine("n1", N, { tdx_capable: false, ovmf_path: undefined })], { log: lineLogger(logs) }));
      const g = grant("nd-1", 1500);
      const inst = await b.provision(g, { image: disk }, never);
      assert.ok(logs.some((l) => /no host-side deadline/.test(l) && /Failed to connect to bus/.test(l)), logs.join("\n"));
      const obs = await b.watchUntilExit(inst, new Date(g.valid_to), never);
      assert.equal(obs.kind, "expired");
      await b.terminate(inst);
      assert.deepEqual(domainsOn(N), []);
    });

    it("warm provision: an image already inspected there takes one round trip (adopt or start, first address); a cache miss fetches and inspects again; a failed step names itself and its file", async () => {
      const disk = { ...srv.put("warm.qcow2", qcow2(1024 ** 3)), format: "disk" as const };
      const rec = recorder();
      const b = track(backend([tdxMachine("v1", V, { tdx_capable: false, ovmf_path: undefined })], { rec }));
      const execs = () => [...rec.calls.values()].reduce((a, x) => a + x, 0);
      const first = await b.provision(grant("warm-1"), { image: disk }, never);
      let n = execs();
      const second = await b.provision(grant("warm-2"), { image: disk }, never);
      assert.equal(execs() - n, 1, "one SSH round trip");
      assert.equal(second.host, "127.0.0.1");
      assert.ok(domainsOn(V).includes("cb-warm-1") && domainsOn(V).includes("cb-warm-2"), JSON.stringify(domainsOn(V)));
      assert.ok(unitsOn(V).includes("cb-deadline-warm-2.service"), "the host-side deadline is set on the warm path too");
      n = execs();
      const again = await b.provision(grant("warm-2"), { image: disk }, never);
      assert.equal(execs() - n, 1, "adopting is one round trip as well");
      assert.equal(again.started_at, second.started_at);

      // The cached image went away (image GC): nothing is done on the warm path, the image is fetched and inspected again.
      const cached = path.join(work, "v1", "images", disk.sha256);
      rmSync(cached);
      const fetched = srv.requests.length;
      const third = await b.provision(grant("warm-3"), { image: disk }, never);
      assert.equal(srv.requests.length, fetched + 1, "fetched again");
      assert.ok(existsSync(cached));

      // A step that fails on the warm path says which step and which file.
      writeFileSync(cached, "not a qcow2 image");
      await assert.rejects(b.provision(grant("warm-4"), { image: disk }, never), (e: Error) => {
        assert.match(e.message, /^machine v1: creating the overlay failed: .*Could not open '[^']*\/images\/[0-9a-f]{64}'/);
        return true;
      });
      assert.ok(!domainsOn(V).includes("cb-warm-4"), "nothing defined");
      assert.equal((b.status().machines as Record<string, { grants: number }>).v1!.grants, 3, "its capacity is given back");
      rmSync(cached);
      for (const i of [first, second, third]) await b.terminate(i);
      await b.terminate(placeholder(grant("warm-4")));
      assert.ok(!domainsOn(V).some((d) => d.startsWith("cb-warm-")), JSON.stringify(domainsOn(V)));
      assert.ok(!unitsOn(V).some((u) => u.startsWith("cb-deadline-warm")), JSON.stringify(unitsOn(V)));
    });

    it("refuses a qcow2 with a backing file (nothing defined) and reports a crashed guest as a failure", async () => {
      const evil = { ...srv.put("evil.qcow2", qcow2(1024 ** 3, "/etc/shadow")), format: "disk" as const };
      const b = track(backend([tdxMachine("v1", V, { tdx_capable: false, ovmf_path: undefined })]));
      await assert.rejects(b.provision(grant("bk-1"), { image: evil }, never), (e: Error) => e instanceof InvalidRequestError && /backing file/.test(e.message));
      assert.deepEqual(domainsOn(V), []);
      assert.equal(existsSync(path.join(work, "v1", "runs", "bk-1")), false);

      const disk = { ...srv.put("guest.qcow2", qcow2(2 * 1024 ** 3)), format: "disk" as const };
      const g = grant("crash-1");
      const inst = await b.provision(g, { image: disk }, never);
      assert.equal(inst.attestation, null, "not a TD: no quote");
      const xml = readFileSync(path.join(V.stateDir, "libvirt", "domains", "cb-crash-1", "domain.xml"), "utf8");
      assert.ok(!xml.includes("launchSecurity"), "a plain guest");
      const watch = b.watchUntilExit(inst, new Date(g.valid_to), never);
      const r = await sshRun(V, "virsh cb-fake-poweroff cb-crash-1 --reason crashed");
      assert.equal(r.code, 0, r.stderr);
      const obs = await watch;
      assert.equal(obs.failure?.kind, "guest_crashed");
      assert.match(obs.failure!.message, /shut off \(crashed\)/);
      // Restart: reconcile re-attaches nothing (no live grant) and removes the domain.
      const b2 = track(backend([tdxMachine("v1", V, { tdx_capable: false, ovmf_path: undefined })]));
      await b2.reconcile(new Set());
      assert.deepEqual(domainsOn(V), []);
      assert.equal(existsSync(path.join(work, "v1", "runs", "crash-1")), false);
    });
  });
});
