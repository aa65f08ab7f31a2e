import { Fleet } from "../../src/fleet/fleet.js";
import { systemClock } from "../../src/util/clock.js";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { CapacityError, ImageVerificationError, InvalidRequestError } from "../../src/backends/backend.js";
import { bundleImage, scriptImage } from "../helpers/images.js";
import { until } from "../helpers/http.js";
import { localBackend, localGrant } from "../helpers/local.js";
import { tempDir } from "../helpers/tmp.js";
import { alive, workloadPid } from "../helpers/proc.js";

const never = new AbortController().signal;

describe("local backend", () => {
  it("runs a verified bundle to completion with exit code and CPU time", async (t) => {
    const dir = tempDir(t);
    const marker = path.join(dir, "ran");
    const img = bundleImage(dir, "ok", `echo "$GREETING" > ${marker}; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exit 0`);
    const b = localBackend(path.join(dir, "state"));
    const g = localGrant("ok-1");
    const inst = await b.provision(g, { image: { ...img, format: "bundle" }, env: { GREETING: "hello" } }, never);
    assert.equal(inst.instance_id, "local-ok-1");
    const obs = await b.watchUntilExit(inst, new Date(g.valid_to), never);
    assert.equal(obs.kind, "exited");
    assert.equal(obs.exit_code, 0);
    assert.ok(obs.cpu_seconds !== null && obs.cpu_seconds >= 0);
    assert.equal(readFileSync(marker, "utf8"), "hello\n");
    await b.terminate(inst);
  });

  it("reports a non-zero exit code and runs `command` with a single executable", async (t) => {
    const dir = tempDir(t);
    const img = scriptImage(dir, "exe", 'exit "$1"');
    const b = localBackend(path.join(dir, "state"));
    const g = localGrant("nz-1");
    const inst = await b.provision(g, { image: { ...img, format: "bundle" }, command: ["./workload", "7"] }, never);
    const obs = await b.watchUntilExit(inst, new Date(g.valid_to), never);
    assert.equal(obs.kind, "exited");
    assert.equal(obs.exit_code, 7);
  });

  it("refuses an image whose sha256 does not match: nothing runs, nothing is cached", async (t) => {
    const dir = tempDir(t);
    const canary = path.join(dir, "canary");
    const img = scriptImage(dir, "evil", `touch ${canary}`);
    const state = path.join(dir, "state");
    const b = localBackend(state);
    const wrong = "0".repeat(64);
    await assert.rejects(b.provision(localGrant("bad-1"), { image: { url: img.url, sha256: wrong, format: "bundle" } }, never), ImageVerificationError);
    assert.equal(existsSync(canary), false);
    assert.equal(existsSync(path.join(state, "local", "images", wrong)), false);
    assert.equal(existsSync(path.join(state, "local", "runs", "bad-1", "started")), false);
  });

  it("rejects disk images with a clear error", async (t) => {
    const dir = tempDir(t);
    const img = scriptImage(dir, "x", "true");
    const b = localBackend(path.join(dir, "state"));
    await assert.rejects(b.provision(localGrant("disk-1"), { image: { ...img, format: "disk" } }, never), (e: unknown) => e instanceof InvalidRequestError && /bundle/.test((e as Error).message));
  });

  it("kills the whole process group at valid_to", async (t) => {
    const dir = tempDir(t);
    const pids = path.join(dir, "pids");
    // The workload forks a grandchild; both must die at the deadline.
    const img = scriptImage(dir, "sleeper", `sleep 600 & echo $! > ${pids}; echo $$ >> ${pids}; wait`);
    const b = localBackend(path.join(dir, "state"));
    const g = localGrant("exp-1", 600);
    const inst = await b.provision(g, { image: { ...img, format: "bundle" } }, never);
    const obs = await b.watchUntilExit(inst, new Date(g.valid_to), never);
    assert.equal(obs.kind, "expired");
    const [grandchild, child] = readFileSync(pids, "utf8").trim().split("\n").map(Number);
    await until(() => !alive(grandchild!) && !alive(child!), "the workload's process group to die", 5000);
    await b.terminate(inst);
  });

  it("terminates a running workload, and terminate twice is fine", async (t) => {
    const dir = tempDir(t);
    const img = scriptImage(dir, "forever", "sleep 600");
    const b = localBackend(path.join(dir, "state"));
    const g = localGrant("term-1");
    const inst = await b.provision(g, { image: { ...img, format: "bundle" } }, never);
    const pid = await workloadPid(inst.details.run_dir!);
    assert.ok(alive(pid));
    await b.terminate(inst);
    // Gone once its supervisor has reaped it (a moment after terminate on a loaded machine).
    await until(() => !alive(pid), "the workload to be gone", 10_000);
    await b.terminate(inst);
    const obs = await b.watchUntilExit(inst, new Date(g.valid_to), never);
    assert.equal(obs.kind, "exited");
    assert.equal(obs.exit_code, 128 + 15, "SIGTERM first, as a polite stop");
  });

  it("survives a daemon restart: a new backend re-attaches and never starts the workload twice", async (t) => {
    const dir = tempDir(t);
    const starts = path.join(dir, "starts");
    const gate = path.join(dir, "gate");
    const img = scriptImage(dir, "once", `echo start >> ${starts}; while [ ! -e ${gate} ]; do sleep 0.02; done; exit 3`);
    const state = path.join(dir, "state");
    const g = localGrant("restart-1");
    const env = { image: { ...img, format: "bundle" as const } };
    const first = await localBackend(state).provision(g, env, never);
    // "Restart": a fresh backend over the same state_dir provisions the same grant again.
    const second = localBackend(state);
    const again = await second.provision(g, env, never);
    assert.equal(again.instance_id, first.instance_id);
    const { writeFileSync } = await import("node:fs");
    writeFileSync(gate, "");
    const obs = await second.watchUntilExit(again, new Date(g.valid_to), never);
    assert.equal(obs.exit_code, 3);
    assert.equal(readFileSync(starts, "utf8"), "start\n", "the workload started exactly once");
  });

  it("terminate before start claims the run so a late supervisor never starts it", async (t) => {
    const dir = tempDir(t);
    const b = localBackend(path.join(dir, "state"));
    const g = localGrant("claim-1");
    const { mkdirSync } = await import("node:fs");
    mkdirSync(path.join(dir, "state", "local", "runs", "claim-1"), { recursive: true });
    await b.terminate({ request_id: "claim-1" } as never);
    assert.ok(existsSync(path.join(dir, "state", "local", "runs", "claim-1", "started")));
    void g;
  });

  it("declines at_capacity from what it holds (the Fleet's reservations), not from what it has started", (t) => {
    const b = localBackend(path.join(tempDir(t), "state"), { max_concurrent: 2 });
    const f = Fleet.of([b], systemClock);
    const env = { image: { url: "file:///x", sha256: "0".repeat(64), format: "bundle" as const } };
    assert.equal(f.admit(localGrant("cap-1"), env).ok, true);
    assert.equal(f.admit(localGrant("cap-2"), env).ok, true);
    // Nothing has been provisioned yet: two accepted grants already fill it.
    const third = f.admit(localGrant("cap-3"), env);
    assert.equal(third.ok === false && third.declines[0]!.code, "at_capacity");
    assert.match(third.ok === false ? third.declines[0]!.message : "", /holds 2 of 2 workloads \(max_concurrent\)/);
    f.reservations.release("cap-1");
    assert.equal(f.admit(localGrant("cap-3"), env).ok, true, "a released reservation frees its slot");
    const disk = b.canSatisfy(localGrant("d"), undefined, { image: { ...env.image, format: "disk" } });
    assert.equal(disk.ok === false && disk.code, "image_format_not_supported");
  });

  it("declines with reasons", (t) => {
    const b = localBackend(tempDir(t));
    assert.deepEqual(b.canSatisfy(localGrant("x", 1000, { region: "eu-1" })).ok, false);
    const tdx = b.canSatisfy(localGrant("x", 1000, { tdx_required: true }));
    assert.equal(tdx.ok === false && tdx.code, "tdx_not_supported");
    const big = b.canSatisfy(localGrant("x", 1000, { cpu_millicores: 999_999 }));
    assert.equal(big.ok === false && big.code, "too_large");
  });

  it("reconcile stops orphans but never a workload this backend is running", async (t) => {
    const dir = tempDir(t);
    const img = scriptImage(dir, "forever", "sleep 600");
    const state = path.join(dir, "state");
    // An orphan: started by an earlier daemon, no live grant any more.
    const old = localBackend(state);
    const orphan = await old.provision(localGrant("orphan-1"), { image: { ...img, format: "bundle" } }, never);
    const orphanPid = await workloadPid(orphan.details.run_dir!);
    const b = localBackend(state);
    // Provisioned after the caller's snapshot of live grants (an empty set here).
    const mine = await b.provision(localGrant("mine-1"), { image: { ...img, format: "bundle" } }, never);
    const minePid = await workloadPid(mine.details.run_dir!);
    await b.reconcile(new Set());
    await until(() => !alive(orphanPid), "the orphan to be stopped", 5000);
    assert.ok(alive(minePid), "a workload this backend provisioned is not an orphan");
    await b.terminate(mine);
  });

  it("many grants fetching the same image at once share the cache without tripping over each other", async (t) => {
    const dir = tempDir(t);
    const img = scriptImage(dir, "same", "exit 0");
    const b = localBackend(path.join(dir, "state"));
    const insts = await Promise.all(Array.from({ length: 12 }, (_, i) => b.provision(localGrant(`same-${i}`), { image: { ...img, format: "bundle" } }, never)));
    const obs = await Promise.all(insts.map((i) => b.watchUntilExit(i, new Date(Date.now() + 60_000), never)));
    assert.ok(obs.every((o) => o.exit_code === 0));
  });
});

