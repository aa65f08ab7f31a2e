/**
 * The one VM backend every cloud shares: it implements the Backend contract once, and each cloud
 * supplies a CloudAdapter (adapter.ts) with its API calls, shapes, errors and naming.
 *
 * - capabilities: the regions, TDX when TDX shapes are configured, and caps of
 *   max_concurrent_instances times the largest shape.
 * - canSatisfy, in this order for every cloud: region_not_served, tdx_not_supported, too_large,
 *   at_capacity (the reservations the Fleet holds), backend_unavailable (credentials refused),
 *   offering_unavailable (every fitting shape recently without capacity).
 * - provision: the boot script is rendered and checked before anything billable exists; the
 *   request's VM from an earlier call is adopted, else every fitting shape (smallest first,
 *   skipping those recently without capacity) is tried at every placement until one is created.
 *   A CapacityError moves to the next placement, then the next shape (the exhausted shape is
 *   marked unavailable); a QuotaError or UnfitError fails over at once. Then, within
 *   launch_timeout_seconds of the start, running (batched polls); then an SSH banner within
 *   ready_timeout_seconds, raced against the guest powering off first; then the host key and,
 *   for TDX grants, the attestation evidence from the serial console.
 * - watchUntilExit: batched polls until the VM stops, raced against valid_to (one direct look at
 *   valid_to); a check of the console every SERIAL_CHECK_INTERVAL_MS for a guest that reported its
 *   exit but did not power off; the exit marker, or `lost` with the cloud's words.
 * - terminate: the adapter's, by instance and by request. reconcile: at most every
 *   reconcile_interval_seconds (a failed sweep runs again on the next call), orphans older than
 *   orphan_grace_seconds (by creation time, else by when the sweep first saw them).
 */
import type { Almanac, Capabilities, ComputeGrant, Envelope, ExitObservation, ProvisionedInstance } from "../../domain/index.js";
import { bootAttestation } from "../../attestation/guest.js";
import { abortError, isAbort, type Clock } from "../../util/clock.js";
import type { Logger } from "../../util/logger.js";
import {
  BackendError,
  CapacityError,
  InvalidRequestError,
  NotFoundError,
  QuotaError,
  TransientError,
  countDecline,
  expiredObservation as expired,
  lostObservation as lost,
  NOTHING_HELD,
  type BackendContext,
  type BackendMetrics,
  type CheckResult,
  type Held,
  type ManagedBackend,
  type Satisfaction,
} from "../backend.js";
import { BatchLookup, BatchWatcher, type PollEvent } from "../common/batch-watcher.js";
import { BootScriptError, parseMarker, renderBootScript, type MarkerResult } from "../common/cloud-init.js";
import { Semaphore } from "../common/semaphore.js";
import { ConsoleUnavailableError, guestEvidence, SshNotReadyError, waitForHostKey, waitForSsh } from "../common/ssh-ready.js";
import type { OfferingCache } from "../offering-cache.js";
import { SkipShapeError, UnfitError, type CloudAdapter, type ConsoleRef, type OwnedResource, type Shape, type VmStatus } from "./adapter.js";

/** Look at the console of a running VM this often: a guest that printed its marker but did not power off. */
const SERIAL_CHECK_INTERVAL_MS = 5 * 60_000;
/** Console reads of a stopped VM that may fail before the watch gives up (the manager retries it). */
const MARKER_READ_ERRORS = 5;

export interface VmBackendOptions {
  /** Poll interval while VMs boot; default min(poll_interval_seconds, 1 s). */
  launchPollMs?: number;
  /** Pause between SSH probes; default the launch poll interval. */
  sshProbeMs?: number;
  /** Concurrent console reads per scope. Default 8. */
  consoleConcurrency?: number;
  /** Polls a just-created VM may be missing from before it counts as gone (eventual consistency). */
  launchMissingAfter?: number;
  /** Observes every batched poll (tests, benchmarks). */
  onPoll?(poller: "launch" | "exit", e: PollEvent): void;
  /** Largest image the guest downloads. */
  maxImageBytes?: number;
}

