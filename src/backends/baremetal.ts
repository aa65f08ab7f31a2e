/**
 * Bare metal over SSH: operator-owned machines run grants as systemd transient services
 * (mode = "systemd", bundle images) or as libvirt guests, Intel TDX trust domains included
 * (mode = "virsh", qcow2 disk images). Each mode is a driver (baremetal/driver.ts); this class
 * holds what both share and never looks at the mode itself.
 *
 * - One persistent, host-key-pinned SSH connection per machine (baremetal/ssh-pool.ts), opened at
 *   reconcile (daemon start) or on first use; never in the constructor.
 * - Placement is exact: the bridge tracks CPU/RAM allocated per machine and picks the first
 *   machine in config order that fits (region, TDX, image format, free capacity, reachable), at
 *   canSatisfy time and again at provision time, so a grant never oversubscribes a machine.
 * - The unit / domain name `cb-<request_id>` is the idempotency key: provision adopts what exists,
 *   terminate finds it by request_id alone, reconcile re-attaches live grants and removes the rest.
 * - Workloads never live in an SSH channel: watches poll `systemctl show` / `virsh domstats`, one
 *   batched command per machine per interval (common/batch-watcher.ts).
 * - Remote commands are constant scripts whose every argument is quoted with shq (baremetal/scripts.ts).
 */
import path from "node:path";
import type { BareMetalConfig } from "../config/schema.js";
import type { Capabilities, ComputeGrant, Envelope, ExitObservation, ProvisionedInstance } from "../domain/index.js";
import { SshPublicKey } from "../domain/grant.js";
import { abortError, type Clock } from "../util/clock.js";
import type { Logger } from "../util/logger.js";
import {
  BackendError,
  CapacityError,
  InvalidRequestError,
  NotFoundError,
  TransientError,
  type BackendContext,
  type BackendMetrics,
  type CheckResult,
  type Held,
  type ManagedBackend,
  type Satisfaction,
  NOTHING_HELD,
} from "./backend.js";
import { tryRecordOrphan } from "./common/orphan-log.js";
import {
  BACKEND,
  COMMAND_TIMEOUT_MS,
  execError,
  isRequestId,
  marker,
  TERMINATE_TIMEOUT_MS,
  usageFigures,
  type Allocation,
  type BaremetalDriver,
  type DriverContext,
  type Machine,
} from "./baremetal/driver.js";
import { DOCTOR, EXIT, IMAGE_GC, remote } from "./baremetal/scripts.js";
import { clip, SshConnection, type ExecResult, type PoolOptions } from "./baremetal/ssh-pool.js";
import { num } from "./baremetal/systemd.js";
import { SystemdDriver } from "./baremetal/systemd-driver.js";
import { VirshDriver } from "./baremetal/virsh-driver.js";

export interface BareMetalBackendOptions {
  /** First reconnect delay after a drop, and the backoff cap (defaults 500 ms and 30 s). */
  reconnectBaseMs?: number;
  reconnectCapMs?: number;
  /** Cached images unused for this long (and referenced by no run) are removed at reconcile. Default 60. */
  imageCacheTtlMinutes?: number;
  random?: () => number;
}

export class BareMetalBackend implements ManagedBackend {
  readonly name = BACKEND;
  private readonly machines: Machine[] = [];
  private readonly byName = new Map<string, Machine>();
  private readonly allocs = new Map<string, Allocation>();
  /** One driver per mode; each machine uses the one its `mode` names. */
  private readonly drivers: readonly BaremetalDriver[];
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly metrics: BackendMetrics | undefined;
  private readonly stateDir: string;
  private closed = false;

