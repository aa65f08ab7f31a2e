/**
 * Google Compute Engine backend (Intel TDX on C3 machine types).
 *
 * - provision: `instances.insert` with a deterministic instance name and a `requestId` UUID derived
 *   from (provider id, request_id, zone, machine type), so a retried or restarted call replays
 *   the same Operation instead of creating a second VM. The instance carries labels (hashed bridge
 *   id + hashed request id: label values cannot hold every request id) and the exact request id in
 *   metadata, and boots the shared boot script (common/cloud-init.ts) as its `startup-script`.
 *   TDX grants get `confidentialInstanceConfig.confidentialInstanceType = "TDX"` with
 *   `scheduling.onHostMaintenance = "TERMINATE"` on a C3 machine type. The zone Operation is waited
 *   for and its `error` checked (a DONE operation can carry ZONE_RESOURCE_POOL_EXHAUSTED or
 *   QUOTA_EXCEEDED): a stock-out, or a 400 saying the zone does not offer the machine type or
 *   TDX, tries the region's next zone, then the next fitting machine type (the exhausted one is
 *   marked unavailable), each insert with its own requestId derived from (request_id, zone,
 *   machine type); only when none is left does the grant fail over (CapacityError with the
 *   offering); quota fails over at once (QuotaError). The boot disk is `boot_disk_type`
 *   (pd-balanced by default: GCE's own default, pd-standard, is refused by C3). Then the external
 *   IP, an SSH banner and the guest's own report of its SSH host key on serial port 1
 *   (host_key_sha256; null, with a warning, when it does not come within host_key_timeout_seconds).
 * - watch: one `aggregatedList` per project per poll interval (label filter) for every instance
 *   watched, through common/batch-watcher.ts; the exit code comes from the serial console
 *   (`getSerialPortOutput`) once the guest has powered off. valid_to is enforced.
 * - terminate: `instances.delete` (404 = done) of the known instance and of everything labelled
 *   with the request, waiting for the delete Operation; reconcile() sweeps orphans by label.
 *
 * The 6.x client does not retry: every call goes through `call()`, which retries 429/5xx and
 * dropped connections a bounded number of times with backoff (safe: inserts and deletes carry a
 * requestId) and maps errors to the typed BackendErrors with messages free of credentials.
 *
 * The SDK (≈1.7 s to import) and google-auth-library are loaded on first use: capabilities() and
 * canSatisfy() need neither the SDK nor any I/O.
 */
import { readFileSync } from "node:fs";
import path from "node:path";
import type { InstancesClient, ZoneOperationsClient, protos } from "@google-cloud/compute";
import type { GcpConfig } from "../config/schema.js";
import { registerSecret } from "../config/secrets.js";
import type { Almanac, Capabilities, ComputeGrant, Envelope, ExitObservation, ProvisionedInstance } from "../domain/index.js";
import { abortError, backoffMs, type Clock } from "../util/clock.js";
import type { Logger } from "../util/logger.js";
import {
  BackendError,
  CapacityError,
  CredentialError,
  InvalidRequestError,
  NotFoundError,
  QuotaError,
  TransientError,
  type BackendContext,
  type BackendMetrics,
  type CheckResult,
  type ManagedBackend,
  type Satisfaction,
  NOTHING_HELD,
  countDecline,
  type Held,
} from "./backend.js";
import { BatchWatcher, type PollEvent, type WaitResult } from "./common/batch-watcher.js";
import { BootScriptError, parseMarker, renderBootScript } from "./common/cloud-init.js";
import { ConsoleUnavailableError, guestEvidence, SshNotReadyError, waitForHostKey, waitForSsh } from "./common/ssh-ready.js";
import { bootAttestation } from "../attestation/guest.js";
import { AlreadyExistsError, classifyInsertRefusal, ImageUnfitError, mapGcpError, operationError, PermissionDeniedError, PlacementError, redact } from "./gcp/errors.js";
import { deterministicUuid, gceNaming, lastSegment, META_PROVIDER_ID, META_REQUEST_ID, regionOfZone, type GceNaming } from "./gcp/naming.js";
import type { OfferingCache } from "./offering-cache.js";

type IInstance = protos.google.cloud.compute.v1.IInstance;
type IOperation = protos.google.cloud.compute.v1.IOperation;
type MachineShape = GcpConfig["machine_types"][number];
type GaxAuthClient = NonNullable<NonNullable<ConstructorParameters<typeof InstancesClient>[0]>["authClient"]>;

const COMPUTE_SCOPES = ["https://www.googleapis.com/auth/compute"];
/** One API call (connect + answer); zoneOperations.wait blocks up to 2 min on GCE's side. */
const CALL_TIMEOUT_MS = 60_000;
const WAIT_CALL_TIMEOUT_MS = 150_000;
/** How long a delete may take before terminate() reports a (retryable) failure. */
const DELETE_TIMEOUT_MS = 10 * 60_000;
/** Fallback serial check for a guest that printed its marker but did not power off. */
const SERIAL_CHECK_INTERVAL_MS = 5 * 60_000;
/** Serial console bytes kept while reading (the marker is the script's last line). */
const SERIAL_TAIL_BYTES = 256 * 1024;
const SERIAL_MAX_READS = 8;
const SERIAL_PAGE_BYTES = 1024 * 1024;

export interface GcpBackendOptions {
  /**
   * An already-authenticated google-auth-library client (e.g. an `OAuth2Client` holding a static
   * access token). Tests use it so nothing ever talks to Google's OAuth server; production leaves
   * it unset and the backend reads `credentials_file`.
   */
  authClient?: unknown;
  /** Bounded retries of 429/5xx/dropped connections in every API call. */
  retry?: { attempts?: number; baseMs?: number; capMs?: number };
  /** Pause between SSH banner probes (default: the poll interval, at most 5 s). */
  sshProbeIntervalMs?: number;
}

interface Clients {
  instances: InstancesClient;
  operations: ZoneOperationsClient;
}

/** What the backend needs from an Instance resource (list, get and the watcher). */
export interface InstanceView {
  name: string;
  zone: string;
  /** GCE's numeric id, as a string. */
  id: string;
  status: string;
  machineType: string;
  natIP: string | null;
  labels: Record<string, string>;
  /** Exact request id from metadata, when present. */
  requestId: string | null;
  createdMs: number | null;
  lastStartMs: number | null;
  lastStopMs: number | null;
  tdx: boolean;
}