const isEnded = (s: VmStatus) => s.phase === "stopped" || s.phase === "gone";
const settled = (s: VmStatus) => s.phase !== "starting";

export class CloudVmBackend implements ManagedBackend {
  readonly name: string;
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly almanac: Almanac;
  private readonly unavailable: OfferingCache;
  private readonly metrics: BackendMetrics | undefined;
  private readonly pollMs: number;
  private readonly sshProbeMs: number;
  /** Request ids this backend holds a VM (or a create in flight) for: what the orphan sweep spares. */
  private readonly active = new Set<string>();
  private readonly launchWatcher: BatchWatcher<VmStatus>;
  private readonly exitWatcher: BatchWatcher<VmStatus>;
  private readonly lookups: BatchLookup<VmStatus>;
  private readonly consoleLimits = new Map<string, Semaphore>();
  /** When the sweep first saw an orphan whose age the cloud does not tell. */
  private readonly firstSeen = new Map<string, number>();
  private lastReconcileAt: number | null = null;
  private reconcileError: string | null = null;
  private closed = false;

  constructor(
    private readonly cloud: CloudAdapter,
    ctx: BackendContext,
    private readonly opts: VmBackendOptions = {},
  ) {
    this.name = cloud.name;
    this.log = ctx.log.child({ backend: this.name });
    this.clock = ctx.clock;
    this.almanac = ctx.almanac;
    this.unavailable = ctx.unavailable;
    this.metrics = ctx.metrics;
    this.pollMs = cloud.settings.poll_interval_seconds * 1000;
    const launchMs = opts.launchPollMs ?? Math.min(this.pollMs, 1000);
    this.sshProbeMs = opts.sshProbeMs ?? launchMs;
    this.launchWatcher = new BatchWatcher<VmStatus>({
      describe: (scope, keys, signal) => cloud.describe(scope, keys, signal, "launch"),
      intervalMs: launchMs,
      clock: this.clock,
      missingAfter: opts.launchMissingAfter ?? Math.max(5, Math.ceil(15_000 / launchMs)),
      onPoll: (e) => this.onPoll("launch", e),
    });
    this.exitWatcher = new BatchWatcher<VmStatus>({
      describe: (scope, keys, signal) => cloud.describe(scope, keys, signal, "exit"),
      intervalMs: this.pollMs,
      clock: this.clock,
      onPoll: (e) => this.onPoll("exit", e),
    });
    // "Which VM does this request have?", coalesced per region: a restart asks it for every grant.
    this.lookups = new BatchLookup<VmStatus>(async (region, rids) => {
      const found = await cloud.find(region, rids);
      return new Map([...found].map(([rid, st]) => [rid, [st]]));
    });
  }

  // ---- the contract -----------------------------------------------------------------------------

  capabilities(): Capabilities {
    const all = [...this.cloud.plainShapes, ...this.cloud.tdxShapes];
    const max = this.cloud.settings.max_concurrent_instances;
    return {
      regions: [...this.cloud.regions()].sort(),
      tdx_capable: this.cloud.tdxShapes.length > 0,
      max_cpu_millicores: max * Math.max(0, ...all.map((s) => s.vcpus * 1000)),
      max_ram_mib: max * Math.max(0, ...all.map((s) => s.memory_mib)),
    };
  }

  canSatisfy(grant: ComputeGrant, held: Held = NOTHING_HELD): Satisfaction {
    const regions = this.cloud.regions();
    if (!regions.includes(grant.region)) return { ok: false, code: "region_not_served", message: `${this.name} serves ${[...regions].sort().join(", ")}` };
    if (grant.tdx_required && this.cloud.tdxShapes.length === 0) return { ok: false, code: "tdx_not_supported", message: `${this.name} has no Intel TDX shapes configured` };
    const fitting = this.fitting(grant);
    if (fitting.length === 0) {
      const largest = this.cloud.pool(grant).flat().sort((a, b) => b.vcpus - a.vcpus || b.memory_mib - a.memory_mib)[0];
      return {
        ok: false,
        code: "too_large",
        message: `grant needs ${grant.cpu_millicores}m CPU / ${grant.ram_mib} MiB; the largest ${grant.tdx_required ? "TDX " : ""}shape is ${largest ? `${largest.name} (${largest.vcpus * 1000}m / ${largest.memory_mib} MiB)` : "none"}`,
      };
    }
    const full = countDecline(this.name, held, this.cloud.settings.max_concurrent_instances, "max_concurrent_instances");
    if (full) return full;
    if (this.cloud.credentialProblem() !== null) return { ok: false, code: "backend_unavailable", message: `${this.name} credentials are currently refused; see the bridge log` };
    const first = fitting.find((s) => !this.unavailable.isUnavailable(this.name, grant.region, s.name));
    if (!first) return { ok: false, code: "offering_unavailable", message: `no capacity was reported recently in ${grant.region} for ${fitting.map((s) => s.name).join(", ")}` };
    return { ok: true, shape: first.name };
  }