describe("local backend: replicas sharing one runs_dir", () => {
  /** Kills what a failed test left running (a passing one leaves nothing). */
  const reap = (t: { after(fn: () => void): void }, pid: number) =>
    t.after(() => {
      try {
        process.kill(-pid, "SIGKILL");
      } catch {
        /* stopped */
      }
    });

  it("a second replica (its own state_dir) re-attaches to a workload the first started and sees its exit", async (t) => {
    const dir = tempDir(t);
    const runs = path.join(dir, "runs");
    const gate = path.join(dir, "gate");
    const img = scriptImage(dir, "gated", `while [ ! -e ${gate} ]; do sleep 0.02; done; exit 3`);
    const a = path.join(dir, "a");
    const g = localGrant("shared-1");
    const inst = await localBackend(a, { runs_dir: runs }).provision(g, { image: { ...img, format: "bundle" } }, never);
    assert.equal(inst.details.run_dir, path.join(runs, "shared-1"));
    assert.equal(existsSync(path.join(a, "local", "runs")), false, "nothing under the first replica's state_dir/local/runs");
    reap(t, await workloadPid(inst.details.run_dir!));
    // The workload needs nothing of the replica that started it: not its supervisor script (the
    // running supervisor still reads it, to write the result), not its image cache.
    rmSync(a, { recursive: true, force: true });
    const b = localBackend(path.join(dir, "b"), { runs_dir: runs });
    const watching = b.watchUntilExit(inst, new Date(g.valid_to), never);
    writeFileSync(gate, "");
    const obs = await watching;
    assert.equal(obs.kind, "exited");
    assert.equal(obs.exit_code, 3);
  });

  it("a second replica terminates a workload the first started", async (t) => {
    const dir = tempDir(t);
    const runs = path.join(dir, "runs");
    const img = scriptImage(dir, "forever", "sleep 600");
    const a = path.join(dir, "a");
    const g = localGrant("shared-2");
    const inst = await localBackend(a, { runs_dir: runs }).provision(g, { image: { ...img, format: "bundle" } }, never);
    const pid = await workloadPid(inst.details.run_dir!);
    reap(t, pid);
    rmSync(a, { recursive: true, force: true });
    const b = localBackend(path.join(dir, "b"), { runs_dir: runs });
    await b.terminate(inst);
    await until(() => !alive(pid), "the workload to be gone", 10_000);
    const obs = await b.watchUntilExit(inst, new Date(g.valid_to), never);
    assert.equal(obs.kind, "exited");
    assert.equal(obs.exit_code, 128 + 15, "stopped by the second replica's SIGTERM");
  });

  it("the leader's orphan sweep leaves a workload another replica started after the live grants were read", async (t) => {
    const dir = tempDir(t);
    const runs = path.join(dir, "runs");
    const img = scriptImage(dir, "forever", "sleep 600");
    const leader = localBackend(path.join(dir, "leader"), { runs_dir: runs });
    // The leader reads the live grants (none); then another replica accepts a grant and starts it.
    const asOf = Date.now();
    const inst = await localBackend(path.join(dir, "a"), { runs_dir: runs }).provision(localGrant("late-1"), { image: { ...img, format: "bundle" } }, never);
    const pid = await workloadPid(inst.details.run_dir!);
    reap(t, pid);
    await leader.reconcile(new Set(), asOf);
    assert.ok(alive(pid), "not an orphan by a read older than its start");
    assert.equal(existsSync(path.join(dir, "leader", "orphans.jsonl")), false);
    // A later pass whose read found no live grant for it does stop it.
    await leader.reconcile(new Set(), Date.now() + 2000);
    await until(() => !alive(pid), "the orphan to be stopped", 10_000);
  });

  it("replicas that name runs_dir differently (a symlink) still find each other's workloads", async (t) => {
    const dir = tempDir(t);
    const runs = path.join(dir, "runs");
    mkdirSync(runs);
    const link = path.join(dir, "runs-link");
    symlinkSync(runs, link);
    const gate = path.join(dir, "gate");
    const gated = scriptImage(dir, "gated", `while [ ! -e ${gate} ]; do sleep 0.02; done; exit 3`);
    const forever = scriptImage(dir, "forever", "sleep 600");
    const a = localBackend(path.join(dir, "a"), { runs_dir: runs });
    const g1 = localGrant("spelt-1");
    const g2 = localGrant("spelt-2");
    const i1 = await a.provision(g1, { image: { ...gated, format: "bundle" } }, never);
    const i2 = await a.provision(g2, { image: { ...forever, format: "bundle" } }, never);
    reap(t, await workloadPid(i1.details.run_dir!));
    const pid = await workloadPid(i2.details.run_dir!);
    reap(t, pid);
    const b = localBackend(path.join(dir, "b"), { runs_dir: link });
    const watching = b.watchUntilExit(i1, new Date(g1.valid_to), never);
    writeFileSync(gate, "");
    const obs = await watching;
    assert.equal(obs.kind, "exited", "alive for the replica that names it by the symlink, not lost");
    assert.equal(obs.exit_code, 3);
    await b.terminate(i2);
    await until(() => !alive(pid), "the workload to be gone", 10_000);
    assert.equal((await b.watchUntilExit(i2, new Date(g2.valid_to), never)).exit_code, 128 + 15);
  });
});