  constructor(
    private readonly cfg: BareMetalConfig,
    ctx: BackendContext,
    private readonly opts: BareMetalBackendOptions = {},
  ) {
    this.log = ctx.log.child({ backend: BACKEND });
    this.clock = ctx.clock;
    this.metrics = ctx.metrics;
    this.stateDir = ctx.stateDir;
    const pool: PoolOptions = {
      backend: BACKEND,
      keepaliveIntervalMs: cfg.keepalive_interval_ms,
      keepaliveCountMax: cfg.keepalive_count_max,
      connectTimeoutMs: cfg.connect_timeout_ms,
      maxChannels: cfg.max_channels_per_machine,
      reconnectBaseMs: opts.reconnectBaseMs ?? 500,
      reconnectCapMs: opts.reconnectCapMs ?? 30_000,
      connectWaitMs: Math.max(2 * cfg.connect_timeout_ms, 5_000),
      clock: this.clock,
      log: this.log,
      ...(this.metrics ? { metrics: this.metrics } : {}),
      ...(opts.random ? { random: opts.random } : {}),
    };
    const driverCtx: DriverContext = {
      cfg,
      providerId: ctx.providerId,
      clock: this.clock,
      almanac: ctx.almanac,
      log: this.log,
      machine: (name) => this.byName.get(name)!,
    };
    const drivers = { systemd: new SystemdDriver(driverCtx), virsh: new VirshDriver(driverCtx) };
    this.drivers = Object.values(drivers);
    for (const m of cfg.machines) {
      const work = m.work_dir.replace(/\/+$/, "") || "/";
      const conn = new SshConnection(
        { name: m.name, host: m.host, port: m.port, user: m.user, privateKeyPath: path.resolve(ctx.configDir, m.private_key_file), hostKeySha256: m.host_key_sha256 },
        pool,
      );
      const machine: Machine = { cfg: m, conn, runs: `${work === "/" ? "" : work}/runs`, images: `${work === "/" ? "" : work}/images`, driver: drivers[m.mode] };
      this.machines.push(machine);
      this.byName.set(m.name, machine);
    }
  }

  /** The driver that runs images of this format (the schema allows only formats some driver runs). */
  private driverFor(format: Envelope["image"]["format"]): BaremetalDriver {
    const d = this.drivers.find((x) => x.imageFormat === format);
    if (!d) throw new InvalidRequestError(`bare-metal machines cannot run "${format}" images`, BACKEND);
    return d;
  }

  // ---- declared capacity and placement --------------------------------------------------------

  capabilities(): Capabilities {
    return {
      regions: [...new Set(this.cfg.machines.map((m) => m.region))].sort(),
      tdx_capable: this.cfg.machines.some((m) => m.tdx_capable),
      max_cpu_millicores: this.cfg.machines.reduce((s, m) => s + m.cpu_millicores, 0),
      max_ram_mib: this.cfg.machines.reduce((s, m) => s + m.ram_mib, 0),
    };
  }

