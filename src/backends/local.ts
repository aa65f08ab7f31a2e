import { spawn } from "node:child_process";
import { existsSync, mkdirSync, openSync, closeSync, readFileSync, readdirSync, readlinkSync, realpathSync, rmSync, statSync, writeFileSync, chmodSync, readSync, renameSync, copyFileSync } from "node:fs";
import path from "node:path";
import { localRunsDir, type LocalConfig } from "../config/schema.js";
import type { Almanac, Capabilities, ComputeGrant, Envelope, ExitObservation, ProvisionedInstance } from "../domain/index.js";
import { abortError, type Clock } from "../util/clock.js";
import { DigestMismatchError, FetchError, fetchVerified, ImageRefusedError } from "../util/fetch-verify.js";
import { ImagePolicy } from "../util/image-policy.js";
import type { Logger } from "../util/logger.js";
import {
  BackendError,
  ImageVerificationError,
  InvalidRequestError,
  TransientError,
  NOTHING_HELD,
  countDecline,
  expiredObservation,
  lostObservation,
  type BackendContext,
  type CheckResult,
  type Held,
  type ManagedBackend,
  type Satisfaction,
} from "./backend.js";
import { tryRecordOrphan } from "./common/orphan-log.js";
import { SUPERVISOR_SCRIPT } from "./local/supervisor.js";

/** How long a freshly spawned supervisor may take to report its workload's pid. */
const START_TIMEOUT_MS = 15_000;
const WORKLOAD_PATH = "/usr/local/bin:/usr/bin:/bin";

/** LocalConfig as parsed, or written by hand (tests) without the image keys: their defaults apply. */
export type LocalBackendConfig = Omit<LocalConfig, "image_roots" | "image_idle_timeout_seconds"> & Partial<Pick<LocalConfig, "image_roots" | "image_idle_timeout_seconds">>;

interface RunResult {
  exit_status: number | null;
  cpu_seconds: number | null;
  started_ms: number | null;
  ended_ms: number | null;
  failure: string;
}

/**
 * Runs workloads as local processes, each under a detached supervisor (local/supervisor.ts) that
 * records its exit and usage in the workload's run directory (under runs_dir), so a restarted
 * daemon, or another replica sharing runs_dir, re-attaches instead of losing or re-running it.
 * Development and single-host use; not TDX-capable.
 */
export class LocalBackend implements ManagedBackend {
  readonly name = "local";
  private readonly root: string;
  private readonly runs: string;
  private readonly images: string;
  private readonly supervisor: string;
  private readonly active = new Set<string>();
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly almanac: Almanac;
  private readonly imagePolicy: ImagePolicy;
  private readonly stateDir: string;
  private readonly metrics: BackendContext["metrics"];

  constructor(
    private readonly cfg: LocalBackendConfig,
    ctx: BackendContext,
  ) {
    this.imagePolicy = ctx.imagePolicy ?? new ImagePolicy({ fileRoots: cfg.image_roots ?? [], allowCidrs: [] });
    this.stateDir = ctx.stateDir;
    this.metrics = ctx.metrics;
    this.root = path.join(ctx.stateDir, "local");
    this.runs = localRunsDir(cfg, ctx.stateDir);
    this.images = path.join(this.root, "images");
    this.supervisor = path.join(this.root, "supervisor.sh");
    this.log = ctx.log.child({ backend: this.name });
    this.clock = ctx.clock;
    this.almanac = ctx.almanac;
  }

  private ready = false;
  /** Create the state directories and (re)write the supervisor script; first use only. */
  private ensureReady(): void {
    if (this.ready) return;
    mkdirSync(this.runs, { recursive: true, mode: 0o700 });
    mkdirSync(this.images, { recursive: true, mode: 0o700 });
    // Temp files of fetches a crash cut short (no fetch runs before this first use).
    for (const f of readdirSync(this.images)) if (f.endsWith(".part")) rmSync(path.join(this.images, f), { force: true });
    // Rewritten at every start so an upgrade ships its supervisor; running ones keep their copy open.
    const tmp = `${this.supervisor}.${process.pid}.tmp`;
    writeFileSync(tmp, SUPERVISOR_SCRIPT, { mode: 0o700 });
    renameSync(tmp, this.supervisor);
    this.ready = true;
  }

