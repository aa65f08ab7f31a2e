/**
 * The Google Compute Engine adapter of the shared VM backend (cloud/vm-backend.ts): one instance
 * per grant, in one zone of the grant's region (Intel TDX on C3 machine types).
 *
 * - create: `instances.insert` with a deterministic instance name and a `requestId` UUID derived
 *   from (provider id, request_id, zone, machine type), so a retried or restarted call replays the
 *   same Operation instead of creating a second VM. The instance carries labels (hashed bridge id +
 *   hashed request id: label values cannot hold every request id) and the exact request id in
 *   metadata, and boots the shared boot script (common/cloud-init.ts) as its `startup-script`.
 *   TDX grants get `confidentialInstanceConfig.confidentialInstanceType = "TDX"` with
 *   `scheduling.onHostMaintenance = "TERMINATE"` on a C3 machine type. The zone Operation is
 *   waited for and its `error` checked (a DONE operation can carry ZONE_RESOURCE_POOL_EXHAUSTED or
 *   QUOTA_EXCEEDED). A stock-out, or a 400 saying the zone does not offer the machine type or TDX,
 *   is a CapacityError (the core tries the next zone, then the next machine type); quota is a
 *   QuotaError, an image without TDX support an UnfitError (both fail over at once). The boot disk
 *   is `boot_disk_type` (pd-balanced by default: GCE's own default, pd-standard, is refused by C3).
 * - adopt: the same insert is re-sent (same requestId) to get its Operation back, so a create still
 *   in flight when the bridge stopped is awaited and its error checked.
 * - status: one label-filtered `aggregatedList` per project per poll (scope = the project, key =
 *   `${zone}/${name}`); the console is `getSerialPortOutput` of serial port 1 (live: from byte 0,
 *   where the guest's reports are; after a stop: up to its last 256 KiB).
 * - terminate: `instances.delete` (404 = done) of the known instance and of everything labelled
 *   with the request, waiting for the delete Operation. Orphans are found by the bridge label.
 * - check (doctor): one label-filtered list for credentials, then read-only placement checks of
 *   zones, machine types and images (gcp/doctor.ts), whose clients are created only then.
 *
 * The SDK (~1.7 s to import) and google-auth-library are loaded on first use (gcp/api.ts).
 */
import path from "node:path";
import type { protos } from "@google-cloud/compute";
import type { GcpConfig } from "../../config/schema.js";
import type { ComputeGrant, Envelope, ProvisionedInstance } from "../../domain/index.js";
import type { Clock } from "../../util/clock.js";
import type { Logger } from "../../util/logger.js";
import { BackendError, CapacityError, InvalidRequestError, NotFoundError, QuotaError, TransientError, type BackendContext, type CheckResult } from "../backend.js";
import type { CloudAdapter, CloudSettings, ConsoleRef, CreateRequest, OwnedResource, Shape, VmPhase, VmStatus } from "../cloud/adapter.js";
import { GceApi, type GceApiOptions, type IInstance, type IOperation, type InstanceView } from "./api.js";
import { placementChecks } from "./doctor.js";
import { AlreadyExistsError, classifyInsertRefusal, ImageUnfitError, mapGcpError, operationError, PlacementError, redact } from "./errors.js";
import { deterministicUuid, gceNaming, META_PROVIDER_ID, META_REQUEST_ID, regionOfZone, type GceNaming } from "./naming.js";

/** How long a delete may take before terminate() reports a (retryable) failure. */
const DELETE_TIMEOUT_MS = 10 * 60_000;
/** Serial console bytes kept while reading (the marker is the script's last line). */
const SERIAL_TAIL_BYTES = 256 * 1024;
const SERIAL_MAX_READS = 8;
const SERIAL_PAGE_BYTES = 1024 * 1024;
/** GCE's limit on one metadata value (the startup-script). */
const METADATA_VALUE_LIMIT = 256 * 1024;


const PHASES: Readonly<Record<string, VmPhase>> = { STOPPING: "stopping", TERMINATED: "stopped", SUSPENDING: "gone", SUSPENDED: "gone" };
/** Stopping, being deleted, or suspended: not something to adopt or wait on. */
const isGoing = (status: string) => status === "STOPPING" || status === "SUSPENDING" || status === "SUSPENDED";
const STATUS_RANK: Readonly<Record<string, number>> = { RUNNING: 5, STAGING: 4, PROVISIONING: 3, REPAIRING: 2, TERMINATED: 1 };

