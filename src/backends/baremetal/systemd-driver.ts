/**
 * systemd mode (systemd.ts describes the unit): provision with SYSTEMD_PROVISION (fetch, verify,
 * unpack, systemd-run in one script), watch with one batched `systemctl show` per machine per
 * interval, read the final record the unit's ExecStopPost wrote, terminate with SYSTEMD_TERMINATE.
 */
import type { ExitObservation, ProvisionedInstance } from "../../domain/index.js";
import { shJoin } from "../../util/shell.js";
import { InvalidRequestError, TransientError } from "../backend.js";
import { BatchWatcher } from "../common/batch-watcher.js";
import {
  BACKEND,
  COMMAND_TIMEOUT_MS,
  definitive,
  execError,
  FETCH_TIMEOUT_MS,
  instanceOf,
  isRequestId,
  marker,
  provisionError,
  secondsLeft,
  TERMINATE_TIMEOUT_MS,
  usageKey,
  type BaremetalDriver,
  type DriverContext,
  type Machine,
  type ProvisionRequest,
} from "./driver.js";
import { remote, SYSTEMD_FINALIZE, SYSTEMD_LIST, SYSTEMD_PROVISION, SYSTEMD_TERMINATE } from "./scripts.js";
import { clip, type ExecResult } from "./ssh-pool.js";
import {
  ArgumentError,
  MAX_COMMAND_BYTES,
  parseKv,
  parseShowBlocks,
  recordUsage,
  requestIdOfUnit,
  SHOW_PROPS,
  systemdObservation,
  systemdRunArgs,
  unitEnded,
  unitName,
  type Usage,
} from "./systemd.js";

/** Largest bundle fetched onto a machine. */
const MAX_BUNDLE_BYTES = 16 * 1024 ** 3;
/** SIGTERM-to-SIGKILL grace when a unit is stopped. */
const STOP_TIMEOUT_SEC = 10;
/** Units per `systemctl show` call. */
const SHOW_BATCH = 200;

export class SystemdDriver implements BaremetalDriver {
  readonly mode = "systemd";
  readonly imageFormat = "bundle";
  readonly runsTdx = false;
  readonly workloadKind = "unit";
  private readonly units: BatchWatcher<Record<string, string>>;
  private readonly samples = new Map<string, Usage>();

  constructor(private readonly ctx: DriverContext) {
    this.units = new BatchWatcher({
      intervalMs: ctx.cfg.poll_interval_ms,
      clock: ctx.clock,
      missingAfter: 3,
      describe: (machine, ids, signal) => this.describe(machine, ids, signal),
    });
  }

  workloadName(requestId: string): string {
    return unitName(requestId);
  }

  async provision(m: Machine, { grant, envelope, sha, url, alloc, signal }: ProvisionRequest): Promise<ProvisionedInstance> {
    if (envelope.image.format !== "bundle") throw new InvalidRequestError(`systemd-mode machines run "bundle" images; got "${envelope.image.format}"`, BACKEND);
    const id = grant.request_id;
    const unit = unitName(id);
    const runDir = `${m.runs}/${id}`;
    let built: { args: string[]; defaultCommand: boolean };
    try {
      built = systemdRunArgs({ unit, runDir, grant, envelope, runtimeMaxSec: secondsLeft(this.ctx, grant), stopTimeoutSec: STOP_TIMEOUT_SEC, runAs: m.cfg.run_as });
    } catch (e) {
      if (e instanceof ArgumentError) throw new InvalidRequestError(e.message, BACKEND);
      throw e;
    }
    const cmd = remote(SYSTEMD_PROVISION, "cb-provision", [m.runs, id, unit, m.images, sha, url, String(MAX_BUNDLE_BYTES), built.defaultCommand ? "1" : "0", `${grant.cpu_millicores} ${grant.ram_mib}`, m.cfg.run_as ?? "", String(secondsLeft(this.ctx, grant)), ...built.args]);
    if (Buffer.byteLength(cmd) > MAX_COMMAND_BYTES) throw new InvalidRequestError(`the command line and environment are too large for one SSH command (${Buffer.byteLength(cmd)} bytes; at most ${MAX_COMMAND_BYTES})`, BACKEND);
    alloc.started = true;
    let r: ExecResult;
    try {
      r = await m.conn.exec(cmd, { op: "provision", timeoutMs: FETCH_TIMEOUT_MS, signal, idempotent: true, long: true });
    } catch (e) {
      throw execError(e, m, "provision");
    }
    const started = marker(r.stdout, /^CB-(STARTED|ADOPT) ?(\d*)$/);
    if (r.code !== 0 || !started) {
      // Our scripts' own failure codes mean systemd-run did not create the unit.
      if (definitive(r)) alloc.started = false;
      throw provisionError(m, r, envelope);
    }
    if (started[1] === "ADOPT") this.ctx.log.info({ request_id: id, machine: m.cfg.name, unit }, "adopted the grant's existing unit (idempotent provision)");
    else this.ctx.log.info({ request_id: id, machine: m.cfg.name, unit }, "unit started");
    return instanceOf(this.ctx, m, grant, started[2], { mode: "systemd", unit, run_dir: runDir });
  }