  async provision(grant: ComputeGrant, envelope: Envelope, signal: AbortSignal): Promise<ProvisionedInstance> {
    const rid = grant.request_id;
    if (!this.cloud.regions().includes(grant.region)) throw new InvalidRequestError(`${this.name} does not serve region ${grant.region}`, this.name);
    if (grant.tdx_required && this.cloud.tdxShapes.length === 0) throw new InvalidRequestError(`${this.name} has no Intel TDX shapes configured`, this.name);
    // An envelope a VM cannot run fails before anything billable exists.
    const script = this.bootScript(grant, envelope);
    this.active.add(rid);
    const deadlineMs = this.clock.now() + this.cloud.settings.launch_timeout_seconds * 1000;
    const log = this.log.child({ request_id: rid });

    const found = await this.lookups.get(grant.region, rid, signal);
    let st: VmStatus;
    if (found[0]) {
      log.info({ instance_id: found[0].id, state: found[0].detail }, "adopting the VM an earlier provision created");
      st = await this.cloud.adopt(found[0], { grant, envelope, script, deadlineMs }, signal);
    } else {
      st = await this.createFitting(grant, envelope, script, deadlineMs, signal, log);
    }
    st = await this.waitStarted(st, deadlineMs, signal);
    if (isEnded(st) || st.phase === "stopping") return this.endedBeforeReady(grant, envelope, st, log, signal);
    const host = st.host;
    if (!host) throw new BackendError(`${this.name} VM ${st.id} in ${grant.region} is running without an address`, this.name);
    const ready = await this.waitSsh(grant, st, host, signal);
    if (ready !== "ssh") return this.endedBeforeReady(grant, envelope, ready, log, signal);
    log.info({ instance_id: st.id, host }, "VM ready (SSH answers)");
    const reader = this.consoleReader(grant, st, signal, true);
    const found2 = await waitForHostKey(reader, rid, { timeoutMs: this.cloud.settings.host_key_timeout_seconds * 1000, intervalMs: this.pollMs, signal, clock: this.clock });
    if (found2.fingerprint === null) log.warn({ instance_id: st.id, reason: found2.missing }, "no SSH host key fingerprint from the guest; host_key_sha256 stays null");
    else log.info({ instance_id: st.id, host_key_sha256: found2.fingerprint }, "the guest reported its SSH host key");
    const attestation = await this.evidence(grant, envelope, st, signal, true);
    return { ...this.provisioned(grant, st, host, found2.fingerprint), ...(attestation ? { attestation } : {}) };
  }