type ViewStatus = "PROVISIONING" | "STAGING" | "RUNNING" | "STOPPING" | "TERMINATED" | "SUSPENDING" | "SUSPENDED" | "REPAIRING" | string;

export class GcpBackend implements ManagedBackend {
  readonly name = "gcp";
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly almanac: Almanac;
  private readonly unavailable: OfferingCache;
  private readonly providerId: string;
  private readonly credentialsPath: string;
  private readonly naming: GceNaming;
  private readonly zonesByRegion = new Map<string, string[]>();
  private readonly pollMs: number;
  private readonly sshProbeMs: number;
  private readonly retry: { attempts: number; baseMs: number; capMs: number };
  /** Request ids this backend holds an instance (or a create in flight) for: the concurrency cap. */
  private readonly active = new Set<string>();
  private readonly watcher: BatchWatcher<InstanceView>;
  private clientsP: Promise<Clients> | null = null;
  private clientsResolved: Clients | null = null;
  /** Set while GCP refuses our credentials; canSatisfy declines new grants meanwhile. */
  private credentialProblem: string | null = null;
  private lastReconcileAt: number | null = null;
  private reconcileError: string | null = null;
  private pollErrors = 0;
  private closed = false;

  private readonly metrics: BackendMetrics | undefined;

  constructor(
    private readonly cfg: GcpConfig,
    ctx: BackendContext,
    private readonly opts: GcpBackendOptions = {},
  ) {
    this.log = ctx.log.child({ backend: this.name });
    this.metrics = ctx.metrics;
    this.clock = ctx.clock;
    this.almanac = ctx.almanac;
    this.unavailable = ctx.unavailable;
    this.providerId = ctx.providerId;
    this.credentialsPath = path.resolve(ctx.configDir, cfg.credentials_file);
    this.naming = gceNaming(cfg.label_prefix, ctx.providerId);
    for (const zone of cfg.zones) {
      const region = regionOfZone(zone);
      const list = this.zonesByRegion.get(region) ?? [];
      if (!list.includes(zone)) list.push(zone);
      this.zonesByRegion.set(region, list);
    }
    this.pollMs = cfg.poll_interval_seconds * 1000;
    this.sshProbeMs = opts.sshProbeIntervalMs ?? Math.min(this.pollMs, 5000);
    this.retry = { attempts: opts.retry?.attempts ?? 5, baseMs: opts.retry?.baseMs ?? 500, capMs: opts.retry?.capMs ?? 20_000 };
    this.watcher = new BatchWatcher<InstanceView>({
      describe: (scope, _ids, signal) => this.describeProject(scope, signal),
      intervalMs: this.pollMs,
      clock: this.clock,
      onPoll: (e) => this.onPoll(e),
    });
  }

  // ---- the contract ---------------------------------------------------------------------------

  capabilities(): Capabilities {
    const all = [...this.cfg.machine_types, ...this.cfg.tdx_machine_types];
    return {
      regions: [...this.zonesByRegion.keys()].sort(),
      tdx_capable: this.cfg.tdx_machine_types.length > 0,
      // Declared caps, the same rule on every cloud: the concurrency cap times the largest shape.
      max_cpu_millicores: this.cfg.max_concurrent_instances * Math.max(0, ...all.map((s) => s.vcpus * 1000)),
      max_ram_mib: this.cfg.max_concurrent_instances * Math.max(0, ...all.map((s) => s.memory_mib)),
    };
  }

  canSatisfy(grant: ComputeGrant, held: Held = NOTHING_HELD): Satisfaction {
    if (!this.zonesByRegion.has(grant.region))
      return { ok: false, code: "region_not_served", message: `gcp serves ${[...this.zonesByRegion.keys()].sort().join(", ")} (zones ${this.cfg.zones.join(", ")})` };
    if (grant.tdx_required && this.cfg.tdx_machine_types.length === 0)
      return { ok: false, code: "tdx_not_supported", message: "gcp has no tdx_machine_types configured" };
    const fits = this.candidates(grant);
    if (fits.length === 0) {
      const pool = this.pool(grant);
      return { ok: false, code: "too_large", message: `grant needs ${grant.cpu_millicores}m CPU / ${grant.ram_mib} MiB; the largest ${grant.tdx_required ? "TDX " : ""}machine type is ${describeLargest(pool)}` };
    }
    const full = countDecline(this.name, held, this.cfg.max_concurrent_instances, "max_concurrent_instances");
    if (full) return full;
    if (this.credentialProblem !== null) return { ok: false, code: "backend_unavailable", message: "gcp credentials are currently refused; see the bridge log" };
    const first = fits.find((s) => !this.unavailable.isUnavailable(this.name, grant.region, s.name));
    if (!first) return { ok: false, code: "offering_unavailable", message: `no capacity recently for ${fits.map((s) => s.name).join(", ")} in ${grant.region}` };
    return { ok: true, shape: first.name };
  }

  async provision(grant: ComputeGrant, envelope: Envelope, signal: AbortSignal): Promise<ProvisionedInstance> {
    const rid = grant.request_id;
    const zones = this.zonesByRegion.get(grant.region);
    if (!zones) throw new InvalidRequestError(`gcp does not serve region ${grant.region}`, this.name);
    if (grant.tdx_required && this.cfg.tdx_machine_types.length === 0) throw new InvalidRequestError("gcp has no tdx_machine_types configured", this.name);
    // An envelope a VM cannot run fails before anything billable exists.
    const script = this.bootScript(grant, envelope);
    this.active.add(rid);
    const deadline = this.clock.now() + this.cfg.launch_timeout_seconds * 1000;
    const log = this.log.child({ request_id: rid });

    let view: InstanceView | null = pickBest(await this.findInstances(rid, signal));
    if (view && isGoing(view.status))
      throw new TransientError(`GCE instance ${view.name} for this grant is ${view.status} (being stopped or deleted); provisioning waits for it to finish`, this.name);
    if (view) {
      // Adopt: re-send the same insert (same requestId) to get its Operation back, so a create that
      // was still in flight when the bridge stopped is awaited and its error checked.
      log.info({ zone: view.zone, instance: view.name, status: view.status }, "adopting the GCE instance an earlier call created");
      view = await this.createIn(grant, envelope, script, view.zone, view.machineType, view.tdx, deadline, signal);
    } else {
      view = await this.createFitting(grant, envelope, script, zones, deadline, signal, log);
    }
    let hostKey: string | null = null;
    if (view.status !== "TERMINATED") {
      const reached = await this.waitReachable(view, deadline, signal);
      view = reached.view;
      // A guest that powered off before sshd answered has no host to connect to: nothing to pin.
      if (reached.sshReady) hostKey = await this.hostKey(rid, view, signal, log);
    }
    // TDX: the guest's evidence follows its host key report (read once if it already stopped).
    const stopped = view.status === "TERMINATED";
    const attestation = await guestEvidence(this.consoleReader(view, signal), "gcp", grant, envelope, { timeoutMs: stopped ? 0 : this.cfg.host_key_timeout_seconds * 1000, intervalMs: this.pollMs, signal, clock: this.clock });
    log.info({ zone: view.zone, instance: view.name, machine_type: view.machineType, tdx: view.tdx, host: view.natIP, host_key_sha256: hostKey }, "GCE instance ready");
    return { ...this.toInstance(grant, view, hostKey), ...(attestation ? { attestation } : {}) };
  }