export class GceAdapter implements CloudAdapter {
  readonly name = "gcp";
  readonly settings: CloudSettings;
  readonly sshUser: string;
  readonly evidence = { platform: "gcp", guest: "tdx" } as const;
  readonly plainShapes: readonly Shape[];
  readonly tdxShapes: readonly Shape[];
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly providerId: string;
  private readonly naming: GceNaming;
  private readonly zonesByRegion = new Map<string, string[]>();
  private readonly api: GceApi;
  private readonly pollMs: number;
  /** GCE's numeric id of each orphan listOwned() found (its delete's requestId derives from it). */
  private readonly gceIds = new Map<string, string>();

  constructor(
    private readonly cfg: GcpConfig,
    ctx: BackendContext,
    opts: GceApiOptions = {},
  ) {
    this.log = ctx.log.child({ backend: this.name });
    this.clock = ctx.clock;
    this.providerId = ctx.providerId;
    this.naming = gceNaming(cfg.label_prefix, ctx.providerId);
    for (const zone of cfg.zones) {
      const list = this.zonesByRegion.get(regionOfZone(zone)) ?? [];
      if (!list.includes(zone)) list.push(zone);
      this.zonesByRegion.set(regionOfZone(zone), list);
    }
    this.settings = cfg;
    this.sshUser = cfg.ssh_user;
    this.plainShapes = cfg.machine_types;
    this.tdxShapes = cfg.tdx_machine_types;
    this.pollMs = cfg.poll_interval_seconds * 1000;
    const credentialsPath = path.resolve(ctx.configDir, cfg.credentials_file);
    this.api = new GceApi({ name: this.name, project: cfg.project, credentialsPath, apiEndpoint: cfg.api_endpoint, log: this.log, clock: this.clock, metrics: ctx.metrics }, opts);
  }

  regions(): string[] {
    return [...this.zonesByRegion.keys()];
  }
  /** TDX grants the TDX types; others the plain ones (or, on a TDX-only backend, C3 types as plain VMs). */
  pool(grant: ComputeGrant): Shape[][] {
    if (grant.tdx_required) return [[...this.tdxShapes]];
    return [[...(this.plainShapes.length > 0 ? this.plainShapes : this.tdxShapes)]];
  }
  placements(region: string): string[] {
    return this.zonesByRegion.get(region) ?? [];
  }
  /** GCE refuses a metadata value (the startup-script) over 256 KB: said before anything is inserted. */
  checkBootScript(script: string): void {
    const bytes = Buffer.byteLength(script, "utf8");
    if (bytes > METADATA_VALUE_LIMIT)
      throw new InvalidRequestError(`the envelope's command and env make a ${bytes}-byte startup-script; GCE accepts at most ${METADATA_VALUE_LIMIT} bytes per metadata value`, this.name);
  }
  credentialProblem(): string | null {
    return this.api.refused;
  }
  sdkLoaded(): boolean {
    return this.api.loaded;
  }
  ownerKey(requestId: string): string {
    return this.naming.requestValue(requestId);
  }
  /** The console is read once after the stop: GCE keeps serial output of a TERMINATED instance. */
  markerGraceMs(): number {
    return 0;
  }
  mapError(e: unknown, what: string): BackendError {
    return mapGcpError(e, what, this.name);
  }

  // ---- create / adopt ---------------------------------------------------------------------------

  async find(_region: string, requestIds: readonly string[]): Promise<ReadonlyMap<string, VmStatus>> {
    // One label-filtered list: for the request itself, or (many at once) for the whole bridge.
    const only = requestIds.length === 1 ? requestIds[0] : undefined;
    const all = await this.api.listInstances(this.naming.filter(only));
    const out = new Map<string, VmStatus>();
    for (const rid of requestIds) {
      const label = this.naming.requestValue(rid);
      // The most advanced of the request's instances (normally there is exactly one).
      let best: InstanceView | null = null;
      for (const v of all) if (v.labels[this.naming.requestKey] === label && (!best || (STATUS_RANK[v.status] ?? 0) > (STATUS_RANK[best.status] ?? 0))) best = v;
      if (best) out.set(rid, this.view(best));
    }
    return out;
  }

  async adopt(found: VmStatus, req: Omit<CreateRequest, "shape" | "placement">, signal: AbortSignal): Promise<VmStatus> {
    const a = found.attrs ?? {};
    if (isGoing(found.detail)) throw new TransientError(`GCE instance ${found.id} for this grant is ${found.detail} (being stopped or deleted); provisioning waits for it to finish`, this.name);
    // Re-send the same insert (same requestId) to get its Operation back.
    return this.view(await this.insert(req.grant, req.envelope, req.script, a["zone"]!, a["machine_type"]!, a["tdx"] === "true", req.deadlineMs, signal));
  }

  async create(req: CreateRequest, signal: AbortSignal): Promise<VmStatus> {
    return this.view(await this.insert(req.grant, req.envelope, req.script, req.placement, req.shape.name, req.grant.tdx_required, req.deadlineMs, signal));
  }