  async watchUntilExit(instance: ProvisionedInstance, validTo: Date, signal: AbortSignal): Promise<ExitObservation> {
    const rid = instance.request_id;
    if (signal.aborted) throw abortError(signal);
    this.active.add(rid);
    let ref = this.cloud.ref(instance);
    if (!ref) {
      const found = (await this.lookups.get(instance.region, rid, signal))[0];
      if (!found) return lost(`the grant's ${this.name} VM does not exist (deleted outside the bridge?)`);
      ref = { scope: found.scope, key: found.key };
    }
    const target = { ...ref, id: instance.instance_id, region: instance.region, requestId: rid };
    for (;;) {
      const now = this.clock.now();
      if (now >= validTo.getTime()) return this.atValidTo(instance, target, signal);
      const sliceEnd = Math.min(validTo.getTime(), now + SERIAL_CHECK_INTERVAL_MS);
      const r = await this.race(signal, (s) => [
        this.exitWatcher.waitFor(ref.scope, ref.key, { until: isEnded, signal: s }),
        this.clock.sleep(sliceEnd - now, s).then(() => "tick" as const),
      ]);
      if (r === "tick") {
        if (this.clock.now() >= validTo.getTime()) return this.atValidTo(instance, target, signal);
        // The guest should have powered off after its marker; look once in a while anyway.
        const m = await this.readConsole(target, signal, false).then(
          (text) => parseMarker(text, rid),
          (e: unknown) => {
            if (isAbort(e, signal)) throw e;
            return null;
          },
        );
        if (m) return this.fromMarker(instance, m, new Date(this.clock.now()).toISOString());
        continue;
      }
      if (r.kind === "missing") return lost(`${this.name} no longer lists VM ${instance.instance_id} (${instance.region})`);
      return this.exitObservation(instance, target, r.status, signal);
    }
  }

  async terminate(instance: ProvisionedInstance): Promise<void> {
    await this.cloud.terminate(instance);
    this.active.delete(instance.request_id);
    this.log.info({ request_id: instance.request_id, instance_id: instance.instance_id || null }, `${this.name} confirmed the VM's deletion`);
  }

  // ---- hooks ------------------------------------------------------------------------------------

  /** Delete what this bridge owns and no live grant does, at most every reconcile_interval_seconds. */
  async reconcile(live: ReadonlySet<string>): Promise<void> {
    const now = this.clock.now();
    if (this.lastReconcileAt !== null && now - this.lastReconcileAt < this.cloud.settings.reconcile_interval_seconds * 1000) return;
    try {
      await this.sweep(live, now);
      this.reconcileError = null;
      this.lastReconcileAt = now;
    } catch (e) {
      // A failed sweep runs again at the next call (e.g. right after credentials are fixed).
      const err = e instanceof BackendError ? e : this.cloud.mapError(e, "the orphan sweep");
      this.reconcileError = err.message;
      this.log.error({ err: { kind: err.kind, message: err.message } }, "the orphan sweep failed; it runs again at the next reconcile");
      throw new BackendError(`${this.name} reconcile failed: ${err.message}`, this.name, { cause: err });
    }
  }

  /** For the (signed) card: stable values only. */
  status(): Record<string, unknown> {
    const failing = [...new Set([...this.launchWatcher.failingScopes(), ...this.exitWatcher.failingScopes()])].sort();
    const cred = this.cloud.credentialProblem();
    return {
      active: this.active.size,
      max_concurrent_instances: this.cloud.settings.max_concurrent_instances,
      ...(failing.length > 0 ? { failing_scopes: failing } : {}),
      ...(cred ? { credentials: "refused" } : {}),
      ...(this.reconcileError ? { reconcile_error: this.reconcileError } : {}),
    };
  }

  /** Counters for metrics, tests and benchmarks: the same for every cloud. */
  stats(): { active: number; booting: number; watched: number; lookups: number; polls: number; poll_errors: number; sdk_loaded: boolean } {
    const launch = this.launchWatcher.stats();
    const exit = this.exitWatcher.stats();
    return {
      active: this.active.size,
      booting: launch.waiters,
      watched: exit.waiters,
      lookups: this.lookups.callCount,
      polls: launch.polls + exit.polls,
      poll_errors: launch.errors + exit.errors,
      sdk_loaded: this.cloud.sdkLoaded(),
    };
  }

  check(): Promise<CheckResult[]> {
    return this.cloud.check();
  }

  async close(): Promise<void> {
    this.closed = true;
    this.launchWatcher.close();
    this.exitWatcher.close();
    await this.cloud.close();
  }

  // ---- provisioning -----------------------------------------------------------------------------