  async watchUntilExit(instance: ProvisionedInstance, validTo: Date, signal: AbortSignal): Promise<ExitObservation> {
    const rid = instance.request_id;
    this.active.add(rid);
    let zone = instance.details["zone"];
    let name = instance.instance_id || this.naming.instanceName(rid);
    if (!zone) {
      const found = pickBest(await this.findInstances(rid, signal));
      if (!found) return lost("the grant's GCE instance does not exist (deleted outside the bridge?)");
      zone = found.zone;
      name = found.name;
    }
    const key = `${zone}/${name}`;
    for (;;) {
      if (signal.aborted) throw abortError(signal);
      const now = this.clock.now();
      if (now >= validTo.getTime()) return expired(now);
      const sliceEnd = Math.min(validTo.getTime(), now + SERIAL_CHECK_INTERVAL_MS);
      const ctl = linked(signal);
      let r: WaitResult<InstanceView> | "tick";
      try {
        r = await Promise.race([
          this.watcher.waitFor(this.cfg.project, key, { until: (s) => s.status === "TERMINATED" || s.status === "SUSPENDED", signal: ctl.signal }),
          this.clock.sleep(sliceEnd - now, ctl.signal).then(() => "tick" as const),
        ]);
      } finally {
        ctl.abort();
      }
      if (r === "tick") {
        if (this.clock.now() >= validTo.getTime()) return expired(this.clock.now());
        // The guest should have powered off after its marker; look once in a while anyway.
        const obs = this.fromMarker(rid, await this.readSerial(zone, name, signal), null);
        if (obs) return obs;
        continue;
      }
      if (r.kind === "missing") return lost("the GCE instance disappeared (deleted outside the bridge?)");
      const view = r.status;
      const obs = this.fromMarker(rid, await this.readSerial(zone, name, signal), view.lastStopMs);
      if (obs) return obs;
      return lost(`the GCE instance is ${view.status} without reporting an exit code (host maintenance, a manual stop or a guest crash)`);
    }
  }

  async terminate(instance: ProvisionedInstance): Promise<void> {
    const rid = instance.request_id;
    const targets = new Map<string, { zone: string; name: string; id: string }>();
    const zone = instance.details?.["zone"];
    if (instance.instance_id && zone) targets.set(`${zone}/${instance.instance_id}`, { zone, name: instance.instance_id, id: instance.details["gce_id"] ?? "" });
    // Everything labelled with the request: a placeholder (instance_id "") has nothing else.
    for (const v of await this.findInstances(rid)) targets.set(`${v.zone}/${v.name}`, { zone: v.zone, name: v.name, id: v.id });
    for (const t of targets.values()) await this.deleteAndWait(t.zone, t.name, t.id, rid);
    this.active.delete(rid);
  }

  /** Delete instances with this bridge's label that no live grant owns, once past the grace period. */
  async reconcile(live: ReadonlySet<string>): Promise<void> {
    const now = this.clock.now();
    if (this.lastReconcileAt !== null && now - this.lastReconcileAt < this.cfg.reconcile_interval_seconds * 1000) return;
    const previous = this.lastReconcileAt;
    this.lastReconcileAt = now;
    try {
      await this.sweep(live, now);
      this.reconcileError = null;
    } catch (e) {
      // A failed sweep runs again at the next call (e.g. right after credentials are fixed).
      this.lastReconcileAt = previous;
      const err = e instanceof BackendError ? e : mapGcpError(e, "reconcile", this.name);
      this.reconcileError = err.message;
      throw new BackendError(`gcp reconcile failed: ${err.message}; it runs again at the next interval`, this.name);
    }
  }

  /** doctor: credentials and reachability with one read-only, label-filtered list. */
  async check(): Promise<CheckResult[]> {
    try {
      const mine = await this.listInstances(this.cfg.project, this.naming.filter());
      return [{ check: "credentials and Compute API reachable", ok: true, detail: `project ${this.cfg.project}: ${mine.length} instance(s) of this bridge` }];
    } catch (e) {
      return [{ check: "credentials and Compute API reachable", ok: false, detail: e instanceof BackendError ? e.message : redact((e as Error).message) }];
    }
  }

  status(): Record<string, unknown> {
    return {
      active: this.active.size,
      max_concurrent_instances: this.cfg.max_concurrent_instances,
      ...(this.credentialProblem ? { credentials: "refused" } : {}),
      ...(this.reconcileError ? { reconcile_error: this.reconcileError } : {}),
    };
  }

  async close(): Promise<void> {
    this.closed = true;
    this.watcher.close();
    const c = this.clientsResolved;
    this.clientsResolved = null;
    this.clientsP = null;
    if (c) await Promise.allSettled([c.instances.close(), c.operations.close()]);
  }

  // ---- provisioning ---------------------------------------------------------------------------

  /** Machine types a grant may use: TDX grants the TDX ones; others the plain ones (or, on a TDX-only backend, C3 types as plain VMs). */
  private pool(grant: ComputeGrant): MachineShape[] {
    if (grant.tdx_required) return this.cfg.tdx_machine_types;
    return this.cfg.machine_types.length > 0 ? this.cfg.machine_types : this.cfg.tdx_machine_types;
  }