  async watch(m: Machine, id: string, validToMs: number, signal: AbortSignal, callerSignal: AbortSignal): Promise<ExitObservation> {
    const unit = unitName(id);
    const key = usageKey(m, unit);
    if (!this.samples.has(key)) this.samples.set(key, { cpuNs: null, memBytes: null });
    const res = await this.units.waitFor(m.cfg.name, unit, { until: unitEnded, signal });
    const status = res.kind === "match" ? res.status : { LoadState: "not-found" };
    // A unit whose command exited 0 stays active (RemainAfterExit=yes): stopping it runs the
    // ExecStopPost recorder (final usage, in the unit's cgroup) and ends any leftover process.
    const stop = status.LoadState === "loaded" && status.ActiveState === "active" && status.SubState === "exited";
    let r: ExecResult;
    try {
      r = await m.conn.exec(remote(SYSTEMD_FINALIZE, "cb-finalize", [unit, `${m.runs}/${id}`, stop ? "1" : "0"]), { op: "finalize", timeoutMs: TERMINATE_TIMEOUT_MS, signal: callerSignal, idempotent: true });
    } catch (e) {
      throw execError(e, m, "finalize");
    }
    const obs = systemdObservation({ status, final: parseKv(r.stdout), usage: this.samples.get(key)!, nowMs: this.ctx.clock.now(), validToMs, unit, machine: m.cfg.name });
    this.samples.delete(key);
    return obs;
  }

  async endedNow(m: Machine, id: string, signal: AbortSignal): Promise<boolean> {
    const unit = unitName(id);
    const s = (await this.describe(m.cfg.name, [unit], signal)).get(unit);
    return s !== undefined && unitEnded(s) && (s.LoadState === "loaded" || s.LoadState === "not-found");
  }

  usage(m: Machine, id: string): Usage | undefined {
    return this.samples.get(usageKey(m, unitName(id)));
  }

  forget(m: Machine, id: string): void {
    this.samples.delete(usageKey(m, unitName(id)));
  }

  terminateCommand(m: Machine, id: string): string {
    return remote(SYSTEMD_TERMINATE, "cb-terminate", [m.runs, id, unitName(id)]);
  }

  listCommand(_m: Machine, workDir: string): string {
    return remote(SYSTEMD_LIST, "cb-list", [workDir]);
  }

  listedWorkload([kind, name, load]: readonly string[]): string | null {
    if (kind !== "unit" || !name || load !== "loaded") return null;
    return requestIdOfUnit(name, isRequestId);
  }

  close(): void {
    this.units.close();
  }

  /** One `systemctl show` per machine per interval for every unit watched there. */
  private async describe(machine: string, units: readonly string[], signal: AbortSignal): Promise<ReadonlyMap<string, Record<string, string>>> {
    const m = this.ctx.machine(machine);
    const out = new Map<string, Record<string, string>>();
    for (let i = 0; i < units.length; i += SHOW_BATCH) {
      const chunk = units.slice(i, i + SHOW_BATCH);
      const r = await m.conn.exec(shJoin(["systemctl", "show", "-p", SHOW_PROPS, ...chunk]), { op: "systemctl show", timeoutMs: COMMAND_TIMEOUT_MS, signal });
      if (r.code !== 0) throw new TransientError(`machine ${machine}: systemctl show failed: ${clip(r.stderr)}`, BACKEND);
      let parsed = parseShowBlocks(r.stdout, chunk);
      if (!parsed) {
        parsed = new Map();
        for (const u of chunk) {
          const one = await m.conn.exec(shJoin(["systemctl", "show", "-p", SHOW_PROPS, u]), { op: "systemctl show", timeoutMs: COMMAND_TIMEOUT_MS, signal });
          if (one.code !== 0) throw new TransientError(`machine ${machine}: systemctl show failed: ${clip(one.stderr)}`, BACKEND);
          parsed.set(u, parseKv(one.stdout));
        }
      }
      for (const [u, s] of parsed) {
        out.set(u, s);
        const usage = this.samples.get(usageKey(m, u));
        if (usage) recordUsage(usage, s);
      }
    }
    return out;
  }
}