  /** The shapes that fit the grant: by kind in the adapter's order, smallest first within a kind. */
  private fitting(grant: ComputeGrant): Shape[] {
    const fits = (s: Shape) => s.vcpus * 1000 >= grant.cpu_millicores && s.memory_mib >= grant.ram_mib;
    const bySize = (a: Shape, b: Shape) => a.vcpus - b.vcpus || a.memory_mib - b.memory_mib || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
    const seen = new Set<string>();
    return this.cloud
      .pool(grant)
      .flatMap((kind) => kind.filter(fits).sort(bySize))
      .filter((s) => !seen.has(s.name) && (seen.add(s.name), true));
  }

  private bootScript(grant: ComputeGrant, envelope: Envelope): string {
    let script: string;
    try {
      script = renderBootScript({
        requestId: grant.request_id,
        envelope,
        sshUser: this.cloud.sshUser,
        deadlineEpochSeconds: Math.floor(this.almanac.toWallMs(grant.valid_to) / 1000),
        ...(this.cloud.evidence ? { attestation: bootAttestation(grant.tdx_required, envelope.attestation_nonce, this.cloud.evidence.guest) } : {}),
        ...(this.opts.maxImageBytes !== undefined ? { maxImageBytes: this.opts.maxImageBytes } : {}),
      });
    } catch (e) {
      if (e instanceof BootScriptError) throw new InvalidRequestError(`${this.name} cannot run this envelope: ${e.message}`, this.name);
      throw e;
    }
    this.cloud.checkBootScript(script);
    return script;
  }

  /**
   * Every fitting shape (skipping those recently without capacity) at every placement, in order,
   * until one create succeeds. When none does, a CapacityError naming every attempt (with the last
   * offering) lets the Fleet fail over.
   */
  private async createFitting(grant: ComputeGrant, envelope: Envelope, script: string, deadlineMs: number, signal: AbortSignal, log: Logger): Promise<VmStatus> {
    const region = grant.region;
    const fitting = this.fitting(grant);
    if (fitting.length === 0) throw new InvalidRequestError(`no configured ${this.name} shape fits ${grant.cpu_millicores}m CPU / ${grant.ram_mib} MiB`, this.name);
    const reasons: string[] = [];
    let last: CapacityError | undefined;
    for (const shape of fitting) {
      if (this.unavailable.isUnavailable(this.name, region, shape.name)) {
        reasons.push(`${shape.name}: no capacity reported recently`);
        continue;
      }
      const tried: string[] = [];
      let exhausted = false;
      for (const placement of this.cloud.placements(region, shape)) {
        try {
          return await this.cloud.create({ grant, envelope, script, shape, placement, deadlineMs }, signal);
        } catch (e) {
          if (e instanceof QuotaError || e instanceof UnfitError) throw e.offering ? e : e.withOffering(region, shape.name);
          if (e instanceof SkipShapeError) {
            tried.push(`${placement}: ${e.message}`);
            break;
          }
          if (!(e instanceof CapacityError)) throw e;
          last = e;
          exhausted = true;
          tried.push(`${placement}: ${e.message}`);
          log.warn({ placement, shape: shape.name, err: { kind: e.kind, message: e.message } }, `${this.name} could not create the VM here; trying the next placement or shape`);
        }
      }
      if (exhausted) this.unavailable.markUnavailable(this.name, region, shape.name);
      reasons.push(`${shape.name}: ${tried.join(", ")}`);
    }
    const err = new CapacityError(`no fitting ${this.name} shape could be created in ${region} (${reasons.join("; ")})`, this.name, last ? { cause: last } : undefined);
    throw err.withOffering(region, last?.offering?.shape ?? fitting[0]!.name);
  }

  /** Until the VM leaves `starting`, within the launch deadline. */
  private async waitStarted(st: VmStatus, deadlineMs: number, signal: AbortSignal): Promise<VmStatus> {
    if (settled(st)) return st;
    const r = await this.race(signal, (s) => [
      this.launchWatcher.waitFor(st.scope, st.key, { until: settled, signal: s }),
      this.clock.sleep(Math.max(0, deadlineMs - this.clock.now()), s).then(() => "timeout" as const),
    ]);
    const limit = `launch_timeout_seconds (${this.cloud.settings.launch_timeout_seconds} s)`;
    if (r === "timeout") {
      const lastErr = this.launchWatcher.lastError(st.scope);
      const last = this.launchWatcher.lastStatus(st.scope, st.key)?.detail ?? st.detail;
      throw new BackendError(`${this.name} VM ${st.id} was not running within ${limit} (last state: ${last}${lastErr ? `; last poll error: ${this.cloud.mapError(lastErr, "poll").message}` : ""}); it is deleted`, this.name);
    }
    if (r.kind === "missing") throw new BackendError(`${this.name} VM ${st.id} vanished while it was starting`, this.name);
    // The create's status may carry what later polls do not (an address).
    return { ...r.status, host: r.status.host ?? st.host };
  }