  /** Fitting machine types, smallest first. */
  private candidates(grant: ComputeGrant): MachineShape[] {
    return this.pool(grant)
      .filter((s) => s.vcpus * 1000 >= grant.cpu_millicores && s.memory_mib >= grant.ram_mib)
      .sort((a, b) => a.vcpus - b.vcpus || a.memory_mib - b.memory_mib || (a.name < b.name ? -1 : 1));
  }

  private bootScript(grant: ComputeGrant, envelope: Envelope): string {
    try {
      return renderBootScript({
        requestId: grant.request_id,
        envelope,
        sshUser: this.cfg.ssh_user,
        deadlineEpochSeconds: Math.floor(this.almanac.toWallMs(grant.valid_to) / 1000),
        attestation: bootAttestation(grant.tdx_required, envelope.attestation_nonce, "tdx"),
      });
    } catch (e) {
      if (e instanceof BootScriptError) throw new InvalidRequestError(`gcp cannot run this envelope: ${e.message}`, this.name);
      throw e;
    }
  }

  private instanceBody(grant: ComputeGrant, envelope: Envelope, script: string, zone: string, machineType: string, tdx: boolean): IInstance {
    const rid = grant.request_id;
    const items: { key: string; value: string }[] = [
      { key: "startup-script", value: script },
      { key: META_REQUEST_ID, value: rid },
      { key: META_PROVIDER_ID, value: this.providerId },
      // The buyer's VM: no project-wide keys, no OS Login; only the grant's key.
      { key: "block-project-ssh-keys", value: "TRUE" },
      { key: "enable-oslogin", value: "FALSE" },
    ];
    // The guest agent creates the login user and installs the key (the boot script does too).
    if (envelope.ssh_public_key) items.push({ key: "ssh-keys", value: `${this.cfg.ssh_user}:${envelope.ssh_public_key}` });
    const nic: protos.google.cloud.compute.v1.INetworkInterface = {
      network: this.cfg.network,
      accessConfigs: [{ name: "External NAT", type: "ONE_TO_ONE_NAT" }],
    };
    if (this.cfg.subnetwork) nic.subnetwork = this.cfg.subnetwork;
    const body: IInstance = {
      name: this.naming.instanceName(rid),
      description: `compute-bridge grant ${rid}`,
      machineType: `zones/${zone}/machineTypes/${machineType}`,
      labels: { [this.naming.bridgeKey]: this.naming.bridgeValue, [this.naming.requestKey]: this.naming.requestValue(rid) },
      metadata: { items },
      disks: [{ boot: true, autoDelete: true, initializeParams: { sourceImage: tdx ? (this.cfg.tdx_image ?? this.cfg.image) : this.cfg.image, diskType: `zones/${zone}/diskTypes/${this.cfg.boot_disk_type}` } }],
      networkInterfaces: [nic],
      // The workload runs once: never restart it behind the bridge's back.
      scheduling: tdx ? { onHostMaintenance: "TERMINATE", automaticRestart: false } : { automaticRestart: false },
      // No service account: the buyer's workload gets no credentials of the operator's project
      // (an empty list is omitted on the wire; the API then attaches none).
      serviceAccounts: [],
    };
    if (tdx) body.confidentialInstanceConfig = { confidentialInstanceType: "TDX" };
    return body;
  }

  /**
   * Every fitting machine type (smallest first, skipping those recently without capacity) in
   * every zone of the region, in order, until one insert succeeds. A zone without capacity or
   * that does not offer the type (or TDX) moves on to the next zone; a type no zone could take is
   * marked unavailable; an image that cannot run the grant, or quota, ends the loop at once.
   */
  private async createFitting(grant: ComputeGrant, envelope: Envelope, script: string, zones: readonly string[], deadline: number, signal: AbortSignal, log: Logger): Promise<InstanceView> {
    const tdx = grant.tdx_required;
    const reasons: string[] = [];
    let last: CapacityError | undefined;
    for (const shape of this.candidates(grant)) {
      if (this.unavailable.isUnavailable(this.name, grant.region, shape.name)) {
        reasons.push(`${shape.name}: no capacity reported recently`);
        continue;
      }
      const tried: string[] = [];
      for (const zone of zones) {
        try {
          return await this.createIn(grant, envelope, script, zone, shape.name, tdx, deadline, signal);
        } catch (e) {
          if (!(e instanceof CapacityError) || e instanceof ImageUnfitError) throw e;
          last = e;
          tried.push(`${zone}: ${e instanceof PlacementError ? "not offered there" : "ZONE_RESOURCE_POOL_EXHAUSTED"}`);
          log.warn({ zone, machine_type: shape.name, err: { kind: e.kind, message: e.message } }, "GCE could not create the instance in this zone; trying the next zone or machine type");
        }
      }
      this.unavailable.markUnavailable(this.name, grant.region, shape.name);
      reasons.push(`${shape.name}${tdx ? " (TDX)" : ""} in ${tried.join(", ")}`);
    }
    const err = new CapacityError(`no fitting machine type could be created in ${grant.region}: ${reasons.join("; ") || "none fits"}`, this.name);
    throw last?.offering ? err.withOffering(last.offering.region, last.offering.shape) : err;
  }

  /**
   * Insert (or replay the insert of) the grant's instance in one zone and wait for the Operation.
   * Capacity and quota errors carry the (region, machine type) offering.
   */
  private async createIn(grant: ComputeGrant, envelope: Envelope, script: string, zone: string, machineType: string, tdx: boolean, deadline: number, signal: AbortSignal): Promise<InstanceView> {
    const region = regionOfZone(zone);
    const name = this.naming.instanceName(grant.request_id);
    const requestId = deterministicUuid("insert", this.providerId, grant.request_id, zone, machineType);
    const body = this.instanceBody(grant, envelope, script, zone, machineType, tdx);
    let op: IOperation | null = null;
    try {
      const [lro] = await this.call(`instances.insert ${zone}/${name}`, (c) => c.instances.insert({ project: this.cfg.project, zone, requestId, instanceResource: body }), signal);
      // 6.14 resolves to a plain object whose latestResponse is the Compute Operation (see test/fakes/gce.ts).
      op = (lro as unknown as { latestResponse?: IOperation }).latestResponse ?? null;
    } catch (e) {
      if (e instanceof CapacityError || e instanceof QuotaError) throw e.withOffering(region, machineType);
      // Our deterministic name exists already (a create older than GCE's requestId memory): adopt it.
      if (!(e instanceof AlreadyExistsError)) {
        const refusal = e instanceof BackendError ? classifyInsertRefusal(e, this.name) : e;
        if (refusal instanceof PlacementError) throw refusal.withOffering(region, machineType);
        if (refusal instanceof ImageUnfitError)
          throw new ImageUnfitError(`gcp cannot run this grant on ${tdx ? "backends.gcp.tdx_image" : "backends.gcp.image"} (${refusal.message}); fix the image in the config`, this.name);
        throw refusal;
      }
    }
    if (op) {
      op = await this.waitOperation(zone, op, deadline, signal, (o) => new BackendError(`GCE instance ${name} in ${zone} was not created within launch_timeout_seconds (${this.cfg.launch_timeout_seconds} s; operation ${o}); it is deleted`, this.name));
      if (op.error?.errors?.length) {
        const err = operationError(op.error, `creating ${name} (${machineType}${tdx ? ", TDX" : ""}) in ${zone}`, this.name);
        if (err instanceof CapacityError || err instanceof QuotaError) err.withOffering(region, machineType);
        throw err;
      }
    }
    const view = await this.getInstance(zone, name, signal);
    if (!view) throw new BackendError(`GCE instance ${name} in ${zone} does not exist after its create operation succeeded`, this.name);
    return view;
  }

