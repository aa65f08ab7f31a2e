/**
 * systemd mode: the workload is a transient service `cb-<request_id>.service` started with
 * systemd-run on the machine (RemainAfterExit=yes, no --collect: the exit status stays readable
 * and a vanished unit is never mistaken for a clean success). Building systemd-run's arguments
 * and reading `systemctl show` / the ExecStopPost record are pure functions here.
 */
import type { ComputeGrant, Envelope, ExitObservation } from "../../domain/index.js";

/** Properties watched; parsed as KEY=VALUE (systemd prints them in its own order). */
export const SHOW_PROPS = "LoadState,ActiveState,SubState,Result,ExecMainCode,ExecMainStatus,CPUUsageNSec,MemoryPeak,MemoryCurrent";

export const WORKLOAD_PATH = "/usr/local/bin:/usr/bin:/bin";
/** Longest single argument execve(2) accepts (MAX_ARG_STRLEN). */
const MAX_ARG = 128 * 1024;
/** Bound on the whole remote command line (an SSH exec request must fit in one packet). */
export const MAX_COMMAND_BYTES = 200 * 1024;

const SAFE_PATH = /^\/[A-Za-z0-9._/-]*$/;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,127}$/;
const USER_NAME = /^[a-z_][a-z0-9_-]{0,31}$/;

export function unitName(requestId: string): string {
  return `cb-${requestId}.service`;
}

/** The request id inside a unit name we created, or null for anything else. */
export function requestIdOfUnit(unit: string, isRequestId: (s: string) => boolean): string | null {
  const m = /^cb-(.+)\.service$/.exec(unit);
  return m && isRequestId(m[1]!) ? m[1]! : null;
}

export class ArgumentError extends Error {
  override name = "ArgumentError";
}

export interface RunArgs {
  unit: string;
  runDir: string;
  grant: ComputeGrant;
  envelope: Envelope;
  /** Seconds until valid_to (RuntimeMaxSec=, belt and braces next to the watch). */
  runtimeMaxSec: number;
  /** Grace between SIGTERM and SIGKILL on stop. */
  stopTimeoutSec: number;
  /** Run the workload as this user (User=); unset: as root. */
  runAs?: string | undefined;
}

/**
 * systemd-run's arguments (after the program name), ending with "--" and the command; and
 * whether the script must append the default command (./run or ./workload).
 *
 * The service manager expands $VAR / ${VAR} in ExecStart= arguments (systemd-run before 254 has
 * no --expand-environment=no), so every "$" in an argument after argv[0] is doubled; argv[0] is
 * resolved to a path by systemd-run itself and only its copy in argv could be expanded.
 * Environment values are literal and need no escaping. Each word is later quoted with shq.
 */
