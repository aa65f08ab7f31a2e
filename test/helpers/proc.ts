import { readFileSync, readlinkSync } from "node:fs";

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
