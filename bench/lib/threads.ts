import { readdirSync, readFileSync } from "node:fs";

/**
 * CPU time (ms, user + system) of each thread of this process, by thread id, read from
 * /proc/self/task (Linux; empty elsewhere). The kernel counts in clock ticks (10 ms), so only
 * sums over runs of a second or more mean anything.
 */
export function threadCpuMs(): Map<string, number> {
  const out = new Map<string, number>();
  let tids: string[];
  try {
    tids = readdirSync("/proc/self/task");
  } catch {
    return out;
  }
  for (const tid of tids) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/self/task/${tid}/stat`, "utf8");
    } catch {
      continue; // the thread ended meanwhile
    }
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    out.set(tid, (Number(f[11]) + Number(f[12])) * 10);
  }
  return out;
}

/** CPU ms spent between two readings, summed into the group `classify` names for each thread. */
export function cpuByGroup<G extends string>(before: Map<string, number>, after: Map<string, number>, classify: (tid: string) => G): Map<G, number> {
  const out = new Map<G, number>();
  for (const [tid, ms] of after) {
    const g = classify(tid);
    out.set(g, (out.get(g) ?? 0) + ms - (before.get(tid) ?? 0));
  }
  return out;
}