export function systemdRunArgs(a: RunArgs): { args: string[]; defaultCommand: boolean } {
  if (!SAFE_PATH.test(a.runDir)) throw new ArgumentError(`run directory ${JSON.stringify(a.runDir)} has unexpected characters`);
  const work = `${a.runDir}/work`;
  const cpuPercent = Math.max(1, Math.ceil(a.grant.cpu_millicores / 10));
  const args = [
    `--unit=${a.unit}`,
    `--description=compute-bridge grant ${a.grant.request_id}`,
    `--working-directory=${work}`,
    "-p", "RemainAfterExit=yes",
    "-p", "CPUAccounting=yes",
    "-p", "MemoryAccounting=yes",
    "-p", `CPUQuota=${cpuPercent}%`,
    "-p", `MemoryMax=${a.grant.ram_mib}M`,
    "-p", "MemorySwapMax=0",
    "-p", `RuntimeMaxSec=${Math.max(1, Math.ceil(a.runtimeMaxSec))}`,
    "-p", `TimeoutStopSec=${Math.max(1, Math.ceil(a.stopTimeoutSec))}`,
    // '-': a failing recorder never turns the unit's result into a failure; '+': it runs with full
    // privileges (it writes the root-owned run directory) when the workload runs as another user.
    "-p", `ExecStopPost=${a.runAs ? "+-" : "-"}/bin/sh ${a.runDir}/stoppost.sh ${a.runDir} ${a.unit}`,
  ];
  if (a.runAs !== undefined) {
    if (!USER_NAME.test(a.runAs)) throw new ArgumentError(`run_as ${JSON.stringify(a.runAs.slice(0, 40))} is not a user name`);
    args.push("-p", `User=${a.runAs}`);
  }
  const env: Record<string, string> = { PATH: WORKLOAD_PATH, HOME: work, LANG: "C.UTF-8", ...(a.envelope.env ?? {}) };
  for (const [k, v] of Object.entries(env)) {
    if (!ENV_NAME.test(k)) throw new ArgumentError(`env name ${JSON.stringify(k.slice(0, 64))} is not a shell-safe variable name`);
    if (v.includes("\0")) throw new ArgumentError(`env ${k} contains NUL`);
    const word = `--setenv=${k}=${v}`;
    if (Buffer.byteLength(word) > MAX_ARG) throw new ArgumentError(`env ${k} is longer than ${MAX_ARG} bytes`);
    args.push(word);
  }
  args.push("--");
  const command = a.envelope.command;
  if (!command || command.length === 0) return { args, defaultCommand: true };
  command.forEach((w, i) => {
    if (w.includes("\0")) throw new ArgumentError("command contains NUL");
    if (Buffer.byteLength(w) > MAX_ARG) throw new ArgumentError(`command word ${i} is longer than ${MAX_ARG} bytes`);
    args.push(i === 0 ? w : w.replace(/\$/g, "$$$$"));
  });
  return { args, defaultCommand: false };
}

/** `systemctl show` output for several units (blocks separated by an empty line), by unit. */
export function parseShowBlocks(text: string, units: readonly string[]): Map<string, Record<string, string>> | null {
  const blocks = text.replace(/\n+$/, "").split(/\n\n/);
  if (blocks.length !== units.length) return null;
  const out = new Map<string, Record<string, string>>();
  units.forEach((u, i) => out.set(u, parseKv(blocks[i]!)));
  for (const p of out.values()) if (p.LoadState === undefined) return null;
  return out;
}

/** KEY=VALUE lines; later keys win; lines without '=' ignored. */
export function parseKv(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const i = line.indexOf("=");
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1);
  }
  return out;
}

/** A systemd integer property, or null for "[not set]", "infinity", UINT64_MAX and garbage. */
export function num(v: string | undefined): number | null {
  if (v === undefined || !/^\d{1,19}$/.test(v)) return null;
  const n = Number(v);
  return Number.isFinite(n) && n < 2 ** 63 ? n : null;
}

/** Has the unit's main process ended (or the unit vanished)? */
export function unitEnded(s: Record<string, string>): boolean {
  if (s.LoadState !== "loaded") return true;
  if (s.ActiveState === "failed" || s.ActiveState === "inactive") return true;
  return s.ActiveState === "active" && s.SubState === "exited";
}

const SIGNALS: Record<string, number> = {
  HUP: 1, INT: 2, QUIT: 3, ILL: 4, TRAP: 5, ABRT: 6, BUS: 7, FPE: 8, KILL: 9, USR1: 10, SEGV: 11, USR2: 12,
  PIPE: 13, ALRM: 14, TERM: 15, STKFLT: 16, CHLD: 17, CONT: 18, STOP: 19, TSTP: 20, TTIN: 21, TTOU: 22,
  URG: 23, XCPU: 24, XFSZ: 25, VTALRM: 26, PROF: 27, WINCH: 28, IO: 29, PWR: 30, SYS: 31,
};

/** Exit statuses systemd itself uses when it could not start the command (systemd.exec(5)). */
const SYSTEMD_START_FAILURES: Record<number, string> = {
  200: "CHDIR: changing to the working directory failed",
  203: "EXEC: the command could not be executed",
  217: "USER: the user could not be resolved",
};