  private async waitOperation(zone: string, first: IOperation, deadline: number, signal: AbortSignal | undefined, onTimeout: (opName: string) => BackendError): Promise<IOperation> {
    let op = first;
    while (op.status !== "DONE") {
      if (this.clock.now() >= deadline) throw onTimeout(String(op.name));
      const t0 = this.clock.now();
      [op] = await this.call(`zoneOperations.wait ${zone}`, (c) => c.operations.wait({ project: this.cfg.project, zone, operation: String(op.name) }), signal, WAIT_CALL_TIMEOUT_MS);
      // wait normally blocks server-side; if it answered at once, do not spin.
      if (op.status !== "DONE" && this.clock.now() - t0 < 1000) await this.clock.sleep(this.pollMs, signal);
    }
    return op;
  }

  /**
   * RUNNING with an external IP and an SSH banner (sshReady), or TERMINATED (a short workload
   * already ended; sshReady false).
   */
  private async waitReachable(view: InstanceView, deadline: number, signal: AbortSignal): Promise<{ view: InstanceView; sshReady: boolean }> {
    const key = `${view.zone}/${view.name}`;
    let v = view;
    if (!(v.status === "RUNNING" && v.natIP)) {
      const r = await this.waitStatus(key, (s) => (s.status === "RUNNING" && s.natIP !== null) || s.status === "TERMINATED" || isGoing(s.status), deadline, signal);
      if (r === "timeout")
        throw new BackendError(`GCE instance ${v.name} in ${v.zone} was not RUNNING with an external IP within launch_timeout_seconds (${this.cfg.launch_timeout_seconds} s); it is deleted`, this.name);
      if (r.kind === "missing") throw new BackendError(`GCE instance ${v.name} in ${v.zone} disappeared while starting`, this.name);
      v = r.status;
      if (v.status === "TERMINATED") return { view: v, sshReady: false };
      if (isGoing(v.status)) throw new BackendError(`GCE instance ${v.name} in ${v.zone} is ${v.status} while starting`, this.name);
    }
    const host = v.natIP!;
    const ctl = linked(signal);
    try {
      const r = await Promise.race([
        waitForSsh(host, this.cfg.ssh_port, { timeoutMs: this.cfg.ready_timeout_seconds * 1000, intervalMs: this.sshProbeMs, signal: ctl.signal, clock: this.clock }).then(() => "ssh" as const),
        // A workload can finish (and the guest power off) before the probe ever succeeds. Watched
        // only after one interval: the usual case (sshd answers at once) costs no extra call.
        this.clock
          .sleep(this.pollMs, ctl.signal)
          .then(() => this.watcher.waitFor(this.cfg.project, key, { until: (s) => s.status === "TERMINATED" || isGoing(s.status), signal: ctl.signal })),
      ]);
      if (r === "ssh") return { view: v, sshReady: true };
      if (r.kind === "missing") throw new BackendError(`GCE instance ${v.name} in ${v.zone} disappeared while waiting for SSH`, this.name);
      if (r.status.status === "TERMINATED") return { view: r.status, sshReady: false };
      throw new BackendError(`GCE instance ${v.name} in ${v.zone} is ${r.status.status} while waiting for SSH`, this.name);
    } catch (e) {
      if (e instanceof SshNotReadyError) throw new BackendError(`GCE instance ${v.name}: ${e.message} (ready_timeout_seconds = ${this.cfg.ready_timeout_seconds}); it is deleted`, this.name);
      throw e;
    } finally {
      ctl.abort();
    }
  }

  /**
   * The SSH host key fingerprint the guest's boot script wrote to serial port 1 (only the VM writes
   * there, and only the API reads it: whoever connects can pin the key), or null when it reported
   * none, did not report within host_key_timeout_seconds or its console cannot be read. Never fails
   * the grant; rejects only when `signal` aborts.
   */
  private async hostKey(rid: string, v: InstanceView, signal: AbortSignal, log: Logger): Promise<string | null> {
    const found = await waitForHostKey(this.consoleReader(v, signal), rid, { timeoutMs: this.cfg.host_key_timeout_seconds * 1000, intervalMs: this.pollMs, signal, clock: this.clock });
    if (found.fingerprint === null) log.warn({ zone: v.zone, instance: v.name, missing: found.missing }, "no SSH host key from the GCE guest; the grant runs with host_key_sha256 null");
    return found.fingerprint;
  }

  /** Serial port 1 from byte 0, for the guest's reports (host key, evidence). */
  private consoleReader(v: InstanceView, signal: AbortSignal): () => Promise<string> {
    return async () => {
      try {
        // From byte 0: the reports are among the first lines the startup script prints, well inside
        // the first (at most 1 MiB) answer; later output cannot replace them (the first one counts).
        return (await this.serialPage(v.zone, v.name, 0, signal)).contents ?? "";
      } catch (e) {
        // An instance that is gone (404) has no console to come back to; a 403 (the service
        // account lacks compute.instances.getSerialPortOutput) ends the wait too, as every
        // CredentialError does. Throttling and 5xx (already retried inside call()) are read again
        // at the next interval.
        if (e instanceof NotFoundError) throw new ConsoleUnavailableError(e.message);
        throw e;
      }
    };
  }