  capabilities(): Capabilities {
    return {
      regions: [this.cfg.region],
      tdx_capable: false,
      max_cpu_millicores: this.cfg.cpu_millicores,
      max_ram_mib: this.cfg.ram_mib,
    };
  }

  canSatisfy(grant: ComputeGrant, held: Held = NOTHING_HELD, envelope?: Envelope): Satisfaction {
    if (grant.region !== this.cfg.region) return { ok: false, code: "region_not_served", message: `local serves region ${this.cfg.region} only` };
    if (grant.tdx_required) return { ok: false, code: "tdx_not_supported", message: "local runs plain processes, not TDX guests" };
    if (grant.cpu_millicores > this.cfg.cpu_millicores || grant.ram_mib > this.cfg.ram_mib)
      return { ok: false, code: "too_large", message: `grant needs ${grant.cpu_millicores}m CPU / ${grant.ram_mib} MiB; local offers at most ${this.cfg.cpu_millicores}m / ${this.cfg.ram_mib} MiB` };
    if (envelope && envelope.image.format !== "bundle")
      return { ok: false, code: "image_format_not_supported", message: `local runs "bundle" images (an executable or a tar/tar.gz), not "${envelope.image.format}"` };
    return countDecline(this.name, held, this.cfg.max_concurrent, "max_concurrent", "workloads") ?? { ok: true };
  }

  async provision(grant: ComputeGrant, envelope: Envelope, signal: AbortSignal): Promise<ProvisionedInstance> {
    this.ensureReady();
    const runDir = this.runDir(grant.request_id);
    // Capacity was reserved at accept (the Fleet's ledger): nothing to refuse here.
    this.active.add(grant.request_id);
    try {
      if (!existsSync(path.join(runDir, "started"))) {
        if (envelope.image.format !== "bundle")
          throw new InvalidRequestError(`the local backend runs "bundle" images (an executable or a tar/tar.gz); got "${envelope.image.format}"`, this.name);
        const image = await this.fetchImage(grant, envelope, signal);
        await this.prepare(runDir, image, envelope);
        this.spawnSupervisor(runDir, grant, envelope);
      }
      await this.waitStarted(runDir, signal);
    } catch (e) {
      if (!existsSync(path.join(runDir, "started"))) this.active.delete(grant.request_id);
      throw e;
    }
    return {
      request_id: grant.request_id,
      backend: this.name,
      instance_id: `local-${grant.request_id}`,
      region: this.cfg.region,
      host: null,
      ssh_port: null,
      ssh_user: null,
      host_key_sha256: null,
      started_at: new Date(this.readResultOrStart(runDir)).toISOString(),
      cpu_millicores: grant.cpu_millicores,
      ram_mib: grant.ram_mib,
      details: { run_dir: runDir },
    };
  }

  async watchUntilExit(instance: ProvisionedInstance, validTo: Date, signal: AbortSignal): Promise<ExitObservation> {
    const runDir = this.runDir(instance.request_id);
    this.active.add(instance.request_id);
    // The supervisor's own watchdog kills at valid_to; give it a few polls to record the result.
    const giveUpAt = validTo.getTime() + 3 * this.cfg.poll_interval_ms + 1000;
    for (;;) {
      if (signal.aborted) throw abortError(signal);
      const result = readResult(runDir);
      if (result) return this.observation(runDir, result);
      if (!this.supervisorAlive(runDir)) {
        const late = readResult(runDir);
        if (late) return this.observation(runDir, late);
        return lostObservation("the workload's supervisor is gone without a result (host rebooted or supervisor killed)");
      }
      if (this.clock.now() >= giveUpAt)
        return expiredObservation(this.clock.now());
      await this.clock.sleep(this.cfg.poll_interval_ms, signal);
    }
  }

