import assert from "node:assert/strict";
import { existsSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { scriptImage } from "../helpers/images.js";
import { until } from "../helpers/http.js";
import { localBackend, localGrant } from "../helpers/local.js";
import { tempDir } from "../helpers/tmp.js";
import { fillDisk, mountTmpfs } from "../helpers/tmpfs.js";
import { alive } from "../helpers/proc.js";

const never = new AbortController().signal;


describe("local backend: terminate never depends on files the run may not have written", { timeout: 60_000 }, () => {
  it("without workload_pid and supervisor_pid (writes that failed), terminate still stops the workload and its children", async (t) => {
    const dir = tempDir(t);
    const pids = path.join(dir, "pids");
    const img = scriptImage(dir, "forever", `sleep 600 & echo $! > ${pids}; echo $$ >> ${pids}; wait`);
    const b = localBackend(path.join(dir, "state"));
    const inst = await b.provision(localGrant("nopid-1"), { image: { ...img, format: "bundle" } }, never);
    await until(() => existsSync(pids) && readFileSync(pids, "utf8").trim().split("\n").length === 2, "the workload to start");
    const [grandchild, child] = readFileSync(pids, "utf8").trim().split("\n").map(Number);
    rmSync(path.join(inst.details.run_dir!, "started", "workload_pid"));
    rmSync(path.join(inst.details.run_dir!, "started", "supervisor_pid"));
    await b.terminate(inst);
    await until(() => !alive(grandchild!) && !alive(child!), "the workload's process group to die", 5000);
  });

  it("a workload whose supervisor is gone is still found (by its working directory) and stopped", async (t) => {
    const dir = tempDir(t);
    const pids = path.join(dir, "pids");
    const img = scriptImage(dir, "orphaned", `echo $$ > ${pids}; exec sleep 600`);
    const b = localBackend(path.join(dir, "state"));
    const inst = await b.provision(localGrant("nosup-1"), { image: { ...img, format: "bundle" } }, never);
    await until(() => existsSync(pids) && readFileSync(pids, "utf8").trim() !== "", "the workload to start");
    const wl = Number(readFileSync(pids, "utf8"));
    const sup = Number(readFileSync(path.join(inst.details.run_dir!, "started", "supervisor_pid"), "utf8"));
    process.kill(sup, "SIGKILL");
    rmSync(path.join(inst.details.run_dir!, "started", "workload_pid"));
    await until(() => !alive(sup), "the supervisor to die");
    assert.ok(alive(wl));
    await b.terminate(inst);
    await until(() => !alive(wl), "the workload to be stopped", 5000);
  });

  it("state dir on a full tmpfs: terminate stops a workload whose pid files could not be written", async (t) => {
    const dir = tempDir(t);
    const state = path.join(dir, "state");
    const skip = mountTmpfs(t, state, "4m");
    if (skip) return t.skip(skip);
    const pids = path.join(dir, "pids"); // outside the full disk
    const img = scriptImage(dir, "fullwl", `echo $$ > ${pids}; exec sleep 600`);
    const b = localBackend(state);
    const inst = await b.provision(localGrant("full-1"), { image: { ...img, format: "bundle" } }, never);
    await until(() => existsSync(pids) && readFileSync(pids, "utf8").trim() !== "", "the workload to start");
    const wl = Number(readFileSync(pids, "utf8"));
    // As if the disk had filled up before the supervisor wrote its pid files; it cannot write its
    // result (nor terminate its claim) either.
    rmSync(path.join(inst.details.run_dir!, "started", "workload_pid"));
    rmSync(path.join(inst.details.run_dir!, "started", "supervisor_pid"));
    fillDisk(path.join(state, "filler"));
    await b.terminate(inst);
    await until(() => !alive(wl), "the workload to be stopped", 5000);
  });

  it("reconcile stops an orphan only after recording it in orphans.jsonl; when the record cannot be written the workload is left alone", async (t) => {
    const dir = tempDir(t);
    const state = path.join(dir, "state");
    const pids = path.join(dir, "pids");
    const img = scriptImage(dir, "orphan", `echo $$ > ${pids}; exec sleep 600`);
    const old = localBackend(state);
    await old.provision(localGrant("orph-1"), { image: { ...img, format: "bundle" } }, never);
    await until(() => existsSync(pids) && readFileSync(pids, "utf8").trim() !== "", "the workload to start");
    const wl = Number(readFileSync(pids, "utf8"));
    t.after(() => {
      try {
        process.kill(wl, "SIGKILL");
      } catch {
        /* stopped */
      }
    });
    // The record cannot be written (a directory where the file goes): nothing is stopped.
    mkdirSync(path.join(state, "orphans.jsonl"));
    await localBackend(state).reconcile(new Set());
    assert.ok(alive(wl), "not stopped without a record");
    rmSync(path.join(state, "orphans.jsonl"), { recursive: true });
    await localBackend(state).reconcile(new Set());
    await until(() => !alive(wl), "the orphan to be stopped", 5000);
    const rec = JSON.parse(readFileSync(path.join(state, "orphans.jsonl"), "utf8"));
    assert.equal(rec.request_id, "orph-1");
    assert.ok(rec.stopped.processes.some((p: { pid: number }) => p.pid === wl));
  });
});