export interface Usage {
  /** Highest CPUUsageNSec seen. */
  cpuNs: number | null;
  /** Highest MemoryPeak / MemoryCurrent seen (bytes). */
  memBytes: number | null;
}

export function recordUsage(u: Usage, s: Record<string, string>): void {
  const cpu = num(s.CPUUsageNSec);
  if (cpu !== null && (u.cpuNs === null || cpu > u.cpuNs)) u.cpuNs = cpu;
  for (const k of ["MemoryPeak", "MemoryCurrent"]) {
    const m = num(s[k]);
    if (m !== null && (u.memBytes === null || m > u.memBytes)) u.memBytes = m;
  }
}

/**
 * How the watch ends, from the last `systemctl show` and the ExecStopPost record (may be empty).
 * Exit codes follow the shell convention: 128 + signal when killed by one.
 */
export function systemdObservation(o: {
  status: Record<string, string>;
  final: Record<string, string>;
  usage: Usage;
  nowMs: number;
  validToMs: number;
  unit: string;
  machine: string;
}): ExitObservation {
  const { status: s, final: f, usage } = o;
  recordUsage(usage, s);
  const finalCpu = num(f.cpu_usec);
  const cpuNs = Math.max(usage.cpuNs ?? -1, finalCpu === null ? -1 : finalCpu * 1000);
  const finalMem = num(f.memory_peak_bytes);
  const memBytes = Math.max(usage.memBytes ?? -1, finalMem ?? -1);
  const endedSec = num(f.ended_at);
  const base = {
    cpu_seconds: cpuNs >= 0 ? Math.round(cpuNs / 1e6) / 1000 : null,
    peak_memory_mib: memBytes >= 0 ? Math.round((memBytes / 1048576) * 100) / 100 : null,
    ended_at: new Date(endedSec !== null ? endedSec * 1000 : o.nowMs).toISOString(),
  };
  // The main process's end, from the unit if it is still loaded, else from the record.
  let code: number | null = null;
  let how: "exited" | "killed" | null = null;
  const result = s.LoadState === "loaded" ? s.Result : f.service_result;
  if (s.LoadState === "loaded" && num(s.ExecMainCode)) {
    const c = num(s.ExecMainCode)!;
    const st = num(s.ExecMainStatus) ?? 0;
    if (c === 1) [how, code] = ["exited", st];
    else [how, code] = ["killed", 128 + st];
  } else if (f.exit_code) {
    if (f.exit_code === "exited") [how, code] = ["exited", num(f.exit_status) ?? 0];
    else [how, code] = ["killed", 128 + (SIGNALS[f.exit_status ?? ""] ?? num(f.exit_status) ?? 0)];
  }
  // RuntimeMaxSec= (derived from valid_to) ended it, or it ended on its own at the deadline.
  if (result === "timeout" && o.nowMs >= o.validToMs - 2000) return { kind: "expired", exit_code: null, ...base, failure: null };
  if (how === null) {
    if (s.LoadState !== "loaded" && !f.service_result)
      return { kind: "lost", exit_code: null, ...base, ended_at: null, failure: { kind: "lost", message: `unit ${o.unit} on machine ${o.machine} disappeared without a recorded result (machine rebooted, or stopped outside compute-bridge)` } };
    return { kind: "exited", exit_code: null, ...base, failure: { kind: "workload_start", message: `unit ${o.unit} ended with result "${result ?? "unknown"}" before its command ran` } };
  }
  if (how === "exited" && code !== null && result === "exit-code" && SYSTEMD_START_FAILURES[code])
    return { kind: "exited", exit_code: code, ...base, failure: { kind: "workload_start", message: `systemd could not start the command (${code}/${SYSTEMD_START_FAILURES[code]})` } };
  return { kind: "exited", exit_code: code, ...base, failure: null };
}