  async terminate(instance: ProvisionedInstance): Promise<void> {
    const runDir = this.runDir(instance.request_id);
    try {
      if (!existsSync(runDir)) return;
      // Claim the run if nobody started it yet: a supervisor that starts later exits at once.
      try {
        mkdirSync(path.join(runDir, "started"));
        writeResult(runDir, { exit_status: null, cpu_seconds: null, started_ms: null, ended_ms: this.clock.now(), failure: "terminated before start" });
        return;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
      }
      // The workload's process groups, found through the supervisor's session and the run's work
      // directory: never through workload_pid alone, which a full disk may have kept from being written.
      const groups = () => this.workloadGroups(runDir);
      if (!readResult(runDir)) {
        for (const g of groups()) signalGroup(g, "SIGTERM");
        const killAt = this.clock.now() + this.cfg.terminate_grace_seconds * 1000;
        while (!readResult(runDir) && this.supervisorAlive(runDir) && this.clock.now() < killAt) await this.clock.sleep(Math.min(50, this.cfg.poll_interval_ms));
      }
      for (const g of groups()) signalGroup(g, "SIGKILL");
      const deadline = this.clock.now() + START_TIMEOUT_MS;
      while (!readResult(runDir) && this.supervisorAlive(runDir)) {
        if (this.clock.now() > deadline) {
          const sup = this.supervisorPid(runDir);
          if (sup) signalGroup(sup, "SIGKILL");
          break;
        }
        await this.clock.sleep(Math.min(50, this.cfg.poll_interval_ms));
      }
      rmSync(path.join(runDir, "work"), { recursive: true, force: true });
    } finally {
      this.active.delete(instance.request_id);
    }
  }

  /**
   * Stop workloads no live grant owns (e.g. state restored from a backup). Runs started at or
   * after `asOfMs`, when `live` was read, are not judged by it (see BackendHooks.reconcile).
   */
  async reconcile(live: ReadonlySet<string>, asOfMs = Infinity): Promise<void> {
    this.ensureReady();
    for (const id of readdirSync(this.runs)) {
      // `active` covers grants this replica provisioned after the caller took its snapshot of live
      // grants; `asOfMs` those another replica sharing runs_dir started since.
      if (live.has(id) || this.active.has(id)) continue;
      const runDir = this.runDir(id);
      if (readResult(runDir) || !this.supervisorAlive(runDir) || this.startedSince(runDir, asOfMs)) continue;
      // Never stopped without a record of what it was (orphans.jsonl), written first.
      const processes = this.runProcesses(runDir);
      const recorded = tryRecordOrphan(this.stateDir, this.clock.now(), {
        backend: this.name,
        request_id: id,
        reason: "a local workload is running for a request_id the bridge has no live grant for",
        stopped: { run_dir: runDir, supervisor_pid: this.supervisorPid(runDir), processes },
      }, this.log);
      if (!recorded) continue;
      this.log.warn({ request_id: id, run_dir: runDir, pids: processes.map((p) => p.pid) }, "stopping orphaned local workload (no live grant); recorded in orphans.jsonl");
      this.metrics?.orphanSwept(this.name, "workload");
      await this.terminate({ request_id: id } as ProvisionedInstance);
    }
  }

  async check(): Promise<CheckResult[]> {
    const out: CheckResult[] = [];
    try {
      this.ensureReady();
      out.push({ check: "state directory writable", ok: true, detail: `${this.root}, runs in ${this.runs}` });
    } catch (e) {
      out.push({ check: "state directory writable", ok: false, detail: (e as Error).message });
    }
    for (const tool of ["/bin/bash", "tar", "awk"]) {
      try {
        await run(tool === "/bin/bash" ? tool : "sh", tool === "/bin/bash" ? ["-c", "true"] : ["-c", `command -v ${tool}`], tool);
        out.push({ check: `${tool} available`, ok: true, detail: "" });
      } catch (e) {
        out.push({ check: `${tool} available`, ok: false, detail: (e as Error).message });
      }
    }
    return out;
  }