  /** An SSH banner, or the VM stopping first (a short workload may be done already). */
  private async waitSsh(grant: ComputeGrant, st: VmStatus, host: string, signal: AbortSignal): Promise<"ssh" | VmStatus> {
    const timeoutMs = this.cloud.settings.ready_timeout_seconds * 1000;
    try {
      const r = await this.race(signal, (s) => [
        waitForSsh(host, this.cloud.settings.ssh_port, { timeoutMs, intervalMs: this.sshProbeMs, signal: s, clock: this.clock }).then(() => "ssh" as const),
        this.launchWatcher.waitFor(st.scope, st.key, { until: (x) => isEnded(x) || x.phase === "stopping", signal: s }),
      ]);
      if (r === "ssh") return r;
      if (r.kind === "missing") throw new BackendError(`${this.name} VM ${st.id} vanished before SSH was ready`, this.name);
      return r.status;
    } catch (e) {
      if (e instanceof SshNotReadyError)
        throw new BackendError(`${this.name} VM ${st.id} in ${grant.region}: ${e.message} (ready_timeout_seconds = ${this.cloud.settings.ready_timeout_seconds}; check that the network allows SSH); it is deleted`, this.name);
      throw e;
    }
  }

  /**
   * The VM stopped before SSH was ready: a guest that ran and powered off is handed on to the watch
   * (its console tells the outcome), without a host key: nobody can connect to it any more.
   */
  private async endedBeforeReady(grant: ComputeGrant, envelope: Envelope, st: VmStatus, log: Logger, signal: AbortSignal): Promise<ProvisionedInstance> {
    if (st.launchCapacity && st.shape) throw new CapacityError(`${this.name} VM ${st.id} in ${grant.region} ended at launch: ${st.detail}`, this.name).withOffering(grant.region, st.shape);
    if (st.phase === "gone" || st.selfStopped === false) throw new BackendError(`${this.name} VM ${st.id} in ${grant.region} is ${st.detail} before it became ready`, this.name);
    log.info({ instance_id: st.id, state: st.detail }, "the VM stopped before SSH was ready; its console tells the outcome");
    const attestation = await this.evidence(grant, envelope, st, signal, false);
    return { ...this.provisioned(grant, st, st.host, null), ...(attestation ? { attestation } : {}) };
  }

  /** TDX evidence after the host key report: waited for while the guest runs, read once after it stopped. */
  private async evidence(grant: ComputeGrant, envelope: Envelope, st: VmStatus, signal: AbortSignal, running: boolean) {
    if (!this.cloud.evidence || !grant.tdx_required) return null;
    return guestEvidence(this.consoleReader(grant, st, signal, true), this.cloud.evidence.platform, grant, envelope, {
      timeoutMs: running ? this.cloud.settings.host_key_timeout_seconds * 1000 : 0,
      intervalMs: this.pollMs,
      signal,
      clock: this.clock,
    });
  }

  private provisioned(grant: ComputeGrant, st: VmStatus, host: string | null, hostKey: string | null): ProvisionedInstance {
    return {
      request_id: grant.request_id,
      backend: this.name,
      instance_id: st.id,
      region: grant.region,
      host,
      ssh_port: host ? this.cloud.settings.ssh_port : null,
      ssh_user: host ? this.cloud.sshUser : null,
      host_key_sha256: hostKey,
      started_at: new Date(st.startedAtMs ?? this.clock.now()).toISOString(),
      cpu_millicores: grant.cpu_millicores,
      ram_mib: grant.ram_mib,
      details: this.cloud.details(grant, st),
    };
  }

