/**
 * Bare metal over SSH: operator-owned machines run grants as systemd transient services
 * (mode = "systemd", bundle images) or as libvirt guests, Intel TDX trust domains included
 * (mode = "virsh", qcow2 disk images).
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
import type { BareMetalConfig, BareMetalMachine } from "../config/schema.js";
import type { Almanac, Capabilities, ComputeGrant, Envelope, ExitObservation, ProvisionedInstance } from "../domain/index.js";
import { RequestId, SshPublicKey } from "../domain/grant.js";
import { abortError, type Clock } from "../util/clock.js";
import type { Logger } from "../util/logger.js";
import { shJoin } from "../util/shell.js";
import {
  BackendError,
  CapacityError,
  ImageVerificationError,
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
import { BatchWatcher } from "./common/batch-watcher.js";
import { tryRecordOrphan } from "./common/orphan-log.js";
import {
  DOCTOR,
  EXIT,
  IMAGE_GC,
  remote,
  SYSTEMD_FINALIZE,
  SYSTEMD_LIST,
  SYSTEMD_PROVISION,
  SYSTEMD_TERMINATE,
  VIRSH_ADDRESS,
  VIRSH_LIST,
  VIRSH_PREPARE,
  VIRSH_START,
  VIRSH_TERMINATE,
} from "./baremetal/scripts.js";
import { clip, SshConnection, type ExecResult, type PoolOptions } from "./baremetal/ssh-pool.js";
import {
  ArgumentError,
  MAX_COMMAND_BYTES,
  num,
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
} from "./baremetal/systemd.js";
import { domainName, domainXml, NO_NETWORK, parseDomifaddr, parseDomstats, qcow2Problem, requestIdOfDomain, SHUTOFF_REASON } from "./baremetal/virsh.js";
import { absentEvidence, evidenceFromConsole } from "../attestation/guest.js";
import type { CollectedEvidence } from "../domain/attestation.js";

const BACKEND = "baremetal";
/** Largest image fetched onto a machine. */
const MAX_BUNDLE_BYTES = 16 * 1024 ** 3;
const MAX_DISK_BYTES = 256 * 1024 ** 3;
/** Bounds on remote commands. */
const FETCH_TIMEOUT_MS = 30 * 60_000;
const COMMAND_TIMEOUT_MS = 60_000;
const TERMINATE_TIMEOUT_MS = 3 * 60_000;
/** SIGTERM-to-SIGKILL grace when a unit is stopped. */
const STOP_TIMEOUT_SEC = 10;
/** Units per `systemctl show` call. */
const SHOW_BATCH = 200;

export interface BareMetalBackendOptions {
  /** First reconnect delay after a drop, and the backoff cap (defaults 500 ms and 30 s). */
  reconnectBaseMs?: number;
  reconnectCapMs?: number;
  /** Cached images unused for this long (and referenced by no run) are removed at reconcile. Default 60. */
  imageCacheTtlMinutes?: number;
  random?: () => number;
}

interface Machine {
  cfg: BareMetalMachine;
  conn: SshConnection;
  runs: string;
  images: string;
}

interface Allocation {
  machine: string;
  cpu: number;
  ram: number;
  /** The start command may have reached the machine: only terminate releases it. */
  started: boolean;
}

type DomStatus = Record<string, string>;

const isRequestId = (s: string) => RequestId.safeParse(s).success;

export class BareMetalBackend implements ManagedBackend {
  readonly name = BACKEND;
  private readonly machines: Machine[] = [];
  private readonly byName = new Map<string, Machine>();
  private readonly allocs = new Map<string, Allocation>();
  private readonly usage = new Map<string, Usage>();
  private readonly units: BatchWatcher<Record<string, string>>;
  private readonly domains: BatchWatcher<DomStatus>;
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly almanac: Almanac;
  private readonly metrics: BackendMetrics | undefined;
  private readonly providerId: string;
  private readonly stateDir: string;
  private closed = false;