  status(): Record<string, unknown> {
    return { active: this.active.size, max_concurrent: this.cfg.max_concurrent };
  }

  // ---- internals ------------------------------------------------------------------------------

  private runDir(requestId: string): string {
    return path.join(this.runs, requestId);
  }

  /** Content-addressed image cache: a file named by its sha256 exists only once verified. */
  private async fetchImage(grant: ComputeGrant, envelope: Envelope, signal: AbortSignal): Promise<string> {
    const file = path.join(this.images, envelope.image.sha256);
    // A cached image is used only for a URL the policy admits (the admission check ran on it too).
    if (existsSync(file) && this.imageRefusal(envelope.image.url) === null) return file;
    // Each download verifies its own bytes into its own temp file; grants sharing an image at
    // once each verify the URL they were given, and the first to finish fills the cache.
    try {
      await fetchVerified(envelope.image.url, envelope.image.sha256, file, {
        maxBytes: this.cfg.max_image_bytes,
        signal,
        policy: this.imagePolicy,
        idleTimeoutMs: (this.cfg.image_idle_timeout_seconds ?? 60) * 1000,
        deadlineMs: this.validToMs(grant),
      });
    } catch (e) {
      if (e instanceof DigestMismatchError) throw new ImageVerificationError(e.message, this.name);
      if (e instanceof ImageRefusedError) throw new InvalidRequestError(e.message, this.name);
      if (e instanceof FetchError) throw new TransientError(e.message, this.name, { cause: e });
      throw e;
    }
    return file;
  }

  /** Why the policy refuses `url` (file roots, literal addresses), or null. */
  private imageRefusal(url: string): string | null {
    try {
      const u = new URL(url);
      if (u.protocol === "file:") this.imagePolicy.filePath(u);
      else this.imagePolicy.checkHttp(u);
      return null;
    } catch (e) {
      return (e as Error).message;
    }
  }

  private async prepare(runDir: string, image: string, envelope: Envelope): Promise<void> {
    const work = path.join(runDir, "work");
    rmSync(work, { recursive: true, force: true });
    mkdirSync(work, { recursive: true, mode: 0o700 });
    if (isTarball(image)) {
      await run("tar", ["-xf", image, "-C", work, "--no-same-owner", "--no-same-permissions", "--delay-directory-restore"], `unpacking the bundle`);
    } else {
      copyFileSync(image, path.join(work, "workload"));
      chmodSync(path.join(work, "workload"), 0o700);
    }
    const env: Record<string, string> = { PATH: WORKLOAD_PATH, HOME: work, LANG: "C.UTF-8", ...(envelope.env ?? {}) };
    writeFileSync(path.join(runDir, "env0"), Object.entries(env).map(([k, v]) => `${k}=${v}\0`).join(""), { mode: 0o600 });
  }

  private spawnSupervisor(runDir: string, grant: ComputeGrant, envelope: Envelope): void {
    const command = envelope.command ?? [existsSync(path.join(runDir, "work", "workload")) ? "./workload" : "./run"];
    const deadline = String(this.validToMs(grant));
    const child = spawn("/bin/bash", [this.supervisor, runDir, deadline, "--", ...command], {
      detached: true,
      stdio: "ignore",
      env: { PATH: WORKLOAD_PATH, LANG: "C.UTF-8" },
    });
    child.on("error", (e) => this.log.error({ request_id: grant.request_id, err: e }, "supervisor failed to start"));
    child.unref();
  }

  private validToMs(grant: ComputeGrant): number {
    return this.almanac.toWallMs(grant.valid_to);
  }

  private async waitStarted(runDir: string, signal: AbortSignal): Promise<void> {
    const deadline = this.clock.now() + START_TIMEOUT_MS;
    const pidFile = path.join(runDir, "started", "workload_pid");
    while (!existsSync(pidFile) && !readResult(runDir)) {
      if (this.clock.now() > deadline) throw new BackendError("the workload supervisor did not start within 15 s", this.name);
      await this.clock.sleep(10, signal);
    }
  }