  // ---- exit -------------------------------------------------------------------------------------

  /** valid_to: one direct look, in case the workload ended since the last poll. */
  private async atValidTo(instance: ProvisionedInstance, target: Target, signal: AbortSignal): Promise<ExitObservation> {
    const now = await this.cloud.describe(target.scope, [target.key], signal, "exit").then(
      (m) => m.get(target.key),
      (e: unknown) => {
        if (isAbort(e, signal)) throw e;
        return undefined;
      },
    );
    if (now && isEnded(now)) return this.exitObservation(instance, target, now, signal);
    this.log.info({ request_id: instance.request_id, instance_id: instance.instance_id }, "valid_to reached; the VM is still running");
    return expired(this.clock.now());
  }

  private async exitObservation(instance: ProvisionedInstance, target: Target, st: VmStatus, signal: AbortSignal): Promise<ExitObservation> {
    const endedAt = new Date(st.endedAtMs ?? this.clock.now()).toISOString();
    if (st.phase === "gone") return lost(`${this.name} VM ${st.id} is ${st.detail}`, endedAt);
    // The cloud posts console output a while after the VM stopped: keep looking that long.
    const lookUntil = this.clock.now() + this.cloud.markerGraceMs(st);
    let errors = 0;
    for (;;) {
      let text: string | null = null;
      try {
        text = await this.readConsole(target, signal, false);
      } catch (e) {
        if (isAbort(e, signal)) throw e;
        if (e instanceof NotFoundError || e instanceof ConsoleUnavailableError) {
          this.log.warn({ request_id: instance.request_id, instance_id: st.id, reason: e.message }, "the VM's console cannot be read; its exit code is unknown");
          break;
        }
        if (++errors >= MARKER_READ_ERRORS) throw e instanceof BackendError ? e : this.cloud.mapError(e, "reading the serial console");
      }
      if (text !== null) {
        const m = parseMarker(text, instance.request_id);
        if (m) return this.fromMarker(instance, m, endedAt);
      }
      // Only a console read that worked and lacked the marker ends the look: a failed one (a
      // throttled or 5xx read, bounded by MARKER_READ_ERRORS) says nothing about the marker.
      if (text !== null && this.clock.now() >= lookUntil) break;
      await this.clock.sleep(this.pollMs, signal);
    }
    if (st.selfStopped === true) {
      this.log.warn({ request_id: instance.request_id, instance_id: st.id }, "the VM powered off without an exit marker on its console");
      return { kind: "exited", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: endedAt, failure: { kind: "no_exit_marker", message: `${this.name} VM ${st.id} powered itself off without reporting an exit code on its serial console` } };
    }
    this.log.warn({ request_id: instance.request_id, instance_id: st.id, state: st.detail }, "the VM ended without reporting an exit code");
    return lost(`${this.name} VM ${st.id} is ${st.detail} and reported no exit code (host maintenance, a manual stop or a guest crash)`, endedAt);
  }

  private fromMarker(instance: ProvisionedInstance, m: NonNullable<MarkerResult>, endedAt: string): ExitObservation {
    if ("exitCode" in m) {
      this.log.info({ request_id: instance.request_id, instance_id: instance.instance_id, exit_code: m.exitCode }, "workload exited");
      return { kind: "exited", exit_code: m.exitCode, cpu_seconds: m.cpuSeconds, peak_memory_mib: null, ended_at: endedAt, failure: null };
    }
    if (m.failure.kind === "expired") return { kind: "expired", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: endedAt, failure: null };
    this.log.warn({ request_id: instance.request_id, instance_id: instance.instance_id, err: m.failure }, "the guest reported a failure");
    return { kind: "exited", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: endedAt, failure: m.failure };
  }

  // ---- console ----------------------------------------------------------------------------------

  /** One console read, at most `consoleConcurrency` at a time per scope (held only while it runs). */
  private readConsole(target: Target, signal: AbortSignal, live: boolean): Promise<string> {
    let limit = this.consoleLimits.get(target.scope);
    if (!limit) this.consoleLimits.set(target.scope, (limit = new Semaphore(this.opts.consoleConcurrency ?? 8)));
    return limit.run(() => this.cloud.readConsole(target, signal, live), signal);
  }