  private async waitStatus(key: string, until: (s: InstanceView) => boolean, deadline: number, signal: AbortSignal): Promise<WaitResult<InstanceView> | "timeout"> {
    const ctl = linked(signal);
    try {
      return await Promise.race([
        this.watcher.waitFor(this.cfg.project, key, { until, signal: ctl.signal }),
        this.clock.sleep(Math.max(0, deadline - this.clock.now()), ctl.signal).then(() => "timeout" as const),
      ]);
    } finally {
      ctl.abort();
    }
  }

  private toInstance(grant: ComputeGrant, v: InstanceView, hostKey: string | null): ProvisionedInstance {
    const shape = [...this.cfg.machine_types, ...this.cfg.tdx_machine_types].find((s) => s.name === v.machineType);
    const started = v.lastStartMs ?? v.createdMs ?? this.clock.now();
    return {
      request_id: grant.request_id,
      backend: this.name,
      instance_id: v.name,
      region: grant.region,
      host: v.natIP,
      ssh_port: v.natIP ? this.cfg.ssh_port : null,
      ssh_user: this.cfg.ssh_user,
      host_key_sha256: hostKey,
      started_at: new Date(started).toISOString(),
      cpu_millicores: grant.cpu_millicores,
      ram_mib: grant.ram_mib,
      details: {
        project: this.cfg.project,
        zone: v.zone,
        gce_id: v.id,
        machine_type: v.machineType,
        tdx: String(v.tdx),
        ...(shape ? { vcpus: String(shape.vcpus), memory_mib: String(shape.memory_mib) } : {}),
      },
    };
  }

  // ---- watching -------------------------------------------------------------------------------

  /** One logical aggregatedList of every instance of this bridge in the project. */
  private async describeProject(project: string, signal: AbortSignal): Promise<ReadonlyMap<string, InstanceView>> {
    const out = new Map<string, InstanceView>();
    for (const v of await this.listInstances(project, this.naming.filter(), signal)) out.set(`${v.zone}/${v.name}`, v);
    return out;
  }

  private onPoll(e: PollEvent): void {
    if (e.ok) {
      if (this.pollErrors > 0) this.log.info({ polls_failed: this.pollErrors }, "GCE status polling recovered");
      this.pollErrors = 0;
      return;
    }
    this.pollErrors = e.consecutiveErrors;
    // First failure, then every tenth: enough to notice, not a flood.
    if (e.consecutiveErrors === 1 || e.consecutiveErrors % 10 === 0) {
      const err = e.error instanceof BackendError ? e.error : mapGcpError(e.error, "instances.aggregatedList", this.name);
      this.log.warn({ project: e.scope, consecutive_errors: e.consecutiveErrors, err: { kind: err.kind, message: err.message } }, "GCE status poll failed; retrying at the next interval");
    }
  }

  /** One answer of getSerialPortOutput for serial port 1 from byte `start` (at most 1 MiB). */
  private async serialPage(zone: string, name: string, start: number, signal?: AbortSignal): Promise<protos.google.cloud.compute.v1.ISerialPortOutput> {
    const [res] = await this.call(`instances.getSerialPortOutput ${zone}/${name}`, (c) => c.instances.getSerialPortOutput({ project: this.cfg.project, zone, instance: name, port: 1, start }), signal);
    return res;
  }

  /** Serial port 1, up to the last SERIAL_TAIL_BYTES. */
  private async readSerial(zone: string, name: string, signal?: AbortSignal): Promise<string> {
    let text = "";
    let start = 0;
    for (let i = 0; i < SERIAL_MAX_READS; i++) {
      let res: protos.google.cloud.compute.v1.ISerialPortOutput;
      try {
        res = await this.serialPage(zone, name, start, signal);
      } catch (e) {
        if (e instanceof NotFoundError) return text;
        throw e;
      }
      const chunk = res.contents ?? "";
      text = (text + chunk).slice(-SERIAL_TAIL_BYTES);
      const next = Number(res.next ?? start);
      // GCE answers with at most 1 MiB; a shorter answer holds everything up to now.
      if (chunk === "" || !Number.isFinite(next) || next <= start || Buffer.byteLength(chunk) < SERIAL_PAGE_BYTES / 2) break;
      start = next;
    }
    return text;
  }

  private fromMarker(rid: string, serial: string, stoppedMs: number | null): ExitObservation | null {
    const m = parseMarker(serial, rid);
    if (!m) return null;
    const ended = new Date(stoppedMs ?? this.clock.now()).toISOString();
    if ("exitCode" in m) return { kind: "exited", exit_code: m.exitCode, cpu_seconds: m.cpuSeconds, peak_memory_mib: null, ended_at: ended, failure: null };
    if (m.failure.kind === "expired") return { kind: "expired", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: ended, failure: null };
    return { kind: "exited", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: ended, failure: m.failure };
  }

  // ---- terminate / reconcile ------------------------------------------------------------------

  private async deleteAndWait(zone: string, name: string, gceId: string, rid: string): Promise<void> {
    const requestId = deterministicUuid("delete", this.providerId, zone, name, gceId);
    let op: IOperation | null;
    try {
      const [lro] = await this.call(`instances.delete ${zone}/${name}`, (c) => c.instances.delete({ project: this.cfg.project, zone, instance: name, requestId }));
      op = (lro as unknown as { latestResponse?: IOperation }).latestResponse ?? null;
    } catch (e) {
      if (e instanceof NotFoundError) return;
      throw e;
    }
    this.log.info({ request_id: rid, zone, instance: name }, "deleting GCE instance");
    if (!op) return;
    // Not done in time: terminate() fails and is retried; the same requestId finds the same operation.
    op = await this.waitOperation(zone, op, this.clock.now() + DELETE_TIMEOUT_MS, undefined, (o) => new TransientError(`GCE is still deleting ${name} in ${zone} after ${DELETE_TIMEOUT_MS / 60_000} min (operation ${o})`, this.name));
    const errors = op.error?.errors ?? [];
    if (errors.length > 0 && !errors.every((x) => x.code === "RESOURCE_NOT_FOUND")) throw operationError(op.error!, `deleting ${name} in ${zone}`, this.name);
  }