  constructor(
    private readonly cfg: BareMetalConfig,
    ctx: BackendContext,
    private readonly opts: BareMetalBackendOptions = {},
  ) {
    this.log = ctx.log.child({ backend: BACKEND });
    this.clock = ctx.clock;
    this.almanac = ctx.almanac;
    this.metrics = ctx.metrics;
    this.providerId = ctx.providerId;
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
    for (const m of cfg.machines) {
      const work = m.work_dir.replace(/\/+$/, "") || "/";
      const conn = new SshConnection(
        { name: m.name, host: m.host, port: m.port, user: m.user, privateKeyPath: path.resolve(ctx.configDir, m.private_key_file), hostKeySha256: m.host_key_sha256 },
        pool,
      );
      const machine: Machine = { cfg: m, conn, runs: `${work === "/" ? "" : work}/runs`, images: `${work === "/" ? "" : work}/images` };
      this.machines.push(machine);
      this.byName.set(m.name, machine);
    }
    const watch = { intervalMs: cfg.poll_interval_ms, clock: this.clock, missingAfter: 3 };
    this.units = new BatchWatcher({ ...watch, describe: (machine, ids, signal) => this.describeUnits(machine, ids, signal) });
    this.domains = new BatchWatcher({ ...watch, describe: (machine, ids, signal) => this.describeDomains(machine, ids, signal) });
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
    const kind = grant.tdx_required ? inRegion.filter((m) => m.cfg.tdx_capable && m.cfg.mode === "virsh") : inRegion;
    if (kind.length === 0) return { ok: false, code: "tdx_not_supported", message: `no TDX-capable bare-metal machine in region ${grant.region}` };
    // The image format decides the mode (disk: virsh guests; bundle: systemd units).
    const mode = envelope ? (envelope.image.format === "disk" ? "virsh" : "systemd") : null;
    const able = mode ? kind.filter((m) => m.cfg.mode === mode) : kind;
    if (able.length === 0)
      return { ok: false, code: "image_format_not_supported", message: `no ${mode}-mode machine in region ${grant.region} can run a ${envelope!.image.format} image${grant.tdx_required ? " for a TDX grant" : ""}` };
    const big = able.filter((m) => grant.cpu_millicores <= m.cfg.cpu_millicores && grant.ram_mib <= m.cfg.ram_mib);
    if (big.length === 0) {
      const max = able.reduce((a, m) => (m.cfg.cpu_millicores > a.cfg.cpu_millicores ? m : a));
      return { ok: false, code: "too_large", message: `grant needs ${grant.cpu_millicores}m CPU / ${grant.ram_mib} MiB; the largest machine offers ${max.cfg.cpu_millicores}m / ${max.cfg.ram_mib} MiB` };
    }
    const up = big.filter((m) => m.conn.usable);
    if (up.length === 0) return { ok: false, code: "backend_unavailable", message: `every machine that could take it is down: ${big.map((m) => `${m.cfg.name} (${m.conn.reason || m.conn.state})`).join(", ")}` };
    // Exact placement against what every machine already holds: the first in config order that fits.
    const m = up.find((x) => {
      const h = held.at(x.cfg.name);
      return h.cpu_millicores + grant.cpu_millicores <= x.cfg.cpu_millicores && h.ram_mib + grant.ram_mib <= x.cfg.ram_mib;
    });
    if (!m) return { ok: false, code: "at_capacity", message: `every reachable machine that could take it is fully reserved (${up.map((x) => x.cfg.name).join(", ")})` };
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
    const mode = envelope.image.format === "disk" ? "virsh" : "systemd";
    const what = `${grant.tdx_required ? "a TDX grant" : "a grant"} with a ${envelope.image.format} image in region ${grant.region}`;
    const kind = this.machines.filter((m) => m.cfg.region === grant.region && m.cfg.mode === mode && (!grant.tdx_required || m.cfg.tdx_capable));
    const capacity = (msg: string) => new CapacityError(msg, BACKEND).withOffering(grant.region, BACKEND);
    if (kind.length === 0)
      throw capacity(`no ${mode}-mode machine can run ${what}${grant.tdx_required && mode === "systemd" ? " (TDX grants need a disk image and a virsh machine)" : ""}`);
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
      return m.cfg.mode === "systemd" ? await this.provisionSystemd(m, grant, envelope, sha, url, alloc, signal) : await this.provisionVirsh(m, grant, envelope, sha, url, alloc, signal);
    } catch (e) {
      // Nothing can be running: give the capacity back (terminate would as well).
      if (!alloc.started && !(e instanceof TransientError) && this.allocs.get(id) === alloc) this.release(id);
      throw e;
    }
  }

  private async provisionSystemd(m: Machine, grant: ComputeGrant, envelope: Envelope, sha: string, url: string, alloc: Allocation, signal: AbortSignal): Promise<ProvisionedInstance> {
    if (envelope.image.format !== "bundle") throw new InvalidRequestError(`systemd-mode machines run "bundle" images; got "${envelope.image.format}"`, BACKEND);
    const id = grant.request_id;
    const unit = unitName(id);
    const runDir = `${m.runs}/${id}`;
    let built: { args: string[]; defaultCommand: boolean };
    try {
      built = systemdRunArgs({ unit, runDir, grant, envelope, runtimeMaxSec: this.secondsLeft(grant), stopTimeoutSec: STOP_TIMEOUT_SEC, runAs: m.cfg.run_as });
    } catch (e) {
      if (e instanceof ArgumentError) throw new InvalidRequestError(e.message, BACKEND);
      throw e;
    }
    const cmd = remote(SYSTEMD_PROVISION, "cb-provision", [m.runs, id, unit, m.images, sha, url, String(MAX_BUNDLE_BYTES), built.defaultCommand ? "1" : "0", `${grant.cpu_millicores} ${grant.ram_mib}`, m.cfg.run_as ?? "", String(this.secondsLeft(grant)), ...built.args]);
    if (Buffer.byteLength(cmd) > MAX_COMMAND_BYTES) throw new InvalidRequestError(`the command line and environment are too large for one SSH command (${Buffer.byteLength(cmd)} bytes; at most ${MAX_COMMAND_BYTES})`, BACKEND);
    alloc.started = true;
    let r: ExecResult;
    try {
      r = await m.conn.exec(cmd, { op: "provision", timeoutMs: FETCH_TIMEOUT_MS, signal, idempotent: true, long: true });
    } catch (e) {
      throw this.execError(e, m, "provision");
    }
    const started = marker(r.stdout, /^CB-(STARTED|ADOPT) ?(\d*)$/);
    if (r.code !== 0 || !started) {
      // Our scripts' own failure codes mean systemd-run did not create the unit.
      if (definitive(r)) alloc.started = false;
      throw this.provisionError(m, r, envelope);
    }
    if (started[1] === "ADOPT") this.log.info({ request_id: id, machine: m.cfg.name, unit }, "adopted the grant's existing unit (idempotent provision)");
    else this.log.info({ request_id: id, machine: m.cfg.name, unit }, "unit started");
    return this.instance(m, grant, started[2], { mode: "systemd", unit, run_dir: runDir });
  }

  private async provisionVirsh(m: Machine, grant: ComputeGrant, envelope: Envelope, sha: string, url: string, alloc: Allocation, signal: AbortSignal): Promise<ProvisionedInstance> {
    if (envelope.image.format !== "disk") throw new InvalidRequestError(`virsh-mode machines boot "disk" images (qcow2); got "${envelope.image.format}"`, BACKEND);
    const id = grant.request_id;
    const dom = domainName(id);
    const runDir = `${m.runs}/${id}`;
    const tdx = grant.tdx_required;
    if (tdx && !m.cfg.ovmf_path) throw new InvalidRequestError(`machine ${m.cfg.name} has no ovmf_path for TDX guests`, BACKEND);
    const uri = m.cfg.libvirt_uri;
    // The host's own deadline for the guest, counted when each command is sent (the download in
    // between may take minutes).
    const secondsLeft = () => String(this.secondsLeft(grant));
    let r: ExecResult;
    try {
      r = await m.conn.exec(remote(VIRSH_PREPARE, "cb-prepare", [uri, dom, m.runs, id, m.images, sha, url, String(MAX_DISK_BYTES), secondsLeft()]), { op: "prepare", timeoutMs: FETCH_TIMEOUT_MS, signal, idempotent: true, long: true });
    } catch (e) {
      throw this.execError(e, m, "prepare");
    }
    if (r.code !== 0) throw this.provisionError(m, r, envelope);
    let startedAt: string | undefined;
    const adopt = /^CB-ADOPT ?(\d*)$/m.exec(r.stdout);
    if (adopt) {
      this.noDeadline(m, id, r.stdout);
      alloc.started = true;
      startedAt = adopt[1];
      this.log.info({ request_id: id, machine: m.cfg.name, domain: dom }, "adopted the grant's existing domain (idempotent provision)");
    } else {
      let image = `${m.images}/${sha}`;
      if (!/^CB-DEFINED$/m.test(r.stdout)) {
        const img = /^CB-IMAGE (\S+)$/m.exec(r.stdout);
        const info = r.stdout.split("\n@@INFO\n")[1];
        if (!img || info === undefined) throw new BackendError(`machine ${m.cfg.name}: unexpected output from the prepare step`, BACKEND);
        const problem = qcow2Problem(info);
        if (problem) throw new InvalidRequestError(`refusing the disk image: ${problem}`, BACKEND);
        image = img[1]!;
      }
      const xml = domainXml({
        name: dom,
        grant,
        providerId: this.providerId,
        runDir,
        network: m.cfg.network,
        virtType: m.cfg.virt_type,
        tdx,
        ...(m.cfg.ovmf_path ? { ovmfPath: m.cfg.ovmf_path } : {}),
        ...(envelope.ssh_public_key ? { sshPublicKey: envelope.ssh_public_key } : {}),
        ...(envelope.attestation_nonce ? { attestationNonce: envelope.attestation_nonce } : {}),
      });
      alloc.started = true;
      try {
        r = await m.conn.exec(remote(VIRSH_START, "cb-start", [uri, dom, m.runs, id, image, `${grant.cpu_millicores} ${grant.ram_mib}`, sha, secondsLeft()]), { op: "start", timeoutMs: 5 * 60_000, stdin: xml, signal, idempotent: true });
      } catch (e) {
        throw this.execError(e, m, "start");
      }
      const started = marker(r.stdout, /^CB-(STARTED|ADOPT) ?(\d*)$/);
      if (r.code !== 0 || !started) {
        if (definitive(r)) alloc.started = false;
        throw this.provisionError(m, r, envelope);
      }
      startedAt = started[2];
      this.log.info({ request_id: id, machine: m.cfg.name, domain: dom, tdx }, started[1] === "ADOPT" ? "adopted the grant's existing domain" : "domain defined and started");
      this.noDeadline(m, id, r.stdout);
    }
    const nonce = tdx ? (envelope.attestation_nonce ?? null) : null;
    const guest = await this.waitGuest(m, id, dom, runDir, nonce, tdx, signal);
    const inst = this.instance(m, grant, startedAt, { mode: "virsh", domain: dom, run_dir: runDir, tdx: tdx ? "yes" : "no" });
    // The host key the TD bound into its quote is the one to pin.
    const hostKey = guest.evidence?.status === "present" ? guest.evidence.binding.host_key_sha256 : null;
    return { ...inst, host: guest.host, ssh_port: guest.host ? 22 : null, ssh_user: guest.host ? "root" : null, host_key_sha256: hostKey, attestation: guest.evidence };
  }

  /**
   * Whole seconds until valid_to by the bridge's clock, never early and at least 1: the host's own
   * deadline for a workload (RuntimeMaxSec= in systemd mode, the cb-deadline unit in virsh mode).
   */
  private secondsLeft(grant: ComputeGrant): number {
    return Math.max(1, Math.ceil((this.almanac.toWallMs(grant.valid_to) - this.clock.now()) / 1000));
  }

  /** The host could not set its own deadline for a guest: the bridge's watch alone enforces valid_to. */
  private noDeadline(m: Machine, id: string, stdout: string): void {
    const why = /^CB-NO-DEADLINE (.*)$/m.exec(stdout)?.[1];
    if (why !== undefined) this.log.warn({ request_id: id, machine: m.cfg.name, err: { message: why } }, "no host-side deadline for the guest (systemd-run failed); valid_to is enforced by the bridge alone");
  }

  /** Poll until the guest has an address (DHCP lease, else the guest agent), and a TD its evidence. */
  private async waitGuest(m: Machine, id: string, dom: string, runDir: string, nonce: string | null, isTd: boolean, signal: AbortSignal): Promise<{ host: string | null; evidence: CollectedEvidence | null }> {
    // Without a nonce the TD was given no attest credential: nothing to wait for.
    const tdx = isTd && nonce !== null;
    const none = (why: string) => (isTd ? absentEvidence("baremetal", nonce, why) : null);
    const poll = this.cfg.poll_interval_ms;
    const deadline = this.clock.now() + this.cfg.ready_timeout_seconds * 1000;
    let host: string | null = null;
    let quoteDeadline = 0;
    for (;;) {
      let r: ExecResult | null = null;
      try {
        r = await m.conn.exec(remote(VIRSH_ADDRESS, "cb-address", [m.cfg.libvirt_uri, dom, runDir, id, tdx ? "1" : "0"]), { op: "domifaddr", timeoutMs: COMMAND_TIMEOUT_MS, signal, idempotent: true });
      } catch (e) {
        if (signal.aborted) throw abortError(signal);
        this.log.warn({ request_id: id, machine: m.cfg.name, err: { message: (e as Error).message } }, "waiting for the guest: query failed; retrying");
      }
      if (r && r.code === 0) {
        const state = /^@@STATE (.*)$/m.exec(r.stdout)?.[1]?.trim() ?? "";
        const addr = r.stdout.split("\n@@ADDR\n")[1]?.split("\n@@QUOTE\n")[0] ?? "";
        const evidence = tdx ? evidenceFromConsole("baremetal", id, nonce!, r.stdout.split("\n@@QUOTE\n")[1] ?? "") : null;
        host = host ?? parseDomifaddr(addr);
        if (evidence) return { host, evidence };
        // Ended already (very short workload, or it failed to boot): the watch reports it.
        if (state === "gone" || /^shut off|^crashed/.test(state)) return { host, evidence: none("the TD stopped before it printed evidence on its serial console") };
        // A guest without a NIC never gets an address: running is as ready as it gets.
        if (host || (m.cfg.network === NO_NETWORK && state.startsWith("running"))) {
          if (!tdx) return { host, evidence: none("no attestation nonce reached the backend") };
          if (quoteDeadline === 0) quoteDeadline = this.clock.now() + Math.min(20_000, 40 * poll);
          if (this.clock.now() >= quoteDeadline) {
            this.log.info({ request_id: id, machine: m.cfg.name }, "the TD printed no evidence on its console; continuing without attestation evidence");
            return { host, evidence: none("the TD printed no evidence on its serial console (does its image run the compute-bridge.attest credential at boot?)") };
          }
        }
      }
      if (this.clock.now() >= deadline) throw new BackendError(`machine ${m.cfg.name}: guest ${dom} got no address within ${this.cfg.ready_timeout_seconds} s`, BACKEND);
      await this.clock.sleep(poll, signal);
    }
  }

  private instance(m: Machine, grant: ComputeGrant, startedSec: string | undefined, details: Record<string, string>): ProvisionedInstance {
    const sec = num(startedSec);
    const name = m.cfg.mode === "systemd" ? unitName(grant.request_id) : domainName(grant.request_id);
    return {
      request_id: grant.request_id,
      backend: BACKEND,
      instance_id: `${m.cfg.name}/${name}`,
      region: m.cfg.region,
      host: null,
      ssh_port: null,
      ssh_user: null,
      host_key_sha256: null,
      started_at: new Date(sec !== null && sec > 0 ? sec * 1000 : this.clock.now()).toISOString(),
      cpu_millicores: grant.cpu_millicores,
      ram_mib: grant.ram_mib,
      details: { machine: m.cfg.name, ...details },
      attestation: null,
    };
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
      const ended = await this.endedNow(m, id, signal).catch((e: unknown) => {
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
      return m.cfg.mode === "systemd" ? await this.watchUnit(m, id, validToMs, both, signal) : await this.watchDomain(m, id, validToMs, both, signal);
    } catch (e) {
      if (signal.aborted) throw abortError(signal);
      if (expired.signal.aborted) return this.expiredObservation(m, id);
      throw e;
    } finally {
      timer.abort();
    }
  }

  private expiredObservation(m: Machine, id: string): ExitObservation {
    const u = this.usage.get(usageKey(m, m.cfg.mode === "systemd" ? unitName(id) : domainName(id)));
    return {
      kind: "expired",
      exit_code: null,
      cpu_seconds: u?.cpuNs != null ? Math.round(u.cpuNs / 1e6) / 1000 : null,
      peak_memory_mib: u?.memBytes != null ? Math.round((u.memBytes / 1048576) * 100) / 100 : null,
      ended_at: new Date(this.clock.now()).toISOString(),
      failure: null,
    };
  }

  /** One direct status read (not batched): has the workload already ended? */
  private async endedNow(m: Machine, id: string, signal: AbortSignal): Promise<boolean> {
    if (m.cfg.mode === "systemd") {
      const unit = unitName(id);
      const s = (await this.describeUnits(m.cfg.name, [unit], signal)).get(unit);
      return s !== undefined && unitEnded(s) && (s.LoadState === "loaded" || s.LoadState === "not-found");
    }
    const dom = domainName(id);
    const s = (await this.describeDomains(m.cfg.name, [dom], signal)).get(dom);
    return s !== undefined && domainEnded(s) && !s.absent;
  }

  private async watchUnit(m: Machine, id: string, validToMs: number, signal: AbortSignal, callerSignal: AbortSignal): Promise<ExitObservation> {
    const unit = unitName(id);
    const key = usageKey(m, unit);
    if (!this.usage.has(key)) this.usage.set(key, { cpuNs: null, memBytes: null });
    const res = await this.units.waitFor(m.cfg.name, unit, { until: unitEnded, signal });
    const status = res.kind === "match" ? res.status : { LoadState: "not-found" };
    // A unit whose command exited 0 stays active (RemainAfterExit=yes): stopping it runs the
    // ExecStopPost recorder (final usage, in the unit's cgroup) and ends any leftover process.
    const stop = status.LoadState === "loaded" && status.ActiveState === "active" && status.SubState === "exited";
    let r: ExecResult;
    try {
      r = await m.conn.exec(remote(SYSTEMD_FINALIZE, "cb-finalize", [unit, `${m.runs}/${id}`, stop ? "1" : "0"]), { op: "finalize", timeoutMs: TERMINATE_TIMEOUT_MS, signal: callerSignal, idempotent: true });
    } catch (e) {
      throw this.execError(e, m, "finalize");
    }
    const obs = systemdObservation({ status, final: parseKv(r.stdout), usage: this.usage.get(key)!, nowMs: this.clock.now(), validToMs, unit, machine: m.cfg.name });
    this.usage.delete(key);
    return obs;
  }

  private async watchDomain(m: Machine, id: string, validToMs: number, signal: AbortSignal, callerSignal: AbortSignal): Promise<ExitObservation> {
    const dom = domainName(id);
    const key = usageKey(m, dom);
    if (!this.usage.has(key)) this.usage.set(key, { cpuNs: null, memBytes: null });
    const res = await this.domains.waitFor(m.cfg.name, dom, { until: domainEnded, signal });
    const s = res.kind === "match" ? res.status : { absent: "1" };
    const u = this.usage.get(key)!;
    let text = "";
    if (!s.absent) {
      try {
        const r = await m.conn.exec(shJoin(["virsh", "-c", m.cfg.libvirt_uri, "domstate", "--reason", dom]), { op: "domstate", timeoutMs: COMMAND_TIMEOUT_MS, signal: callerSignal, idempotent: true });
        text = r.code === 0 ? clip(r.stdout, 80) : "";
      } catch (e) {
        if (callerSignal.aborted) throw abortError(callerSignal);
      }
    }
    this.usage.delete(key);
    const base = {
      cpu_seconds: u.cpuNs !== null ? Math.round(u.cpuNs / 1e6) / 1000 : null,
      peak_memory_mib: u.memBytes !== null ? Math.round((u.memBytes / 1048576) * 100) / 100 : null,
      ended_at: new Date(this.clock.now()).toISOString(),
    };
    if (s.absent) return { kind: "lost", exit_code: null, ...base, ended_at: null, failure: { kind: "lost", message: `domain ${dom} on machine ${m.cfg.name} disappeared (undefined outside compute-bridge)` } };
    const state = num(s["state.state"]);
    const reason = num(s["state.reason"]) ?? 0;
    const shown = text || (state === 5 ? `shut off (${SHUTOFF_REASON[reason] ?? reason})` : `state ${state}`);
    if (state === 5 && reason === 1) return { kind: "exited", exit_code: 0, ...base, failure: null };
    // Destroyed at valid_to: the host's deadline unit (VIRSH_START), while the bridge was away or
    // just before its own watch noticed the time.
    if (state === 5 && reason === 2 && this.clock.now() >= validToMs - 2000) return { kind: "expired", exit_code: null, ...base, failure: null };
    if (state === 5 && reason === 2) return { kind: "lost", exit_code: null, ...base, failure: { kind: "lost", message: `domain ${dom} was destroyed outside compute-bridge (${shown})` } };
    if (state === 6 || (state === 5 && reason === 3)) return { kind: "exited", exit_code: null, ...base, failure: { kind: "guest_crashed", message: `domain ${dom} crashed (${shown})` } };
    return { kind: "exited", exit_code: null, ...base, failure: { kind: "lost", message: `domain ${dom} stopped unexpectedly (${shown})` } };
  }

  /** One `systemctl show` per machine per interval for every unit watched there. */
  private async describeUnits(machine: string, units: readonly string[], signal: AbortSignal): Promise<ReadonlyMap<string, Record<string, string>>> {
    const m = this.byName.get(machine)!;
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
        const key = `${machine}\0${u}`;
        const usage = this.usage.get(key);
        if (usage) recordUsage(usage, s);
      }
    }
    return out;
  }

  /** One `virsh domstats` per machine per interval; a watched domain missing from it is gone. */
  private async describeDomains(machine: string, names: readonly string[], signal: AbortSignal): Promise<ReadonlyMap<string, DomStatus>> {
    const m = this.byName.get(machine)!;
    const r = await m.conn.exec(shJoin(["virsh", "-c", m.cfg.libvirt_uri, "domstats", "--state", "--cpu-total", "--balloon"]), { op: "virsh domstats", timeoutMs: COMMAND_TIMEOUT_MS, signal });
    if (r.code !== 0) throw new TransientError(`machine ${machine}: virsh domstats failed: ${clip(r.stderr)}`, BACKEND);
    const all = parseDomstats(r.stdout);
    const out = new Map<string, DomStatus>();
    for (const n of names) {
      const s = all.get(n);
      if (!s) {
        out.set(n, { absent: "1" });
        continue;
      }
      out.set(n, s);
      const usage = this.usage.get(`${machine}\0${n}`);
      if (usage) {
        const cpu = num(s["cpu.time"]);
        const rssKiB = num(s["balloon.rss"]);
        if (cpu !== null && (usage.cpuNs === null || cpu > usage.cpuNs)) usage.cpuNs = cpu;
        if (rssKiB !== null && (usage.memBytes === null || rssKiB * 1024 > usage.memBytes)) usage.memBytes = rssKiB * 1024;
      }
    }
    return out;
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
    const cmd =
      m.cfg.mode === "systemd"
        ? remote(SYSTEMD_TERMINATE, "cb-terminate", [m.runs, id, unitName(id)])
        : remote(VIRSH_TERMINATE, "cb-terminate", [m.cfg.libvirt_uri, domainName(id), m.runs, id]);
    let r: ExecResult;
    try {
      r = await m.conn.exec(cmd, { op: "terminate", timeoutMs: TERMINATE_TIMEOUT_MS, idempotent: true });
    } catch (e) {
      throw this.execError(e, m, "terminate");
    }
    if (r.code !== 0 || !marker(r.stdout, /^CB-TERMINATED$/)) {
      const msg = clip(r.stderr) || `exit ${r.code ?? r.signal}`;
      if (r.code === EXIT.locked || r.code === EXIT.tool) throw new TransientError(`machine ${m.cfg.name}: terminate of ${id}: ${msg}`, BACKEND);
      throw new BackendError(`machine ${m.cfg.name}: terminate of ${id} failed: ${msg}`, BACKEND);
    }
    this.usage.delete(usageKey(m, unitName(id)));
    this.usage.delete(usageKey(m, domainName(id)));
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
    const cmd = m.cfg.mode === "systemd" ? remote(SYSTEMD_LIST, "cb-list", [work]) : remote(VIRSH_LIST, "cb-list", [m.cfg.libvirt_uri, work]);
    const r = await m.conn.exec(cmd, { op: "list", timeoutMs: COMMAND_TIMEOUT_MS, idempotent: true });
    if (r.code !== 0) throw new TransientError(`listing failed: ${clip(r.stderr)}`, BACKEND);
    const found = new Map<string, { workload: boolean; run: boolean; cpu: number; ram: number }>();
    const entry = (id: string) => {
      let e = found.get(id);
      if (!e) found.set(id, (e = { workload: false, run: false, cpu: 0, ram: 0 }));
      return e;
    };
    for (const line of r.stdout.split("\n")) {
      const [kind, name, a, b] = line.trim().split(/\s+/);
      if (!kind || !name) continue;
      if (kind === "unit") {
        const id = requestIdOfUnit(name, isRequestId);
        if (id && a === "loaded") entry(id).workload = true;
      } else if (kind === "dom") {
        const id = requestIdOfDomain(name, isRequestId);
        if (id) entry(id).workload = true;
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
      const kind = m.cfg.mode === "systemd" ? "unit" : "domain";
      if (e.workload && !tryRecordOrphan(this.stateDir, this.clock.now(), { backend: BACKEND, request_id: id, reason: `a ${kind} is running for a request_id the bridge has no live grant for`, stopped: { machine: m.cfg.name, [kind]: kind === "unit" ? unitName(id) : domainName(id) } }, this.log)) continue;
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
        mode: m.cfg.mode,
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

  /** Operator diagnostics (not on the card): connection details per machine. */
  diagnostics(): Record<string, { state: string; last_error: string | null; channels_in_use: number; channels_peak: number; channel_limit: number; queued: number }> {
    const out: ReturnType<BareMetalBackend["diagnostics"]> = {};
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
          const r = await conn.exec(remote(DOCTOR, "cb-doctor", [m.cfg.mode, m.cfg.libvirt_uri, m.runs.replace(/\/runs$/, "") || "/", m.cfg.tdx_capable ? (m.cfg.ovmf_path ?? "") : "", m.cfg.run_as ?? "", m.cfg.tdx_capable ? "1" : ""]), { op: "doctor", timeoutMs: COMMAND_TIMEOUT_MS });
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
    this.units.close();
    this.domains.close();
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

  private execError(e: unknown, m: Machine, op: string): unknown {
    if (e instanceof BackendError || (e instanceof Error && e.name === "AbortError")) return e;
    return new BackendError(`machine ${m.cfg.name}: ${op} failed: ${(e as Error).message}`, BACKEND, { cause: e });
  }

  /**
   * A typed error for a failed provision step. Remote output is clipped and scrubbed of the
   * envelope's env values and command words (a tool may echo them; they can be tenant secrets).
   */
  private provisionError(m: Machine, r: ExecResult, envelope: Envelope): BackendError {
    const msg = clip(scrub(r.stderr, envelope)) || clip(scrub(r.stdout, envelope)) || `exit ${r.code ?? r.signal}`;
    const on = `machine ${m.cfg.name}: `;
    switch (r.code) {
      case EXIT.mismatch:
        return new ImageVerificationError(msg, BACKEND);
      case EXIT.fetch:
      case EXIT.tool:
      case EXIT.locked:
        return new TransientError(on + msg, BACKEND);
      case EXIT.tooLarge:
      case EXIT.stopOrUnpack:
      case EXIT.notFoundOrUndefine:
      case EXIT.qemuImg:
        return new InvalidRequestError(msg, BACKEND);
      default:
        return new BackendError(on + msg, BACKEND);
    }
  }
}

function scrub(msg: string, envelope: Envelope): string {
  const secrets = [...Object.values(envelope.env ?? {}), ...(envelope.command ?? []).slice(1)]
    .filter((v) => v.length >= 4)
    .sort((a, b) => b.length - a.length);
  let out = msg;
  for (const v of secrets) if (out.includes(v)) out = out.split(v).join("[REDACTED]");
  return out;
}

function domainEnded(s: DomStatus): boolean {
  if (s.absent) return true;
  const st = num(s["state.state"]);
  return st === 5 || st === 6;
}

function usageKey(m: Machine, name: string): string {
  return `${m.cfg.name}\0${name}`;
}

/** The last line of `s` matching `re` (the scripts print their result marker last). */
function marker(s: string, re: RegExp): RegExpExecArray | null {
  let found: RegExpExecArray | null = null;
  for (const line of s.split("\n")) found = re.exec(line.trim()) ?? found;
  return found;
}

/** A failure our script reported itself (before or instead of creating the workload). */
function definitive(r: ExecResult): boolean {
  return r.code !== null && r.code !== 0 && (Object.values(EXIT) as number[]).includes(r.code);
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
