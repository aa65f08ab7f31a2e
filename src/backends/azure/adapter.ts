/**
 * The Azure adapter of the shared VM backend (cloud/vm-backend.ts): VMs through ARM
 * (@azure/arm-compute, @azure/arm-network), with Intel TDX confidential VMs (DCesv5/ECesv5 and
 * DCedsv5/ECedsv5 sizes) for grants that require TDX.
 *
 * - create: a Standard static public IP, a NIC in `subnet_id` and a VM, all named
 *   deterministically from (provider id, request_id) (naming.ts) and tagged with both, so a retried
 *   or restarted provision adopts what exists instead of duplicating it. One VM name per request:
 *   a VM left Failed by an earlier attempt is PUT again (same size) or deleted first (another
 *   size). The boot script is the VM's custom data.
 * - status: one `listAll(statusOnly)` per resource group and interval, the documented status call
 *   (`list(rg, $expand=instanceView)` is documented as valid only with a `$filter`). Azure does
 *   not say who powered a VM off (selfStopped null): the exit marker decides.
 * - console: the boot-diagnostics serial log (serial-log.ts); it lags the guest a little.
 * - terminate: the VM, then its NICs, public IP and OS disk, each confirmed by ARM.
 * - sweep: VMs, NICs and public IPs tagged with the provider id, OS disks named by its scheme
 *   (a VM's implicit OS disk carries no tags); owner = the request hash in the names.
 * The SDKs are loaded on first use: capabilities() and canSatisfy() need no SDK and no I/O.
 */
import type { VirtualMachine } from "@azure/arm-compute";
import { AZURE_TDX_SIZE, type AzureConfig } from "../../config/schema.js";
import type { ComputeGrant, ProvisionedInstance } from "../../domain/index.js";
import type { Clock } from "../../util/clock.js";
import type { Logger } from "../../util/logger.js";
import { BackendError, InvalidRequestError, TransientError, type BackendContext, type BackendMetrics, type CheckResult } from "../backend.js";
import type { CloudAdapter, CloudSettings, ConsoleRef, CreateRequest, OwnedResource, Shape, VmPhase, VmStatus } from "../cloud/adapter.js";
import { ArmClients, type ArmClientOptions, type Clients } from "./clients.js";
import { mapArmError, redact } from "./errors.js";
import { azureNaming, parseResourceId, TAG_CREATED, TAG_PROVIDER, TAG_REQUEST, type AzureNaming } from "./naming.js";
import { ArmResources, isBusy, lc, type CallOptions } from "./resources.js";
import { readSerialLog } from "./serial-log.js";

export type AzureAdapterOptions = ArmClientOptions;

/** Azure custom data holds at most 65535 bytes before base64. */
const MAX_CUSTOM_DATA_BYTES = 65_535;
/** Reads of the serial log after the VM stopped, while the marker is not there yet (the blob lags). */
const SERIAL_LOG_READS = 3;
/** Bound on one ARM read or one list (all its pages): a hung call must not stall the poller. */
const READ_TIMEOUT_MS = 60_000;
/** Bound on the sweep's four lists together. */
const SWEEP_LIST_TIMEOUT_MS = 300_000;
/** Concurrent GETs of a batched lookup, and concurrent deletes of the orphan sweep. */
const LOOKUP_CONCURRENCY = 8;
const SWEEP_CONCURRENCY = 4;
/** Blob sockets for serial-log reads (the core bounds concurrent reads per resource group at 8). */
const BLOB_SOCKETS = 8;
const STOPPED = new Set(["stopped", "deallocated"]);
const KINDS = ["vm", "nic", "public_ip", "disk"] as const;

export class AzureAdapter implements CloudAdapter {
  readonly name = "azure";
  readonly settings: CloudSettings;
  readonly sshUser: string;
  readonly evidence = { platform: "azure", guest: "azure" } as const;
  readonly plainShapes: readonly Shape[];
  readonly tdxShapes: readonly Shape[];
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly metrics: BackendMetrics | undefined;
  private readonly naming: AzureNaming;
  private readonly providerId: string;
  private readonly rg: string;
  private readonly pollMs: number;
  private readonly arm: ArmClients;
  private readonly res: ArmResources;