  canSatisfy(grant: ComputeGrant, held: Held = NOTHING_HELD, envelope?: Envelope): Satisfaction {
    const inRegion = this.machines.filter((m) => m.cfg.region === grant.region);
    if (inRegion.length === 0) return { ok: false, code: "region_not_served", message: `no bare-metal machine in region ${grant.region}` };
    const kind = grant.tdx_required ? inRegion.filter((m) => m.cfg.tdx_capable && m.driver.runsTdx) : inRegion;
    if (kind.length === 0) return { ok: false, code: "tdx_not_supported", message: `no TDX-capable bare-metal machine in region ${grant.region}` };
    // The image format decides the driver (disk: virsh guests; bundle: systemd units).
    const wanted = envelope ? this.driverFor(envelope.image.format) : null;
    const able = wanted ? kind.filter((m) => m.driver === wanted) : kind;
    if (able.length === 0)
      return { ok: false, code: "image_format_not_supported", message: `no ${wanted!.mode}-mode machine in region ${grant.region} can run a ${envelope!.image.format} image${grant.tdx_required ? " for a TDX grant" : ""}` };
    const big = able.filter((m) => grant.cpu_millicores <= m.cfg.cpu_millicores && grant.ram_mib <= m.cfg.ram_mib);
    if (big.length === 0) {
      const max = able.reduce((a, m) => (m.cfg.cpu_millicores > a.cfg.cpu_millicores ? m : a));
      return { ok: false, code: "too_large", message: `grant needs ${grant.cpu_millicores}m CPU / ${grant.ram_mib} MiB; the largest machine offers ${max.cfg.cpu_millicores}m / ${max.cfg.ram_mib} MiB` };
    }
    // Exact placement against what every machine already holds: the first in config order that fits.
    const fits = (x: Machine) => {
      const h = held.at(x.cfg.name);
      return h.cpu_millicores + grant.cpu_millicores <= x.cfg.cpu_millicores && h.ram_mib + grant.ram_mib <= x.cfg.ram_mib;
    };
    const roomy = big.filter(fits);
    if (roomy.length === 0) return { ok: false, code: "at_capacity", message: `every machine that could take it is fully reserved (${big.map((x) => x.cfg.name).join(", ")})` };
    const m = roomy.find((x) => x.conn.usable);
    if (!m) return { ok: false, code: "backend_unavailable", message: `every machine with room for it is down: ${roomy.map((x) => `${x.cfg.name} (${x.conn.reason || x.conn.state})`).join(", ")}` };
    return { ok: true, placement: m.cfg.name };
  }

  private allocated(m: Machine): { cpu: number; ram: number; grants: number } {
    let cpu = 0;
    let ram = 0;
    let grants = 0;
    for (const a of this.allocs.values()) {
      if (a.machine !== m.cfg.name) continue;
      cpu += a.cpu;
      ram += a.ram;
      grants++;
    }
    return { cpu, ram, grants };
  }

  private fits(m: Machine, grant: ComputeGrant): boolean {
    const a = this.allocated(m);
    return a.cpu + grant.cpu_millicores <= m.cfg.cpu_millicores && a.ram + grant.ram_mib <= m.cfg.ram_mib;
  }

  /**
   * The machine the grant runs on: where its capacity was reserved at accept (`placement`), or,
   * called without one, the first machine that fits what this backend has started.
   */
  private reserve(grant: ComputeGrant, envelope: Envelope, placement?: string): Machine {
    const id = grant.request_id;
    const existing = this.allocs.get(id);
    if (existing) {
      const m = this.byName.get(existing.machine);
      if (m && (existing.started || m.conn.usable)) {
        existing.cpu = grant.cpu_millicores;
        existing.ram = grant.ram_mib;
        return m;
      }
      this.allocs.delete(id);
    }
    const wanted = this.driverFor(envelope.image.format);
    const what = `${grant.tdx_required ? "a TDX grant" : "a grant"} with a ${envelope.image.format} image in region ${grant.region}`;
    const kind = this.machines.filter((m) => m.cfg.region === grant.region && m.driver === wanted && (!grant.tdx_required || m.cfg.tdx_capable));
    const capacity = (msg: string) => new CapacityError(msg, BACKEND).withOffering(grant.region, BACKEND);
    if (kind.length === 0)
      throw capacity(`no ${wanted.mode}-mode machine can run ${what}${grant.tdx_required && !wanted.runsTdx ? " (TDX grants need a disk image and a virsh machine)" : ""}`);
    const up = kind.filter((m) => m.conn.usable);
    if (up.length === 0) throw capacity(`every machine that could run ${what} is down: ${kind.map((m) => m.cfg.name).join(", ")}`);
    if (placement !== undefined) {
      const placed = kind.find((x) => x.cfg.name === placement);
      if (!placed) throw capacity(`machine ${placement}, reserved for the grant, can no longer run ${what}`);
      if (!placed.conn.usable) throw capacity(`machine ${placement}, reserved for the grant, is down (${placed.conn.reason || placed.conn.state})`);
      this.allocs.set(id, { machine: placed.cfg.name, cpu: grant.cpu_millicores, ram: grant.ram_mib, started: false });
      return placed;
    }
    const m = up.find((x) => this.fits(x, grant));
    if (!m) throw capacity(`no reachable machine has ${grant.cpu_millicores}m CPU / ${grant.ram_mib} MiB free for ${what}`);
    this.allocs.set(id, { machine: m.cfg.name, cpu: grant.cpu_millicores, ram: grant.ram_mib, started: false });
    return m;
  }

