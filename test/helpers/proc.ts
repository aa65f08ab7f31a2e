import { existsSync, readdirSync, readFileSync, readlinkSync } from "node:fs";
import path from "node:path";

/** Running (a zombie waiting to be reaped does not count). */
export function alive(pid: number): boolean {
  try {
    const st = readFileSync(`/proc/${pid}/stat`, "utf8");
    return st.slice(st.lastIndexOf(")") + 2, st.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

/** Is `pid` still a process of this run dir (by command line or cwd)? Guards against pid reuse. */
export function aliveInRun(pid: number, runDir: string): boolean {
  try {
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8");
    let cwd = "";
    try {
      cwd = readlinkSync(`/proc/${pid}/cwd`);
    } catch {
      /* exited meanwhile */
    }
    return cmdline.includes(runDir) || cwd.startsWith(runDir);
  } catch {
    return false;
  }
}

/**
 * Supervisors and workloads of the local backend under `stateDir` (or in `runs`, a runs_dir of its
 * own) that are still alive, as `id/file` → pid.
 */
export function liveLocalRuns(stateDir: string, runs = path.join(stateDir, "local", "runs")): Map<string, number> {
  const out = new Map<string, number>();
  for (const id of existsSync(runs) ? readdirSync(runs) : []) {
    for (const f of ["supervisor_pid", "workload_pid"]) {
      const p = path.join(runs, id, "started", f);
      let pid: number;
      try {
        pid = Number(readFileSync(p, "utf8"));
      } catch {
        continue;
      }
      if (pid > 0 && aliveInRun(pid, path.join(runs, id))) out.set(`${id}/${f}`, pid);
    }
  }
  return out;
}

/**
 * Kills what a test left running under `stateDir` (or in `runs`; workloads outlive a daemon's
 * close by design): the workload's process group and its supervisor by their pid files, then
 * every process still in a run (its command line names the run directory, as the supervisor's
 * and its deadline watchdog's do, or it works in it, as the workload and the watchdog's `sleep`
 * do), by process group when the group's leader is one of them. The watchdog is a subshell of
 * the supervisor in a group of its own: killing the supervisor leaves it sleeping until the
 * grant's valid_to, and the pid files do not name it.
 */
export function killLocalRuns(stateDir: string, runs = path.join(stateDir, "local", "runs")): void {
  for (const [key, pid] of liveLocalRuns(stateDir, runs)) {
    try {
      process.kill(key.endsWith("workload_pid") ? -pid : pid, "SIGKILL");
    } catch {
      /* gone meanwhile */
    }
  }
  const dirs = existsSync(runs) ? readdirSync(runs).map((id) => path.join(runs, id)) : [];
  if (dirs.length === 0) return;
  for (let pass = 0; pass < 3; pass++) {
    const found = new Map<number, number>();
    for (const entry of readdirSync("/proc")) {
      const pid = Number(entry);
      if (!/^\d+$/.test(entry) || pid === process.pid || !alive(pid)) continue;
      if (!dirs.some((d) => aliveInRun(pid, d))) continue;
      try {
        const st = readFileSync(`/proc/${pid}/stat`, "utf8");
        found.set(pid, Number(st.slice(st.lastIndexOf(")") + 2).split(" ")[2]));
      } catch {
        /* exited meanwhile */
      }
    }
    if (found.size === 0) return;
    for (const [pid, pgrp] of found) {
      try {
        process.kill(found.has(pgrp) ? -pgrp : pid, "SIGKILL");
      } catch {
        /* gone meanwhile */
      }
    }
  }
}

/**
 * The local workload's pid from its run dir, once the supervisor has written it (it writes the
 * file right after starting the workload: an empty read would be pid 0, which proves nothing).
 */
export async function workloadPid(runDir: string, timeoutMs = 10_000): Promise<number> {
  const file = path.join(runDir, "started", "workload_pid");
  const end = Date.now() + timeoutMs;
  for (;;) {
    let pid = 0;
    try {
      pid = Number(readFileSync(file, "utf8"));
    } catch {
      /* not written yet */
    }
    if (pid > 0) return pid;
    if (Date.now() > end) throw new Error(`no pid in ${file} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