  constructor(
    private readonly cfg: AzureConfig,
    ctx: BackendContext,
    opts: AzureAdapterOptions = {},
  ) {
    this.log = ctx.log.child({ backend: this.name });
    this.clock = ctx.clock;
    this.metrics = ctx.metrics;
    this.providerId = ctx.providerId;
    this.naming = azureNaming(ctx.providerId);
    this.rg = cfg.resource_group;
    this.settings = cfg;
    this.sshUser = cfg.admin_username;
    this.pollMs = Math.max(1, Math.round(cfg.poll_interval_seconds * 1000));
    this.plainShapes = [...cfg.vm_sizes];
    // The schema rejects non-TDX names here; filter again so the card can never claim TDX wrongly.
    this.tdxShapes = cfg.tdx_vm_sizes.filter((s) => AZURE_TDX_SIZE.test(s.name));
    this.arm = new ArmClients(cfg, ctx.configDir, opts, this.name, BLOB_SOCKETS);
    this.res = new ArmResources(cfg, this.providerId, this.name, this.pollMs, this.clock, this.log, this.metrics);
  }

  regions(): string[] {
    return [...this.cfg.regions];
  }
  pool(grant: ComputeGrant): Shape[][] {
    return grant.tdx_required ? [[...this.tdxShapes]] : [[...this.plainShapes], [...this.tdxShapes]];
  }
  placements(region: string): string[] {
    return [region];
  }
  credentialProblem(): string | null {
    return this.res.refused;
  }
  sdkLoaded(): boolean {
    return this.arm.sdkLoaded;
  }
  ownerKey(requestId: string): string {
    return this.naming.requestHash(requestId);
  }
  markerGraceMs(st: VmStatus): number {
    // The boot-diagnostics blob lags the guest: a stopped VM's log is read SERIAL_LOG_READS times.
    return st.phase === "stopped" ? (SERIAL_LOG_READS - 1) * this.pollMs : 0;
  }
  ref(instance: ProvisionedInstance): { scope: string; key: string } | null {
    const vm = instance.details["vm_name"] ?? instance.instance_id;
    return vm ? { scope: this.rg, key: vm.toLowerCase() } : null;
  }
  mapError(e: unknown, what: string): BackendError {
    return mapArmError(e, { what, backend: this.name });
  }

  checkBootScript(script: string): void {
    const bytes = Buffer.byteLength(script);
    if (bytes > MAX_CUSTOM_DATA_BYTES)
      throw new InvalidRequestError(`azure: the boot script is ${bytes} bytes, more than the ${MAX_CUSTOM_DATA_BYTES} bytes Azure custom data holds (envelope env or command too large)`, this.name);
  }

  // ---- create / adopt ---------------------------------------------------------------------------

  /** Each request's VM by its deterministic name; a Failed one is left to create() (any fitting size). */
  async find(_region: string, requestIds: readonly string[]): Promise<ReadonlyMap<string, VmStatus>> {
    const c = await this.clients();
    const out = new Map<string, VmStatus>();
    await mapLimit(requestIds, LOOKUP_CONCURRENCY, async (rid) => {
      const vm = await this.res.getVm(c, this.naming.names(rid).vm, { limit: `${READ_TIMEOUT_MS / 1000} s` }, AbortSignal.timeout(READ_TIMEOUT_MS));
      // A VM tagged for someone else is refused by create(), with the owner in the message.
      if (!vm || !this.res.isOwn(vm.tags, rid) || lc(vm.provisioningState) === "failed") return;
      out.set(rid, this.status(vm, null));
    });
    return out;
  }