  private readResultOrStart(runDir: string): number {
    return readResult(runDir)?.started_ms ?? this.clock.now();
  }

  private observation(runDir: string, r: RunResult): ExitObservation {
    const expired = existsSync(path.join(runDir, "expired"));
    return {
      kind: expired ? "expired" : "exited",
      exit_code: expired ? null : r.exit_status,
      cpu_seconds: r.cpu_seconds,
      peak_memory_mib: null,
      ended_at: r.ended_ms ? new Date(r.ended_ms).toISOString() : null,
      failure: r.failure ? { kind: "workload_start", message: r.failure } : null,
    };
  }

  /**
   * Was the run started at or after `ms`? By its `started` directory's mtime (later than the start
   * once the pid files are in it), with a second to spare: file times come from a coarse clock that
   * may lag the wall clock by a few ms.
   */
  private startedSince(runDir: string, ms: number): boolean {
    try {
      return statSync(path.join(runDir, "started")).mtimeMs >= ms - 1000;
    } catch {
      return false;
    }
  }

  private supervisorAlive(runDir: string): boolean {
    // Between its mkdir and its first instruction the supervisor cannot be found yet: alive then.
    if (this.supervisorPid(runDir) !== null) return true;
    if (readResult(runDir) || existsSync(path.join(runDir, "started", "supervisor_pid"))) return false;
    try {
      return this.clock.now() - statSync(path.join(runDir, "started")).mtimeMs < START_TIMEOUT_MS;
    } catch {
      return false;
    }
  }

  /**
   * This run's supervisor, by its pid file when that was written and names it, else by scanning
   * /proc for it (its command line names the run directory): a full disk may have kept the pid
   * file from being written, and a recycled pid must not count. The replica that started it may
   * have named the directory otherwise (runs_dir through a symlink): the same directory counts.
   */
  private supervisorPid(runDir: string): number | null {
    const isOurs = (pid: number) => {
      try {
        return sameDir(readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0")[2], runDir);
      } catch {
        return false;
      }
    };
    const recorded = readPid(path.join(runDir, "started", "supervisor_pid"));
    if (recorded !== null) return isOurs(recorded) ? recorded : null;
    for (const p of procPids()) if (isOurs(p)) return p;
    return null;
  }

  /** The run's workload processes as an orphan record lists them: pid, group, command line. */
  private runProcesses(runDir: string): { pid: number; pgrp: number; cmdline: string }[] {
    const groups = new Set(this.workloadGroups(runDir));
    const out: { pid: number; pgrp: number; cmdline: string }[] = [];
    for (const p of procPids()) {
      const st = procStat(p);
      if (!st || !groups.has(st.pgrp)) continue;
      let cmdline = "";
      try {
        cmdline = readFileSync(`/proc/${p}/cmdline`, "utf8").split("\0").filter(Boolean).join(" ").slice(0, 300);
      } catch {
        continue;
      }
      out.push({ pid: p, pgrp: st.pgrp, cmdline });
      if (out.length >= 50) break;
    }
    return out;
  }

  /**
   * Process groups to signal for this run's workload, found without trusting any file the run may
   * have failed to write: every group in the supervisor's session but its own (it is a session
   * leader, spawned detached; the workload runs in a group of its own), and the group of every
   * process whose working directory is in the run's work directory (the workload starts there;
   * this finds it after its supervisor died too).
   */
  private workloadGroups(runDir: string): number[] {
    const out = new Set<number>();
    // Only a live supervisor verified by its command line: a dead one's pid may name another session.
    const sup = this.supervisorPid(runDir);
    // As /proc shows a cwd: symlinks resolved (runs_dir may be named through one).
    let work = path.join(runDir, "work");
    try {
      work = realpathSync(work);
    } catch {
      /* gone: no process works in it */
    }
    const own = procStat(process.pid)?.pgrp;
    for (const p of procPids()) {
      const st = procStat(p);
      if (!st || st.pgrp <= 1) continue;
      if (sup !== null && st.session === sup) {
        if (st.pgrp !== sup) out.add(st.pgrp);
        continue;
      }
      let cwd: string;
      try {
        cwd = readlinkSync(`/proc/${p}/cwd`);
      } catch {
        continue;
      }
      if ((cwd === work || cwd.startsWith(work + path.sep)) && st.pgrp !== own) out.add(st.pgrp);
    }
    return [...out];
  }
}

/** Is `arg` (a supervisor's run directory argument) `runDir`, however either is spelt? */
function sameDir(arg: string | undefined, runDir: string): boolean {
  if (arg === runDir) return true;
  // Only a candidate named like the run (its request_id) costs the two stats.
  if (arg === undefined || !path.isAbsolute(arg) || path.basename(arg) !== path.basename(runDir)) return false;
  try {
    const a = statSync(arg);
    const b = statSync(runDir);
    return a.dev === b.dev && a.ino === b.ino;
  } catch {
    return false;
  }
}

/** Numeric entries of /proc. */
function procPids(): number[] {
  try {
    return readdirSync("/proc").filter((d) => /^\d+$/.test(d)).map(Number);
  } catch {
    return [];
  }
}

/** Process group and session of `pid` from /proc/PID/stat (fields 5 and 6), or null. */
function procStat(pid: number): { pgrp: number; session: number } | null {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, "utf8");
    // "pid (comm) state ppid pgrp session ...": comm may contain spaces and parentheses.
    const f = text.slice(text.lastIndexOf(")") + 2).split(" ");
    return { pgrp: Number(f[2]), session: Number(f[3]) };
  } catch {
    return null;
  }
}