  private release(id: string): void {
    this.allocs.delete(id);
  }

  // ---- provision ------------------------------------------------------------------------------

  async provision(grant: ComputeGrant, envelope: Envelope, signal: AbortSignal, placement?: string): Promise<ProvisionedInstance> {
    this.assertOpen();
    const id = checkRequestId(grant.request_id);
    const sha = envelope.image.sha256.toLowerCase();
    if (!/^[0-9a-f]{64}$/.test(sha)) throw new InvalidRequestError("image.sha256 must be 64 hex characters", BACKEND);
    const url = imageUrl(envelope.image.url);
    if (envelope.ssh_public_key !== undefined && !SshPublicKey.safeParse(envelope.ssh_public_key).success)
      throw new InvalidRequestError("ssh_public_key must be a single OpenSSH public key line", BACKEND);
    const m = this.reserve(grant, envelope, placement);
    const alloc = this.allocs.get(id)!;
    try {
      return await m.driver.provision(m, { grant, envelope, sha, url, alloc, signal });
    } catch (e) {
      // Nothing can be running: give the capacity back (terminate would as well).
      if (!alloc.started && !(e instanceof TransientError) && this.allocs.get(id) === alloc) this.release(id);
      throw e;
    }
  }

  // ---- watch ----------------------------------------------------------------------------------

  async watchUntilExit(instance: ProvisionedInstance, validTo: Date, signal: AbortSignal): Promise<ExitObservation> {
    this.assertOpen();
    const id = checkRequestId(instance.request_id);
    const m = this.machineOf(instance);
    if (!m) throw new NotFoundError(`grant ${id} has no known machine (it was never provisioned here)`, BACKEND);
    const a = this.allocs.get(id);
    if (!a) this.allocs.set(id, { machine: m.cfg.name, cpu: instance.cpu_millicores, ram: instance.ram_mib, started: true });
    else if (a.machine === m.cfg.name) Object.assign(a, { cpu: instance.cpu_millicores, ram: instance.ram_mib, started: true });
    const validToMs = validTo.getTime();
    const late = validToMs <= this.clock.now();
    if (late) {
      // Resumed after valid_to: report a recorded end if there is one rather than "expired".
      const ended = await m.driver.endedNow(m, id, signal).catch((e: unknown) => {
        if (signal.aborted) throw abortError(signal);
        this.log.warn({ request_id: id, machine: m.cfg.name, err: { message: (e as Error).message } }, "could not read the final state after valid_to");
        return false;
      });
      if (!ended) return this.expiredObservation(m, id);
    }
    const expired = new AbortController();
    const timer = new AbortController();
    if (!late)
      void this.clock.sleep(Math.max(0, validToMs - this.clock.now()), timer.signal).then(
        () => expired.abort(),
        () => undefined,
      );
    const both = AbortSignal.any([signal, expired.signal]);
    try {
      return await m.driver.watch(m, id, validToMs, both, signal);
    } catch (e) {
      if (signal.aborted) throw abortError(signal);
      if (expired.signal.aborted) return this.expiredObservation(m, id);
      throw e;
    } finally {
      timer.abort();
    }
  }

  private expiredObservation(m: Machine, id: string): ExitObservation {
    return {
      kind: "expired",
      exit_code: null,
      ...usageFigures(m.driver.usage(m, id)),
      ended_at: new Date(this.clock.now()).toISOString(),
      failure: null,
    };
  }


  // ---- terminate ------------------------------------------------------------------------------