  /** An earlier call's VM: waited out while ARM is still creating it, then its address. */
  async adopt(found: VmStatus, req: Omit<CreateRequest, "shape" | "placement">, signal: AbortSignal): Promise<VmStatus> {
    const { grant } = req;
    const names = this.naming.names(grant.request_id);
    const c = await this.clients();
    const { launch, o } = this.launchBound(req.deadlineMs, signal);
    let vm = await this.res.getVm(c, names.vm, o, launch);
    while (vm && isBusy(vm.provisioningState)) {
      if (this.clock.now() > req.deadlineMs) throw new BackendError(`azure: VM ${names.vm} is still ${vm.provisioningState} after launch_timeout_seconds (${this.cfg.launch_timeout_seconds} s)`, this.name);
      await this.clock.sleep(this.pollMs, signal);
      vm = await this.res.getVm(c, names.vm, o, launch);
    }
    if (!vm) throw new TransientError(`azure: VM ${names.vm} vanished while being adopted; retrying`, this.name);
    this.res.checkOwner(vm.tags, grant.request_id, `VM ${names.vm}`);
    const size = vm.hardwareProfile?.vmSize ?? found.shape ?? "";
    if (grant.tdx_required && !this.isTdx(size)) throw new BackendError(`azure: VM ${names.vm} exists with non-TDX size ${size} but the grant requires TDX`, this.name);
    const state = lc(vm.provisioningState);
    if (state === "failed") return this.create({ ...req, shape: this.shapeOf(size, grant), placement: grant.region }, signal);
    if (state !== "succeeded") throw new TransientError(`azure: VM ${names.vm} is ${vm.provisioningState ?? "in an unknown state"}; retrying later`, this.name);
    this.log.info({ request_id: grant.request_id, vm: names.vm }, "azure VM adopted (created by an earlier call)");
    const tags = this.tags(grant.request_id, vm);
    const pip = await this.res.ensurePublicIp(c, names, grant.region, tags, launch, o);
    return this.status(vm, await this.res.address(c, names, pip, req.deadlineMs, signal, launch, o));
  }

  async create(req: CreateRequest, signal: AbortSignal): Promise<VmStatus> {
    const { grant, shape, envelope } = req;
    const id = grant.request_id;
    if (!envelope.ssh_public_key) throw new InvalidRequestError("azure VMs need the grant's SSH public key (envelope.ssh_public_key)", this.name);
    const names = this.naming.names(id);
    const confidential = this.isTdx(shape.name);
    const c = await this.clients();
    const { launch, o } = this.launchBound(req.deadlineMs, signal);
    const existing = await this.res.getVm(c, names.vm, o, launch);
    if (existing) {
      this.res.checkOwner(existing.tags, id, `VM ${names.vm}`);
      if (lc(existing.provisioningState) !== "failed") return this.adopt(this.status(existing, null), req, signal);
      // One VM name per request: a Failed VM of another size (an earlier attempt) goes first.
      if (lc(existing.hardwareProfile?.vmSize) !== lc(shape.name)) {
        await this.res.deleteVm(c, names.vm);
        await this.res.deleteDisk(c, existing.storageProfile?.osDisk?.name ?? names.osDisk);
      }
    }
    const tags = this.tags(id, existing);
    const offering = { region: grant.region, size: shape.name };
    const pip = await this.res.ensurePublicIp(c, names, grant.region, tags, launch, o);
    const nic = await this.res.ensureNic(c, names, grant.region, pip.id!, tags, launch, o);
    const body = this.res.vmBody(names, grant.region, shape.name, confidential, nic.id!, tags, Buffer.from(req.script).toString("base64"), envelope.ssh_public_key);
    const img = this.cfg.confidential_image;
    // A refused image is a ConfidentialImageError (an UnfitError): no other size runs it either.
    const cvm = confidential && img ? { confidentialImage: `${img.publisher}:${img.offer}:${img.sku}:${img.version}` } : {};
    const vm = await this.res.call(`creating VM ${names.vm} (${shape.name}${confidential ? ", confidential TDX" : ""} in ${grant.region})`, () => c.compute.virtualMachines.beginCreateOrUpdateAndWait(this.rg, names.vm, body, this.res.lro(launch)), { ...o, offering, ...cvm });
    this.log.info({ request_id: id, vm: names.vm, vm_size: shape.name, region: grant.region, confidential }, "azure VM created");
    // The create LRO ends with the VM provisioned: it counts as running, the core probes SSH.
    return { ...this.status(vm, await this.res.address(c, names, pip, req.deadlineMs, signal, launch, o)), phase: "running" };
  }

  details(grant: ComputeGrant, st: VmStatus): Record<string, string> {
    const names = this.naming.names(grant.request_id);
    const size = this.shapeOf(st.shape ?? "", grant);
    return {
      resource_group: this.rg,
      location: grant.region,
      vm_name: st.id,
      vm_size: size.name,
      vm_vcpus: String(size.vcpus),
      vm_memory_mib: String(size.memory_mib),
      confidential: String(this.isTdx(size.name)),
      nic_name: names.nic,
      public_ip_name: names.pip,
      os_disk_name: st.attrs?.["os_disk_name"] ?? names.osDisk,
      ...(st.attrs?.["vm_id"] ? { vm_id: st.attrs["vm_id"] } : {}),
    };
  }

  // ---- status and console ---------------------------------------------------------------------