function readPid(file: string): number | null {
  try {
    const n = Number(readFileSync(file, "utf8").trim());
    return Number.isInteger(n) && n > 1 ? n : null;
  } catch {
    return null;
  }
}

function readResult(runDir: string): RunResult | null {
  let text: string;
  try {
    text = readFileSync(path.join(runDir, "result"), "utf8");
  } catch {
    return null;
  }
  const kv = new Map<string, string>();
  for (const line of text.split("\n")) {
    const i = line.indexOf("=");
    if (i > 0) kv.set(line.slice(0, i), line.slice(i + 1));
  }
  const num = (k: string) => {
    const v = kv.get(k);
    if (v === undefined || v === "") return null;
    const n = Number(v);
    return Number.isFinite(n) ? n : null;
  };
  return { exit_status: num("exit_status"), cpu_seconds: num("cpu_seconds"), started_ms: num("started_ms"), ended_ms: num("ended_ms"), failure: kv.get("failure") ?? "" };
}

function writeResult(runDir: string, r: RunResult): void {
  const text = `exit_status=${r.exit_status ?? ""}\ncpu_seconds=${r.cpu_seconds ?? ""}\nstarted_ms=${r.started_ms ?? ""}\nended_ms=${r.ended_ms ?? ""}\nfailure=${r.failure}\n`;
  writeFileSync(path.join(runDir, "result.tmp"), text);
  renameSync(path.join(runDir, "result.tmp"), path.join(runDir, "result"));
}

function signalGroup(pgid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(-pgid, sig);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ESRCH") throw e;
  }
}

/** gzip magic, or "ustar" at offset 257: a tarball to unpack rather than an executable. */
function isTarball(file: string): boolean {
  const fd = openSync(file, "r");
  try {
    const buf = Buffer.alloc(262);
    const n = readSync(fd, buf, 0, 262, 0);
    if (n >= 2 && buf[0] === 0x1f && buf[1] === 0x8b) return true;
    return n >= 262 && buf.subarray(257, 262).toString("latin1") === "ustar";
  } finally {
    closeSync(fd);
  }
}

function run(cmd: string, args: string[], what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "pipe"] });
    let err = "";
    child.stderr.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-2000)));
    child.on("error", reject);
    child.on("close", (code) => (code === 0 ? resolve() : reject(new InvalidRequestError(`${what} failed: ${err.trim() || `exit ${code}`}`, "local"))));
  });
}