  async terminate(instance: ProvisionedInstance): Promise<void> {
    this.assertOpen();
    const id = checkRequestId(instance.request_id);
    const named = instance.details?.machine;
    const located = named ?? this.allocs.get(id)?.machine;
    if (located !== undefined) {
      const m = this.byName.get(located);
      if (!m) throw new BackendError(`grant ${id} ran on machine "${located}", which is no longer configured; re-add it to finish the grant`, BACKEND);
      await this.terminateOn(m, id);
      this.release(id);
      return;
    }
    // Known by request_id only (a placeholder after a failed create or a restart): every reachable
    // machine. One that is down now is swept by reconcile when it comes back (no live grant).
    const reachable = this.machines.filter((m) => m.conn.state === "up" || m.conn.state === "idle");
    const results = await Promise.allSettled(reachable.map((m) => this.terminateOn(m, id)));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed) throw failed.reason;
    this.release(id);
  }

  private async terminateOn(m: Machine, id: string): Promise<void> {
    let r: ExecResult;
    try {
      r = await m.conn.exec(m.driver.terminateCommand(m, id), { op: "terminate", timeoutMs: TERMINATE_TIMEOUT_MS, idempotent: true });
    } catch (e) {
      throw execError(e, m, "terminate");
    }
    if (r.code !== 0 || !marker(r.stdout, /^CB-TERMINATED$/)) {
      const msg = clip(r.stderr) || `exit ${r.code ?? r.signal}`;
      if (r.code === EXIT.locked || r.code === EXIT.tool) throw new TransientError(`machine ${m.cfg.name}: terminate of ${id}: ${msg}`, BACKEND);
      throw new BackendError(`machine ${m.cfg.name}: terminate of ${id} failed: ${msg}`, BACKEND);
    }
    m.driver.forget(m, id);
  }

  // ---- reconcile ------------------------------------------------------------------------------

  /**
   * Connect every machine, list its cb-* units / domains and run directories, re-attach the live
   * grants (their capacity counts again at once) and stop and remove everything else. A grant
   * this process is provisioning right now is never swept. Down machines are skipped (they are
   * swept when they come back); a refused machine's host key is checked again.
   */
  async reconcile(live: ReadonlySet<string>): Promise<void> {
    this.assertOpen();
    const errors: string[] = [];
    await Promise.all(
      this.machines.map(async (m) => {
        await m.conn.probe(m.conn.state === "refused");
        if (m.conn.state !== "up") return;
        try {
          await this.reconcileMachine(m, live);
        } catch (e) {
          errors.push(`${m.cfg.name}: ${(e as Error).message}`);
        }
      }),
    );
    if (errors.length) throw new BackendError(`reconcile failed on ${errors.join("; ")}`, BACKEND);
  }

  private async reconcileMachine(m: Machine, live: ReadonlySet<string>): Promise<void> {
    const work = m.runs.replace(/\/runs$/, "") || "/";
    const r = await m.conn.exec(m.driver.listCommand(m, work), { op: "list", timeoutMs: COMMAND_TIMEOUT_MS, idempotent: true });
    if (r.code !== 0) throw new TransientError(`listing failed: ${clip(r.stderr)}`, BACKEND);
    const found = new Map<string, { workload: boolean; run: boolean; cpu: number; ram: number }>();
    const entry = (id: string) => {
      let e = found.get(id);
      if (!e) found.set(id, (e = { workload: false, run: false, cpu: 0, ram: 0 }));
      return e;
    };
    for (const line of r.stdout.split("\n")) {
      const fields = line.trim().split(/\s+/);
      const [kind, name, a, b] = fields;
      if (!kind || !name) continue;
      const workload = m.driver.listedWorkload(fields);
      if (workload) {
        entry(workload).workload = true;
      } else if ((kind === "run" || kind === "lock") && isRequestId(name)) {
        const e = entry(name);
        if (kind === "run") {
          e.run = true;
          e.cpu = num(a) ?? 0;
          e.ram = num(b) ?? 0;
        }
      }
    }
    for (const [id, e] of found) {
      const a = this.allocs.get(id);
      if (live.has(id)) {
        if (!e.workload && !e.run) continue;
        if (!a) {
          this.allocs.set(id, { machine: m.cfg.name, cpu: e.cpu, ram: e.ram, started: true });
          this.log.info({ request_id: id, machine: m.cfg.name }, "re-attached a live grant's workload");
          continue;
        }
        if (a.machine === m.cfg.name || !a.started) {
          if (a.machine !== m.cfg.name) Object.assign(a, { machine: m.cfg.name, started: true });
          continue;
        }
        // A second copy on another machine (placed while this one was unreachable): keep the tracked one.
        this.log.error({ request_id: id, machine: m.cfg.name, tracked_on: a.machine }, "a live grant also has a workload on another machine: removing the duplicate");
        await this.sweep(m, id, e.workload ? "duplicate" : "run_dir");
        continue;
      }
      if (a) continue; // provisioning or terminating in this process right now
      const kind = m.driver.workloadKind;
      if (e.workload && !tryRecordOrphan(this.stateDir, this.clock.now(), { backend: BACKEND, request_id: id, reason: `a ${kind} is running for a request_id the bridge has no live grant for`, stopped: { machine: m.cfg.name, [kind]: m.driver.workloadName(id) } }, this.log)) continue;
      this.log.warn({ request_id: id, machine: m.cfg.name }, e.workload ? "stopping an orphaned workload (no live grant)" : "removing leftovers of a finished grant");
      await this.sweep(m, id, e.workload ? kind : "run_dir");
    }
    try {
      await m.conn.exec(remote(IMAGE_GC, "cb-image-gc", [work, String(this.opts.imageCacheTtlMinutes ?? 60)]), { op: "image gc", timeoutMs: COMMAND_TIMEOUT_MS, idempotent: true });
    } catch (e) {
      this.log.warn({ machine: m.cfg.name, err: { message: (e as Error).message } }, "image cache cleanup failed");
    }
  }

  private async sweep(m: Machine, id: string, kind: string): Promise<void> {
    try {
      await this.terminateOn(m, id);
      this.metrics?.orphanSwept(BACKEND, kind);
    } catch (e) {
      this.log.warn({ request_id: id, machine: m.cfg.name, err: { message: (e as Error).message } }, "could not remove an orphan; retrying at the next reconcile");
    }
  }

  // ---- status, doctor, close ------------------------------------------------------------------

  /** For the card: per machine its state and allocation; no addresses or remote messages. */
  status(): Record<string, unknown> {
    const machines: Record<string, unknown> = {};
    for (const m of this.machines) {
      const a = this.allocated(m);
      machines[m.cfg.name] = {
        mode: m.driver.mode,
        region: m.cfg.region,
        tdx_capable: m.cfg.tdx_capable,
        state: m.conn.publicState,
        ...(m.conn.publicState === "down" || m.conn.publicState === "refused" ? { reason: m.conn.reason || "unreachable" } : {}),
        allocated_cpu_millicores: a.cpu,
        allocated_ram_mib: a.ram,
        grants: a.grants,
      };
    }
    return { machines, machines_down: this.machines.filter((m) => m.conn.publicState === "down" || m.conn.publicState === "refused").map((m) => m.cfg.name) };
  }

  /** Counters for tests and benchmarks (not on the card): connection details per machine. */
  stats(): Record<string, { state: string; last_error: string | null; channels_in_use: number; channels_peak: number; channel_limit: number; queued: number }> {
    const out: ReturnType<BareMetalBackend["stats"]> = {};
    for (const m of this.machines)
      out[m.cfg.name] = { state: m.conn.state, last_error: m.conn.lastError, channels_in_use: m.conn.channelsInUse, channels_peak: m.conn.peakChannels, channel_limit: m.conn.channelLimit, queued: m.conn.queued };
    return out;
  }

  /** `compute-bridge doctor`: a separate connection per machine, read-only commands only. */
  async check(): Promise<CheckResult[]> {
    const per = await Promise.all(
      this.machines.map(async (m): Promise<CheckResult[]> => {
        const conn = new SshConnection(m.conn.target, {
          backend: BACKEND,
          keepaliveIntervalMs: this.cfg.keepalive_interval_ms,
          keepaliveCountMax: this.cfg.keepalive_count_max,
          connectTimeoutMs: this.cfg.connect_timeout_ms,
          maxChannels: 1,
          reconnectBaseMs: 3_600_000,
          reconnectCapMs: 3_600_000,
          connectWaitMs: this.cfg.connect_timeout_ms,
          clock: this.clock,
          log: this.log,
        });
        const out: CheckResult[] = [];
        try {
          await conn.probe();
          const target = `${m.cfg.user}@${m.cfg.host}:${m.cfg.port}`;
          if (conn.state !== "up") {
            out.push({ check: `${m.cfg.name}: ssh`, ok: false, detail: `${target}: ${conn.lastError ?? "not connected"}` });
            return out;
          }
          out.push({ check: `${m.cfg.name}: ssh`, ok: true, detail: `${target}, host key ${m.cfg.host_key_sha256} matches` });
          const r = await conn.exec(remote(DOCTOR, "cb-doctor", [m.driver.mode, m.cfg.libvirt_uri, m.runs.replace(/\/runs$/, "") || "/", m.cfg.tdx_capable ? (m.cfg.ovmf_path ?? "") : "", m.cfg.run_as ?? "", m.cfg.tdx_capable ? "1" : ""]), { op: "doctor", timeoutMs: COMMAND_TIMEOUT_MS });
          for (const line of r.stdout.split("\n")) {
            const [res, check, detail] = line.split("\t");
            if ((res === "ok" || res === "fail") && check) out.push({ check: `${m.cfg.name}: ${check}`, ok: res === "ok", detail: detail ?? "" });
          }
          if (r.code !== 0) out.push({ check: `${m.cfg.name}: checks ran`, ok: false, detail: clip(r.stderr) || `exit ${r.code}` });
        } catch (e) {
          out.push({ check: `${m.cfg.name}: checks ran`, ok: false, detail: (e as Error).message });
        } finally {
          await conn.close();
        }
        return out;
      }),
    );
    return per.flat();
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const d of this.drivers) d.close();
    await Promise.allSettled(this.machines.map((m) => m.conn.close()));
  }

  // ---- helpers --------------------------------------------------------------------------------

  private assertOpen(): void {
    if (this.closed) throw new BackendError("the bare-metal backend is closed", BACKEND);
  }

  private machineOf(instance: ProvisionedInstance): Machine | undefined {
    const named = instance.details?.machine;
    if (named !== undefined) return this.byName.get(named);
    const a = this.allocs.get(instance.request_id);
    return a ? this.byName.get(a.machine) : undefined;
  }
}


/** The schema validates request ids; this backend re-checks before a name reaches a machine. */
function checkRequestId(id: string): string {
  if (!isRequestId(id)) throw new InvalidRequestError(`request_id ${JSON.stringify(String(id).slice(0, 80))} is not 1-64 characters of A-Z a-z 0-9 . _ -`, BACKEND);
  return id;
}

/** http(s) only (a file:// URL would read the machine's own files), WHATWG-normalized. */
function imageUrl(url: string): string {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new InvalidRequestError("image.url is not a URL", BACKEND);
  }
  if (u.protocol !== "http:" && u.protocol !== "https:") throw new InvalidRequestError(`machines fetch images over http(s) only; ${u.protocol} URLs are refused`, BACKEND);
  if (u.href.includes("\0") || u.href.length > 4096) throw new InvalidRequestError("image.url is not acceptable", BACKEND);
  return u.href;
}