  /**
   * Insert (or replay the insert of) the grant's instance in one zone and wait for the Operation.
   * Capacity and quota errors carry the (region, machine type) offering.
   */
  private async insert(grant: ComputeGrant, envelope: Envelope, script: string, zone: string, machineType: string, tdx: boolean, deadline: number, signal: AbortSignal): Promise<InstanceView> {
    const region = regionOfZone(zone);
    const name = this.naming.instanceName(grant.request_id);
    const requestId = deterministicUuid("insert", this.providerId, grant.request_id, zone, machineType);
    const body = this.instanceBody(grant, envelope, script, zone, machineType, tdx);
    let op: IOperation | null = null;
    try {
      const [lro] = await this.api.call(`instances.insert ${zone}/${name}`, (c) => c.instances.insert({ project: this.cfg.project, zone, requestId, instanceResource: body }), signal);
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
      const timeout = (o: string) => new BackendError(`GCE instance ${name} in ${zone} was not created within launch_timeout_seconds (${this.cfg.launch_timeout_seconds} s; operation ${o}); it is deleted`, this.name);
      op = await this.api.waitOperation(zone, op, deadline, signal, this.pollMs, timeout);
      if (op.error?.errors?.length) {
        const err = operationError(op.error, `creating ${name} (${machineType}${tdx ? ", TDX" : ""}) in ${zone}`, this.name);
        if (err instanceof CapacityError || err instanceof QuotaError) err.withOffering(region, machineType);
        throw err;
      }
    }
    const view = await this.api.getInstance(zone, name, signal);
    if (!view) throw new BackendError(`GCE instance ${name} in ${zone} does not exist after its create operation succeeded`, this.name);
    return view;
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
    const nic: protos.google.cloud.compute.v1.INetworkInterface = { network: this.cfg.network, accessConfigs: [{ name: "External NAT", type: "ONE_TO_ONE_NAT" }] };
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

  // ---- status / console -------------------------------------------------------------------------

  ref(instance: ProvisionedInstance): { scope: string; key: string } | null {
    const zone = instance.details["zone"];
    if (!zone) return null;
    return { scope: this.cfg.project, key: `${zone}/${instance.instance_id || this.naming.instanceName(instance.request_id)}` };
  }

  /** One logical aggregatedList of every instance of this bridge in the project. */
  async describe(_project: string, _keys: readonly string[], signal: AbortSignal): Promise<ReadonlyMap<string, VmStatus>> {
    const out = new Map<string, VmStatus>();
    for (const v of await this.api.listInstances(this.naming.filter(), signal)) out.set(`${v.zone}/${v.name}`, this.view(v));
    return out;
  }

  /**
   * Serial port 1. Live: from byte 0 (the guest's reports are among the first lines its startup
   * script prints, well inside the first answer of at most 1 MiB). Otherwise up to its last
   * SERIAL_TAIL_BYTES, where the exit marker is.
   */
  async readConsole(ref: ConsoleRef, signal: AbortSignal, live: boolean): Promise<string> {
    const [zone, name] = splitKey(ref.key);
    if (live) return (await this.api.serialPage(zone, name, 0, signal)).contents ?? "";
    let text = "";
    let start = 0;
    for (let i = 0; i < SERIAL_MAX_READS; i++) {
      let res: protos.google.cloud.compute.v1.ISerialPortOutput;
      try {
        res = await this.api.serialPage(zone, name, start, signal);
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

  details(_grant: ComputeGrant, st: VmStatus): Record<string, string> {
    const a = st.attrs ?? {};
    const shape = [...this.plainShapes, ...this.tdxShapes].find((s) => s.name === st.shape);
    return {
      project: this.cfg.project,
      zone: a["zone"] ?? "",
      gce_id: a["gce_id"] ?? "",
      machine_type: st.shape ?? "",
      tdx: a["tdx"] ?? "false",
      ...(shape ? { vcpus: String(shape.vcpus), memory_mib: String(shape.memory_mib) } : {}),
    };
  }

  /**
   * GCE's status in the core's words: RUNNING counts once it has its external IP; a TERMINATED
   * instance does not tell whether its guest powered off (selfStopped null); suspended is gone.
   */
  private view(v: InstanceView): VmStatus {
    const running = v.status === "RUNNING" && v.natIP !== null;
    const phase = running ? "running" : (PHASES[v.status] ?? "starting");
    return {
      id: v.name,
      scope: this.cfg.project,
      key: `${v.zone}/${v.name}`,
      phase,
      host: running ? v.natIP : null,
      selfStopped: null,
      shape: v.machineType || null,
      startedAtMs: v.lastStartMs ?? v.createdMs,
      endedAtMs: phase === "stopped" || phase === "gone" ? v.lastStopMs : null,
      detail: v.status,
      attrs: { zone: v.zone, gce_id: v.id, machine_type: v.machineType, tdx: String(v.tdx) },
    };
  }

  // ---- terminate / orphans ----------------------------------------------------------------------

  async terminate(instance: ProvisionedInstance): Promise<void> {
    const rid = instance.request_id;
    const targets = new Map<string, { zone: string; name: string; id: string }>();
    const zone = instance.details?.["zone"];
    if (instance.instance_id && zone) targets.set(`${zone}/${instance.instance_id}`, { zone, name: instance.instance_id, id: instance.details["gce_id"] ?? "" });
    // Everything labelled with the request: a placeholder (instance_id "") has nothing else.
    for (const v of await this.api.listInstances(this.naming.filter(rid))) targets.set(`${v.zone}/${v.name}`, { zone: v.zone, name: v.name, id: v.id });
    for (const t of targets.values()) await this.deleteAndWait(t.zone, t.name, t.id, rid);
  }

  private async deleteAndWait(zone: string, name: string, gceId: string, rid: string): Promise<void> {
    let op: IOperation | null;
    try {
      op = await this.delete(zone, name, gceId);
    } catch (e) {
      if (e instanceof NotFoundError) return;
      throw e;
    }
    this.log.info({ request_id: rid, zone, instance: name }, "deleting GCE instance");
    if (!op) return;
    // Not done in time: terminate() fails and is retried; the same requestId finds the same operation.
    const timeout = (o: string) => new TransientError(`GCE is still deleting ${name} in ${zone} after ${DELETE_TIMEOUT_MS / 60_000} min (operation ${o})`, this.name);
    op = await this.api.waitOperation(zone, op, this.clock.now() + DELETE_TIMEOUT_MS, undefined, this.pollMs, timeout);
    const errors = op.error?.errors ?? [];
    if (errors.length > 0 && !errors.every((x) => x.code === "RESOURCE_NOT_FOUND")) throw operationError(op.error!, `deleting ${name} in ${zone}`, this.name);
  }

  /** instances.delete with a requestId derived from the instance (a retry finds the same Operation). */
  private async delete(zone: string, name: string, gceId: string): Promise<IOperation | null> {
    const requestId = deterministicUuid("delete", this.providerId, zone, name, gceId);
    const [lro] = await this.api.call(`instances.delete ${zone}/${name}`, (c) => c.instances.delete({ project: this.cfg.project, zone, instance: name, requestId }));
    return (lro as unknown as { latestResponse?: IOperation }).latestResponse ?? null;
  }

  async listOwned(): Promise<OwnedResource[]> {
    this.gceIds.clear();
    return (await this.api.listInstances(this.naming.filter())).map((v) => {
      this.gceIds.set(`${v.zone}/${v.name}`, v.id);
      return { kind: "instance", scope: v.zone, id: v.name, owner: v.labels[this.naming.requestKey], requestId: v.requestId ?? undefined, createdMs: v.createdMs, going: isGoing(v.status) };
    });
  }

  /** Fires each delete without waiting for its Operation: the next sweep sees the instance STOPPING or gone. */
  async deleteOrphans(orphans: readonly OwnedResource[]): Promise<{ deleted: OwnedResource[]; failures: string[] }> {
    const deleted: OwnedResource[] = [];
    const failures: string[] = [];
    for (const o of orphans) {
      try {
        await this.delete(o.scope, o.id, this.gceIds.get(`${o.scope}/${o.id}`) ?? "");
        deleted.push(o);
      } catch (e) {
        if (e instanceof NotFoundError) continue;
        failures.push(`${o.scope}/${o.id}: ${this.mapError(e, "instances.delete").message}`);
      }
    }
    return { deleted, failures };
  }

  /**
   * doctor: credentials and reachability with one read-only, label-filtered list, then the
   * read-only placement checks of zones, machine types and images (gcp/doctor.ts). Nothing is
   * created; the catalogue clients are loaded only here.
   */
  async check(): Promise<CheckResult[]> {
    const what = "credentials and Compute API reachable";
    let first: CheckResult;
    try {
      const mine = await this.api.listInstances(this.naming.filter());
      first = { check: what, ok: true, detail: `project ${this.cfg.project}: ${mine.length} instance(s) of this bridge` };
    } catch (e) {
      // Without working credentials every other check would fail the same way.
      return [{ check: what, ok: false, detail: e instanceof BackendError ? e.message : redact((e as Error).message) }];
    }
    return [first, ...(await placementChecks(this.api, this.cfg))];
  }

  close(): Promise<void> {
    return this.api.close();
  }
}

/** `${zone}/${name}` -> [zone, name]. */
function splitKey(key: string): [string, string] {
  const i = key.indexOf("/");
  return [key.slice(0, i), key.slice(i + 1)];
}