  /** Subscription-wide `listAll(statusOnly)`, kept to the resource group: one call per interval. */
  async describe(rg: string, keys: readonly string[], signal: AbortSignal): Promise<ReadonlyMap<string, VmStatus>> {
    const want = new Set(keys);
    const out = new Map<string, VmStatus>();
    const c = await this.clients();
    const bounded = AbortSignal.any([signal, AbortSignal.timeout(READ_TIMEOUT_MS)]);
    for await (const vm of c.compute.virtualMachines.listAll({ statusOnly: "true", abortSignal: bounded })) {
      const n = vm.name?.toLowerCase();
      if (n && want.has(n) && lc(parseResourceId(vm.id)?.resourceGroup) === lc(rg)) out.set(n, this.status(vm, null));
    }
    this.res.refused = null;
    return out;
  }

  async readConsole(ref: ConsoleRef, signal: AbortSignal): Promise<string> {
    const c = await this.clients();
    return readSerialLog({ compute: c.compute, resourceGroup: this.rg, vmName: ref.id, agent: this.arm.blobAgent(), signal, timeoutMs: READ_TIMEOUT_MS, mapError: (e, what) => this.mapError(e, what), backend: this.name });
  }

  // ---- terminate and sweep --------------------------------------------------------------------

  async terminate(instance: ProvisionedInstance): Promise<void> {
    const id = instance.request_id;
    const names = this.naming.names(id);
    const c = await this.clients();
    const vm = await this.res.getVm(c, names.vm, { limit: `${READ_TIMEOUT_MS / 1000} s` }, AbortSignal.timeout(READ_TIMEOUT_MS));
    const disks = new Set([names.osDisk]);
    const nics = new Set([names.nic]);
    if (vm) {
      // A VM by our deterministic name that another owner tagged is never deleted.
      this.res.checkOwner(vm.tags, id, `VM ${names.vm}`);
      const osDisk = vm.storageProfile?.osDisk?.name;
      if (osDisk) disks.add(osDisk);
      for (const ref of vm.networkProfile?.networkInterfaces ?? []) {
        const p = parseResourceId(ref.id);
        if (p && lc(p.resourceGroup) === lc(this.rg) && this.naming.parse(p.name)?.hash === names.hash) nics.add(p.name);
      }
      await this.res.deleteVm(c, names.vm);
    }
    for (const n of nics) await this.res.deleteNic(c, n);
    await this.res.deletePublicIp(c, names.pip);
    for (const d of disks) await this.res.deleteDisk(c, d);
  }

  async listOwned(): Promise<OwnedResource[]> {
    const c = await this.clients();
    const out: OwnedResource[] = [];
    const add = (kind: (typeof KINDS)[number], name: string | undefined, tags: Record<string, string> | undefined, created: Date | undefined) => {
      if (!name) return;
      const ours = tags?.[TAG_PROVIDER] === this.providerId;
      const parsed = this.naming.parse(name);
      // Only OS disks are recognised by name alone: a VM creates them without tags.
      if (!ours && !(kind === "disk" && parsed)) return;
      const requestId = ours ? tags?.[TAG_REQUEST] : undefined;
      const owner = parsed?.hash ?? (requestId !== undefined ? this.naming.requestHash(requestId) : undefined);
      const createdMs = Date.parse(tags?.[TAG_CREATED] ?? "") || created?.getTime() || null;
      out.push({ kind, scope: this.rg, id: name, owner, requestId, createdMs });
    };
    const abortSignal = AbortSignal.timeout(SWEEP_LIST_TIMEOUT_MS);
    for await (const vm of c.compute.virtualMachines.list(this.rg, { abortSignal })) add("vm", vm.name, vm.tags, vm.timeCreated);
    for await (const nic of c.network.networkInterfaces.list(this.rg, { abortSignal })) add("nic", nic.name, nic.tags, undefined);
    for await (const pip of c.network.publicIPAddresses.list(this.rg, { abortSignal })) add("public_ip", pip.name, pip.tags, undefined);
    // Never a disk some VM still uses; ARM would refuse anyway.
    for await (const d of c.compute.disks.listByResourceGroup(this.rg, { abortSignal })) if (!d.managedBy) add("disk", d.name, d.tags, d.timeCreated);
    return out;
  }