  private consoleReader(grant: ComputeGrant, st: VmStatus, signal: AbortSignal, live: boolean): () => Promise<string> {
    const target = { scope: st.scope, key: st.key, id: st.id, region: grant.region, requestId: grant.request_id };
    return async () => {
      try {
        return await this.readConsole(target, signal, live);
      } catch (e) {
        // A VM that is gone has no console to come back to.
        if (e instanceof NotFoundError) throw new ConsoleUnavailableError(e.message);
        throw e;
      }
    };
  }

  // ---- reconcile --------------------------------------------------------------------------------

  private async sweep(live: ReadonlySet<string>, now: number): Promise<void> {
    // Live in the store, or held by this backend right now (a grant accepted after the store's
    // snapshot may be launching): never an orphan, whatever orphan_grace_seconds says.
    const owners = new Map<string, string>();
    for (const rid of [...live, ...this.active]) owners.set(this.cloud.ownerKey(rid), rid);
    const graceMs = this.cloud.settings.orphan_grace_seconds * 1000;
    const orphans: OwnedResource[] = [];
    const seen = new Set<string>();
    for (const r of await this.cloud.listOwned()) {
      const owner = r.owner === undefined ? undefined : owners.get(r.owner);
      if (owner !== undefined) {
        this.active.add(owner);
        continue;
      }
      if (r.going) continue;
      const key = resourceKey(r);
      seen.add(key);
      const first = this.firstSeen.get(key) ?? (this.firstSeen.set(key, now), now);
      const age = now - (r.createdMs ?? first);
      if (age < graceMs) continue;
      orphans.push(r);
    }
    for (const k of this.firstSeen.keys()) if (!seen.has(k)) this.firstSeen.delete(k);
    if (orphans.length === 0) return;
    for (const o of orphans)
      this.log.warn(
        { kind: o.kind, scope: o.scope, id: o.id, request_id: o.requestId ?? null, created_at: o.createdMs === null ? null : new Date(o.createdMs).toISOString() },
        "deleting an orphaned resource (this bridge's, no live grant owns it)",
      );
    const { deleted, failures } = await this.cloud.deleteOrphans(orphans);
    for (const o of deleted) {
      this.metrics?.orphanSwept(this.name, o.kind);
      this.firstSeen.delete(resourceKey(o));
    }
    if (failures.length > 0) throw new TransientError(`could not delete ${failures.length} orphaned resource(s): ${failures.slice(0, 3).join("; ")}`, this.name);
  }

  // ---- plumbing ---------------------------------------------------------------------------------

  /** The first of two racers to settle; both racers' signal is aborted afterwards (and with `signal`). */
  private async race<A, B>(signal: AbortSignal, racers: (s: AbortSignal) => [Promise<A>, Promise<B>]): Promise<A | B> {
    if (this.closed) throw new BackendError(`the ${this.name} backend is closed`, this.name);
    if (signal.aborted) throw abortError(signal);
    const ctl = new AbortController();
    const onAbort = () => ctl.abort(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      return await Promise.race(racers(ctl.signal));
    } catch (e) {
      if (signal.aborted) throw abortError(signal);
      throw e;
    } finally {
      signal.removeEventListener("abort", onAbort);
      ctl.abort();
    }
  }

  private onPoll(poller: "launch" | "exit", e: PollEvent): void {
    // First failure, then every tenth: enough to notice, not a flood.
    if (!e.ok && (e.consecutiveErrors === 1 || e.consecutiveErrors % 10 === 0)) {
      const err = e.error instanceof BackendError ? e.error : this.cloud.mapError(e.error, `the ${poller} poll of ${e.scope}`);
      this.log.warn({ scope: e.scope, poller, watched: e.ids, consecutive_errors: e.consecutiveErrors, err: { kind: err.kind, message: err.message } }, "batched status poll failed; retrying at the next interval");
    }
    this.opts.onPoll?.(poller, e);
  }
}

type Target = ConsoleRef;
const resourceKey = (r: OwnedResource) => `${r.kind}/${r.scope}/${r.id}`;
