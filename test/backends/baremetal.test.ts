// The bare-metal backend's systemd machines against real OpenSSH servers on 127.0.0.1
// (test/fakes/sshd.ts, one per simulated machine) running the systemd stand-ins (test/fakes/bin).
// The virsh machines (libvirt guests, TDX) are in baremetal-virsh.test.ts; connections, restart
// and doctor in baremetal-connections.test.ts.
//
//   node --import tsx --test test/backends/baremetal.test.ts
//
// Synchronisation is by polling (short intervals) for an event (a file, a poll, a unit state),
// never by sleeping a fixed time; ceilings are generous, they only bound a failure.
import assert from "node:assert/strict";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, afterEach, before, describe, it } from "node:test";
import { CapacityError, ImageVerificationError, InvalidRequestError, type ManagedBackend } from "../../src/backends/backend.js";
import { Reservations } from "../../src/fleet/reservations.js";
import { placeholder } from "../../src/lifecycle/manager.js";
import { ensureSshdInstalled, startSshd, type FakeSshd } from "../fakes/sshd.js";
import { bundleImage, scriptImage } from "../helpers/images.js";
import { alive, backend, grant, imageServer, machine, precache, readPid, recorder, removeLeftovers, sshRun, unitsOn, unitState, until, type ImageServer } from "./baremetal/harness.js";

const never = new AbortController().signal;




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

  afterEach(() => removeLeftovers([A, B]));

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
    await precache(path.join(work, "m1"), image); // valid_to would bound a download too
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
    const sleeper = executable("late-sleeper", "exec sleep 600");
    const b = track(backend([machine("m1", A, work)]));
    // Cached: with valid_to 0.8 s away a download would not finish on a loaded machine (it is bounded by valid_to).
    await precache(path.join(work, "m1"), image);
    await precache(path.join(work, "m1"), sleeper);
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
    const i2 = await b.provision(g2, { image: sleeper }, never);
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
      const diag = b.stats().m1!;
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
    assert.ok(b.stats().m1!.channels_peak <= 8);
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
    await fresh.terminate(placeholder(g, "baremetal"));
    await until(() => !alive(pid), "the workload to be stopped", 60_000);
    assert.deepEqual(unitsOn(A), []);
    assert.equal(existsSync(path.join(work, "m1", "runs", "cancel-1")), false);
    await fresh.terminate(placeholder(g, "baremetal"));
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
    for (const m of Object.values(b.stats())) assert.ok(m.channels_peak <= 8, `at most 8 channels per connection (peak ${m.channels_peak})`);
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
});