  async deleteOrphans(orphans: readonly OwnedResource[]): Promise<{ deleted: OwnedResource[]; failures: string[] }> {
    const c = await this.clients();
    const deleted: OwnedResource[] = [];
    const failures: string[] = [];
    const r = this.res;
    const del = { vm: r.deleteVm, nic: r.deleteNic, public_ip: r.deletePublicIp, disk: r.deleteDisk } as const;
    // VMs first (their deletion frees NICs, IPs and disks), then the leftovers.
    for (const kind of KINDS)
      await mapLimit(
        orphans.filter((o) => o.kind === kind),
        SWEEP_CONCURRENCY,
        async (o) => {
          try {
            await del[kind].call(r, c, o.id);
            deleted.push(o);
          } catch (e) {
            failures.push(`${kind} ${o.id}: ${(e as Error).message}`);
          }
        },
      );
    return { deleted, failures };
  }

  /** doctor: credentials and reachability with one read-only list of the resource group's VMs. */
  async check(): Promise<CheckResult[]> {
    try {
      const { compute } = await this.clients();
      await compute.virtualMachines.list(this.rg).byPage().next();
      return [{ check: "credentials and ARM reachable", ok: true, detail: `listed VMs in resource group ${this.rg}` }];
    } catch (e) {
      return [{ check: "credentials and ARM reachable", ok: false, detail: redact((e as Error).message) }];
    }
  }

  async close(): Promise<void> {
    this.arm.close();
  }

  // ---- helpers ----------------------------------------------------------------------------------

  private clients(): Promise<Clients> {
    return this.arm.get();
  }

  private isTdx(size: string): boolean {
    return this.tdxShapes.some((s) => lc(s.name) === lc(size));
  }

  /** A size from the config when listed there (an adopted VM may have another). */
  private shapeOf(size: string, grant: ComputeGrant): Shape {
    return [...this.plainShapes, ...this.tdxShapes].find((s) => lc(s.name) === lc(size)) ?? { name: size, vcpus: Math.ceil(grant.cpu_millicores / 1000), memory_mib: grant.ram_mib };
  }

  private tags(requestId: string, vm: VirtualMachine | null): Record<string, string> {
    return { [TAG_PROVIDER]: this.providerId, [TAG_REQUEST]: requestId, [TAG_CREATED]: vm?.tags?.[TAG_CREATED] ?? new Date(this.clock.now()).toISOString() };
  }

  /** Everything up to a running VM with an address is bounded by launch_timeout_seconds. */
  private launchBound(deadlineMs: number, signal: AbortSignal): { launch: AbortSignal; o: CallOptions } {
    const launch = AbortSignal.any([signal, AbortSignal.timeout(Math.max(0, deadlineMs - this.clock.now()))]);
    return { launch, o: { signal, limit: `launch_timeout_seconds (${this.cfg.launch_timeout_seconds} s)` } };
  }

  private status(vm: VirtualMachine, host: string | null): VmStatus {
    let power: string | null = null;
    let failure: string | null = null;
    for (const st of vm.instanceView?.statuses ?? []) {
      const code = st.code ?? "";
      if (code.startsWith("PowerState/")) power = code.slice("PowerState/".length).toLowerCase();
      const f = /^ProvisioningState\/failed\/(.+)$/i.exec(code);
      if (f) failure = f[1]!;
    }
    const prov = lc(vm.provisioningState);
    const stopped = STOPPED.has(power ?? "");
    let phase: VmPhase = "starting";
    let detail = `${power ?? "no power state"} (provisioning ${vm.provisioningState ?? "unknown"})`;
    if (prov === "deleting") [phase, detail] = ["gone", "being deleted (not by this bridge)"];
    else if (prov === "failed" && !stopped) [phase, detail] = ["gone", `failed${failure ? ` (${failure})` : ""}`];
    else if (stopped) phase = "stopped";
    else if (power === "stopping" || power === "deallocating") phase = "stopping";
    else if (power === "running") phase = "running";
    const osDisk = vm.storageProfile?.osDisk?.name;
    return {
      id: vm.name ?? "",
      scope: this.rg,
      key: (vm.name ?? "").toLowerCase(),
      phase,
      host,
      selfStopped: null,
      shape: vm.hardwareProfile?.vmSize ?? null,
      startedAtMs: vm.timeCreated?.getTime() ?? null,
      endedAtMs: null,
      detail,
      attrs: { ...(vm.vmId ? { vm_id: vm.vmId } : {}), ...(osDisk ? { os_disk_name: osDisk } : {}) },
    };
  }
}

async function mapLimit<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}