  private async sweep(live: ReadonlySet<string>, now: number): Promise<void> {
    // Live in the store, or held by this backend right now (a grant accepted after the store's
    // snapshot may be launching): never an orphan, whatever orphan_grace_seconds says.
    const byHash = new Map<string, string>();
    for (const id of [...live, ...this.active]) byHash.set(this.naming.requestValue(id), id);
    const all = await this.listInstances(this.cfg.project, this.naming.filter());
    const graceMs = this.cfg.orphan_grace_seconds * 1000;
    const failures: string[] = [];
    for (const v of all) {
      const h = v.labels[this.naming.requestKey];
      const owner = h === undefined ? undefined : byHash.get(h);
      if (owner !== undefined) {
        this.active.add(owner);
        continue;
      }
      if (h === undefined || isGoing(v.status)) continue;
      if (v.createdMs !== null && now - v.createdMs < graceMs) continue;
      this.log.warn({ zone: v.zone, instance: v.name, request_id: v.requestId, status: v.status }, "deleting orphaned GCE instance (no live grant owns it)");
      try {
        // Fire the delete; the next sweep sees it STOPPING or gone.
        const requestId = deterministicUuid("delete", this.providerId, v.zone, v.name, v.id);
        await this.call(`instances.delete ${v.zone}/${v.name}`, (c) => c.instances.delete({ project: this.cfg.project, zone: v.zone, instance: v.name, requestId }));
        this.metrics?.orphanSwept(this.name, "instance");
      } catch (e) {
        if (e instanceof NotFoundError) continue;
        const err = e instanceof BackendError ? e : mapGcpError(e, "instances.delete", this.name);
        failures.push(`${v.zone}/${v.name}: ${err.message}`);
      }
    }
    if (failures.length > 0) throw new BackendError(`could not delete ${failures.length} orphaned instance(s): ${failures.join("; ")}`, this.name);
  }

  // ---- GCE access -----------------------------------------------------------------------------

  /** Every instance of this request (any zone), via one label-filtered aggregatedList. */
  private findInstances(rid: string, signal?: AbortSignal): Promise<InstanceView[]> {
    return this.listInstances(this.cfg.project, this.naming.filter(rid), signal);
  }

  private async listInstances(project: string, filter: string, signal?: AbortSignal): Promise<InstanceView[]> {
    return this.call(
      "instances.aggregatedList",
      async (c) => {
        const out: InstanceView[] = [];
        for await (const [scope, scoped] of c.instances.aggregatedListAsync({ project, filter, maxResults: 500 }, { autoPaginate: false })) {
          // A zone GCE could not reach would make a watched instance look deleted: fail the poll instead.
          if (scoped.warning?.code === "UNREACHABLE") throw new TransientError(`GCE could not list ${scope}: ${redact(scoped.warning.message ?? "unreachable")}`, this.name);
          for (const i of scoped.instances ?? []) out.push(toView(i));
        }
        return out;
      },
      signal,
    );
  }

  private async getInstance(zone: string, name: string, signal?: AbortSignal): Promise<InstanceView | null> {
    try {
      const [i] = await this.call(`instances.get ${zone}/${name}`, (c) => c.instances.get({ project: this.cfg.project, zone, instance: name }), signal);
      return toView(i);
    } catch (e) {
      if (e instanceof NotFoundError) return null;
      throw e;
    }
  }

  /**
   * Run one API call with bounded retries of transient failures (429, 5xx, dropped connections),
   * a per-call timeout and abort; map every error to a typed BackendError without credentials.
   */
  private async call<T>(what: string, fn: (c: Clients) => Promise<T>, signal?: AbortSignal, timeoutMs = CALL_TIMEOUT_MS): Promise<T> {
    const c = await this.clients();
    const op = what.split(" ")[0]!; // "instances.get zone/name" -> "instances.get": bounded label values
    for (let attempt = 1; ; attempt++) {
      if (signal?.aborted) throw abortError(signal);
      try {
        const r = await bounded(fn(c), timeoutMs, signal, () => new TransientError(`GCP ${what}: no answer within ${Math.round(timeoutMs / 1000)} s`, this.name));
        this.credentialProblem = null;
        this.metrics?.apiCall(this.name, op, "ok");
        return r;
      } catch (e) {
        if (signal?.aborted) throw abortError(signal);
        const err = mapGcpError(e, what, this.name);
        const status = (e as { status?: unknown; code?: unknown }).status ?? (e as { code?: unknown }).code;
        this.metrics?.apiCall(this.name, op, typeof status === "number" || typeof status === "string" ? String(status) : err.kind);
        if (status === 429) this.metrics?.throttled(this.name, op);
        // A 403 on the serial console alone means one missing permission, not refused credentials:
        // the host key read during provisioning must not make canSatisfy decline every grant (the
        // watch's own serial read still fails with this CredentialError and names the permission).
        if (err instanceof CredentialError && !(err instanceof PermissionDeniedError && op === "instances.getSerialPortOutput")) {
          if (this.credentialProblem === null) this.log.error({ err: { kind: err.kind, message: err.message } }, "GCP refused the bridge's credentials; new grants are declined until a call succeeds");
          this.credentialProblem = err.message;
        }
        if (!(err instanceof TransientError) || attempt >= this.retry.attempts || this.closed) throw err;
        const delay = this.retry.baseMs + backoffMs(attempt, this.retry.baseMs, this.retry.capMs);
        this.metrics?.retry(this.name, op);
        this.log.debug({ what, attempt, delay_ms: delay, err: { kind: err.kind, message: err.message } }, "GCP call failed; retrying");
        await this.clock.sleep(delay, signal);
      }
    }
  }

  private clients(): Promise<Clients> {
    if (this.closed) return Promise.reject(new BackendError("the gcp backend is closed", this.name));
    this.clientsP ??= this.createClients().then(
      (c) => (this.clientsResolved = c),
      (e: unknown) => {
        this.clientsP = null; // retried on the next call (e.g. once the key file is fixed)
        const err = e instanceof BackendError ? e : new CredentialError(`gcp: cannot set up GCP credentials from ${this.credentialsPath}: ${redact(e instanceof Error ? e.message : String(e))}`, this.name);
        if (err instanceof CredentialError) this.credentialProblem = err.message;
        throw err;
      },
    );
    return this.clientsP;
  }

  private async createClients(): Promise<Clients> {
    const authClient = this.opts.authClient ?? (await this.authFromKeyFile());
    const { InstancesClient, ZoneOperationsClient } = await import("@google-cloud/compute");
    const options: ConstructorParameters<typeof InstancesClient>[0] = {
      fallback: true,
      // google-gax nests its own google-auth-library; the top-level client works at runtime.
      authClient: authClient as GaxAuthClient,
      ...endpointOptions(this.cfg.api_endpoint),
    };
    return { instances: new InstancesClient(options), operations: new ZoneOperationsClient(options) };
  }

  /** Production credentials: a service-account key file, checked here so mistakes read clearly. */
  private async authFromKeyFile(): Promise<unknown> {
    const file = this.credentialsPath;
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch (e) {
      throw new CredentialError(`backends.gcp.credentials_file: cannot read ${file} (${(e as NodeJS.ErrnoException).code ?? "error"})`, this.name);
    }
    let key: { type?: unknown; client_email?: unknown; private_key?: unknown };
    try {
      key = JSON.parse(text) as typeof key;
    } catch {
      throw new CredentialError(`backends.gcp.credentials_file: ${file} is not JSON (expected a service-account key file downloaded from IAM)`, this.name);
    }
    if (typeof key !== "object" || key === null) throw new CredentialError(`backends.gcp.credentials_file: ${file} is not a service-account key`, this.name);
    if (typeof key.private_key === "string") registerSecret(key.private_key);
    if (key.type !== "service_account" && key.type !== "external_account" && key.type !== "impersonated_service_account")
      throw new CredentialError(`backends.gcp.credentials_file: ${file} has type ${JSON.stringify(typeof key.type === "string" ? key.type.slice(0, 40) : null)}; expected a service-account key ("type": "service_account")`, this.name);
    if (key.type === "service_account" && (typeof key.client_email !== "string" || typeof key.private_key !== "string"))
      throw new CredentialError(`backends.gcp.credentials_file: ${file} lacks client_email or private_key`, this.name);
    const { GoogleAuth } = await import("google-auth-library");
    const auth = new GoogleAuth({ keyFile: file, scopes: COMPUTE_SCOPES });
    try {
      return await auth.getClient();
    } catch (e) {
      throw new CredentialError(`backends.gcp.credentials_file: ${file} could not be loaded: ${redact(e instanceof Error ? e.message : String(e), 200)}`, this.name);
    }
  }
}

// ---- helpers ------------------------------------------------------------------------------------

function endpointOptions(apiEndpoint: string | undefined): { apiEndpoint?: string; port?: number; protocol?: string } {
  if (!apiEndpoint) return {};
  const u = new URL(apiEndpoint);
  const protocol = u.protocol.replace(/:$/, "");
  return { apiEndpoint: u.hostname, port: u.port ? Number(u.port) : protocol === "https" ? 443 : 80, protocol };
}

function toMs(ts: string | null | undefined): number | null {
  if (!ts) return null;
  const t = Date.parse(ts);
  return Number.isFinite(t) ? t : null;
}

export function toView(i: IInstance): InstanceView {
  const nat = (i.networkInterfaces ?? []).flatMap((n) => n.accessConfigs ?? []).find((a) => a.natIP)?.natIP ?? null;
  const meta = i.metadata?.items ?? [];
  const labels: Record<string, string> = {};
  for (const [k, v] of Object.entries(i.labels ?? {})) if (typeof v === "string") labels[k] = v;
  return {
    name: i.name ?? "",
    zone: lastSegment(i.zone),
    id: i.id === null || i.id === undefined ? "" : String(i.id),
    status: String(i.status ?? "UNKNOWN"),
    machineType: lastSegment(i.machineType),
    natIP: nat,
    labels,
    requestId: meta.find((m) => m.key === META_REQUEST_ID)?.value ?? null,
    createdMs: toMs(i.creationTimestamp),
    lastStartMs: toMs(i.lastStartTimestamp),
    lastStopMs: toMs(i.lastStopTimestamp),
    tdx: String(i.confidentialInstanceConfig?.confidentialInstanceType ?? "") === "TDX",
  };
}

/** Stopping, being deleted, or suspended: not something to adopt or wait on. */
function isGoing(status: ViewStatus): boolean {
  return status === "STOPPING" || status === "SUSPENDING" || status === "SUSPENDED";
}

const STATUS_RANK: Record<string, number> = { RUNNING: 5, STAGING: 4, PROVISIONING: 3, REPAIRING: 2, TERMINATED: 1 };

/** The most advanced of a request's instances (normally there is exactly one). */
function pickBest(views: InstanceView[]): InstanceView | null {
  let best: InstanceView | null = null;
  for (const v of views) if (!best || (STATUS_RANK[v.status] ?? 0) > (STATUS_RANK[best.status] ?? 0)) best = v;
  return best;
}

function describeLargest(pool: MachineShape[]): string {
  if (pool.length === 0) return "none";
  const s = [...pool].sort((a, b) => b.vcpus - a.vcpus || b.memory_mib - a.memory_mib)[0]!;
  return `${s.name} (${s.vcpus * 1000}m / ${s.memory_mib} MiB)`;
}

function lost(message: string): ExitObservation {
  return { kind: "lost", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: null, failure: { kind: "lost", message } };
}

function expired(now: number): ExitObservation {
  return { kind: "expired", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: new Date(now).toISOString(), failure: null };
}

/** A controller aborted with `parent` (and by the caller when it is done). */
function linked(parent: AbortSignal): AbortController {
  const ctl = new AbortController();
  if (parent.aborted) ctl.abort(parent.reason);
  else {
    const onAbort = () => ctl.abort(parent.reason);
    parent.addEventListener("abort", onAbort, { once: true });
    ctl.signal.addEventListener("abort", () => parent.removeEventListener("abort", onAbort), { once: true });
  }
  return ctl;
}

/** `p`, or a rejection after `ms` or on `signal`. The call itself is not cancelled (inserts carry a requestId). */
function bounded<T>(p: Promise<T>, ms: number, signal: AbortSignal | undefined, timeoutError: () => Error): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => finish(() => reject(timeoutError())), ms);
    const onAbort = () => finish(() => reject(abortError(signal!)));
    let done = false;
    const finish = (f: () => void) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      f();
    };
    if (signal?.aborted) return onAbort();
    signal?.addEventListener("abort", onAbort, { once: true });
    p.then(
      (v) => finish(() => resolve(v)),
      (e: unknown) => finish(() => reject(e)),
    );
  });
}
