import { readFileSync } from "node:fs";
import https from "node:https";
import path from "node:path";
import tls from "node:tls";
import type { ComputeManagementClient, VirtualMachine } from "@azure/arm-compute";
import type { NetworkInterface, NetworkManagementClient, PublicIPAddress } from "@azure/arm-network";
import type { TokenCredential } from "@azure/identity";
import { AZURE_TDX_SIZE, type AzureConfig } from "../config/schema.js";
import { readSecret, SecretError } from "../config/secrets.js";
import type { Almanac, Capabilities, ComputeGrant, Envelope, ExitObservation, ProvisionedInstance } from "../domain/index.js";
import { abortError, type Clock } from "../util/clock.js";
import type { Logger } from "../util/logger.js";
import { VERSION } from "../version.js";
import {
  BackendError,
  CapacityError,
  CredentialError,
  InvalidRequestError,
  NotFoundError,
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
import { describeArmError, isBootDiagnosticsDisabled, isNotFound, mapArmError, redact } from "./azure/errors.js";
import { azureNaming, parseResourceId, TAG_CREATED, TAG_PROVIDER, TAG_REQUEST, type AzureNames, type AzureNaming } from "./azure/naming.js";
import { BatchWatcher, type PollEvent } from "./common/batch-watcher.js";
import { BootScriptError, parseMarker, renderBootScript } from "./common/cloud-init.js";
import { Semaphore } from "./common/semaphore.js";
import { ConsoleUnavailableError, guestEvidence, SshNotReadyError, waitForHostKey, waitForSsh } from "./common/ssh-ready.js";
import { bootAttestation } from "../attestation/guest.js";
import type { OfferingCache } from "./offering-cache.js";

/** A VM size from the config: name plus the shape the card and canSatisfy reason about. */
interface Size {
  name: string;
  vcpus: number;
  memory_mib: number;
}

/** What one batched list tells about a VM. */
export interface VmStatus {
  /** PowerState/<x> without the prefix (running, starting, stopping, stopped, deallocating, deallocated), if reported. */
  power: string | null;
  /** provisioningState (Succeeded, Creating, Updating, Failed, Deleting). */
  provisioning: string | null;
  /** The code of a ProvisioningState/failed/<code> status. */
  failureCode: string | null;
}

export interface AzureBackendOptions {
  /**
   * Use this credential instead of building one from the config (tests pass the ARM fake's).
   * The bridge itself never uses DefaultAzureCredential: production credentials come only from
   * the config (service principal secret or managed identity).
   */
  credential?: TokenCredential;
  /** Base delay of the SDK's exponential request retry (default 800 ms); tests shorten it. */
  retryDelayInMs?: number;
  /** Request retries by the SDK pipeline (default 3): 429 honours Retry-After, 5xx back off. */
  maxRetries?: number;
}

interface CallOptions {
  offering?: { region: string; size: string };
  /** The caller's signal: an abort of it is passed through as an AbortError. */
  signal?: AbortSignal;
  /** The time limit behind any other abort, for the message (e.g. "launch_timeout_seconds (900 s)"). */
  limit?: string;
}

interface Clients {
  compute: ComputeManagementClient;
  network: NetworkManagementClient;
}

/** Azure custom data holds at most 65535 bytes before base64. */
const MAX_CUSTOM_DATA_BYTES = 65_535;
/** Serial console bytes read when looking for a marker (the end of the log is kept). */
const MAX_SERIAL_LOG_BYTES = 8 * 1024 * 1024;
const SERIAL_TAIL_BYTES = 1024 * 1024;
/** Reads of the serial log after the VM stopped, while the marker is not there yet (the blob lags). */
const SERIAL_LOG_READS = 3;
/** Bound on one ARM read or one list (all its pages): a hung call must not stall the poller. */
const READ_TIMEOUT_MS = 60_000;
/** Bound on the sweep's four lists together. */
const SWEEP_LIST_TIMEOUT_MS = 300_000;
/** Serial-log reads at once (each is an ARM POST plus a blob GET): bursts of exits and launches queue. */
const SERIAL_READ_CONCURRENCY = 8;
/** Concurrent deletes during the orphan sweep. */
const SWEEP_CONCURRENCY = 4;
/** The guest powered off (the boot script ends with poweroff), or someone deallocated it. */
const STOPPED = new Set(["stopped", "deallocated"]);

const KNOWN_AUTHORITY_HOSTS = new Set([
  "login.microsoftonline.com",
  "login.chinacloudapi.cn",
  "login.microsoftonline.us",
  "login.microsoftonline.de",
]);

/**
 * Azure VMs through ARM (@azure/arm-compute, @azure/arm-network, @azure/identity), with Intel
 * TDX confidential VMs (DCesv5/ECesv5 and DCedsv5/ECedsv5 sizes) for grants that require TDX.
 *
 * Per grant it creates a Standard static public IP, a NIC in `subnet_id` and a VM, all named
 * deterministically from (provider id, request_id) and tagged with both, so a retried or
 * restarted provision() adopts what exists instead of duplicating it. The VM boots the shared
 * boot script (custom data), which fetches and verifies the image, runs it, prints
 * `COMPUTE-BRIDGE-EXIT <id> <code>` on the serial console and powers off; watchUntilExit() sees
 * the power state in one batched list per resource group and reads the code from boot
 * diagnostics. Before that, once SSH answers, provision() reads the same serial log for the host
 * key fingerprint the script reports first (host_key_sha256). terminate() deletes the VM, then
 * NIC, public IP and OS disk; reconcile() sweeps anything tagged (or named) for this bridge that
 * no live grant owns.
 *
 * The SDKs are loaded on first use: capabilities() and canSatisfy() need no SDK and no I/O.
 */
export class AzureBackend implements ManagedBackend {
  readonly name = "azure";
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly almanac: Almanac;
  private readonly unavailable: OfferingCache;
  private readonly naming: AzureNaming;
  private readonly providerId: string;
  private readonly rg: string;
  private readonly pollMs: number;
  private readonly plainSizes: Size[];
  private readonly tdxSizes: Size[];
  /** Request ids this process has provisioned or is watching (the concurrency cap counts them). */
  private readonly active = new Set<string>();
  private extraCaCache: string | null | undefined;
  private readonly configDir: string;
  /** Keep-alive agent for boot-diagnostics blobs; its TLS context (CA list) is built once. */
  private blobAgentP: https.Agent | null = null;
  /** Keep-alive agent of the ARM clients when ca_file is set, sharing one TLS context (see armAgent()). */
  private armAgentP: https.Agent | null = null;
  private secureContextCache: tls.SecureContext | null | undefined;
  private readonly serialReads = new Semaphore(SERIAL_READ_CONCURRENCY);
  private clientsP: Promise<Clients> | null = null;
  private watcherP: BatchWatcher<VmStatus> | null = null;
  private lastReconcile = -Infinity;
  private reconcileError: string | null = null;
  /** First time the sweep saw an orphan whose age it cannot read (no tag, no timeCreated). */
  private readonly firstSeen = new Map<string, number>();
  private closed = false;

  private readonly metrics: BackendMetrics | undefined;

  constructor(
    private readonly cfg: AzureConfig,
    ctx: BackendContext,
    private readonly opts: AzureBackendOptions = {},
  ) {
    this.log = ctx.log.child({ backend: this.name });
    this.clock = ctx.clock;
    this.almanac = ctx.almanac;
    this.unavailable = ctx.unavailable;
    this.providerId = ctx.providerId;
    this.metrics = ctx.metrics;
    this.naming = azureNaming(ctx.providerId);
    this.rg = cfg.resource_group;
    this.pollMs = Math.max(1, Math.round(cfg.poll_interval_seconds * 1000));
    this.plainSizes = [...cfg.vm_sizes];
    // The schema rejects non-TDX names here; filter again so the card can never claim TDX wrongly.
    this.tdxSizes = cfg.tdx_vm_sizes.filter((s) => AZURE_TDX_SIZE.test(s.name));
    // Files (CA bundle, client secret) are read on first use: a constructor stays side-effect
    // free, so check-config and card can build the backend offline. doctor and the start-up
    // reconcile surface a bad path, naming the config key.
    this.configDir = ctx.configDir;
  }

  /** The extra CA bundle from ca_file, read once. */
  private get extraCa(): string | null {
    if (this.extraCaCache === undefined) this.extraCaCache = this.cfg.ca_file ? readCaFile(path.resolve(this.configDir, this.cfg.ca_file)) : null;
    return this.extraCaCache;
  }

  /** doctor: credentials and reachability with one read-only list of the resource group's VMs. */
  async check(): Promise<CheckResult[]> {
    try {
      const { compute } = await this.clients();
      const pages = compute.virtualMachines.list(this.rg).byPage();
      await pages.next();
      return [{ check: "credentials and ARM reachable", ok: true, detail: `listed VMs in resource group ${this.rg}` }];
    } catch (e) {
      return [{ check: "credentials and ARM reachable", ok: false, detail: redact((e as Error).message) }];
    }
  }

  /** The subnet for NICs in `region`: subnet_id, or the region's entry when it is a table. */
  private subnetFor(region: string): string {
    const s = this.cfg.subnet_id;
    if (typeof s === "string") return s;
    const id = s[region];
    if (!id) throw new InvalidRequestError(`backends.azure.subnet_id has no subnet for region ${region}`, this.name);
    return id;
  }

  // ---- the Backend contract -------------------------------------------------------------------

  capabilities(): Capabilities {
    const all = [...this.plainSizes, ...this.tdxSizes];
    return {
      regions: [...this.cfg.regions],
      tdx_capable: this.tdxSizes.length > 0,
      // Declared caps, the same rule on every cloud: the concurrency cap times the largest shape.
      max_cpu_millicores: this.cfg.max_concurrent_instances * Math.max(0, ...all.map((s) => s.vcpus * 1000)),
      max_ram_mib: this.cfg.max_concurrent_instances * Math.max(0, ...all.map((s) => s.memory_mib)),
    };
  }

  canSatisfy(grant: ComputeGrant, held: Held = NOTHING_HELD): Satisfaction {
    if (!this.cfg.regions.includes(grant.region))
      return { ok: false, code: "region_not_served", message: `azure serves ${this.cfg.regions.join(", ")}` };
    if (grant.tdx_required && this.tdxSizes.length === 0)
      return { ok: false, code: "tdx_not_supported", message: "azure has no TDX VM sizes configured (tdx_vm_sizes)" };
    const fitting = this.fittingSizes(grant);
    if (fitting.length === 0)
      return { ok: false, code: "too_large", message: `no configured ${grant.tdx_required ? "TDX " : ""}VM size has ${grant.cpu_millicores}m CPU and ${grant.ram_mib} MiB` };
    const full = countDecline(this.name, held, this.cfg.max_concurrent_instances, "max_concurrent_instances");
    if (full) return full;
    const first = fitting.find((s) => !this.unavailable.isUnavailable(this.name, grant.region, s.name));
    if (!first) return { ok: false, code: "offering_unavailable", message: `every fitting VM size in ${grant.region} recently reported no capacity (${fitting.map((s) => s.name).join(", ")})` };
    return { ok: true, shape: first.name };
  }

  async provision(grant: ComputeGrant, envelope: Envelope, signal: AbortSignal): Promise<ProvisionedInstance> {
    const id = grant.request_id;
    if (!this.cfg.regions.includes(grant.region)) throw new InvalidRequestError(`azure does not serve region ${grant.region}`, this.name);
    if (!envelope.ssh_public_key) throw new InvalidRequestError("azure VMs need the grant's SSH public key (envelope.ssh_public_key)", this.name);
    const names = this.naming.names(id);
    const customData = this.customData(grant, envelope);
    this.active.add(id);
    const c = await this.clients();

    // Everything up to a running VM with an address is bounded by launch_timeout_seconds.
    const launchMs = this.cfg.launch_timeout_seconds * 1000;
    const launchDeadline = this.clock.now() + launchMs;
    const launch = AbortSignal.any([signal, AbortSignal.timeout(launchMs)]);
    const o = { signal, limit: `launch_timeout_seconds (${this.cfg.launch_timeout_seconds} s)` };

    // 1. Adopt what an earlier call created.
    let vm = await this.call(`reading VM ${names.vm}`, () => c.compute.virtualMachines.get(this.rg, names.vm, { expand: "instanceView", abortSignal: launch }), { ...o, notFoundIsNull: true });
    if (vm) {
      this.checkOwner(vm.tags, id, `VM ${names.vm}`);
      if (isBusy(vm.provisioningState)) vm = await this.waitVmSettled(c, names.vm, launchDeadline, launch, o);
    }
    const size = vm ? this.sizeOf(vm, grant) : this.pickSize(grant);
    const confidential = this.isTdxSize(size.name);
    if (grant.tdx_required && !confidential) throw new BackendError(`azure: VM ${names.vm} exists with non-TDX size ${size.name} but the grant requires TDX`, this.name);
    const offering = { region: grant.region, size: size.name };
    const tags = { [TAG_PROVIDER]: this.providerId, [TAG_REQUEST]: id, [TAG_CREATED]: vm?.tags?.[TAG_CREATED] ?? new Date(this.clock.now()).toISOString() };

    // 2. Public IP and NIC (created only if missing), then the VM.
    let pip = await this.ensurePublicIp(c, names, grant.region, tags, launch, o);
    const state = (vm?.provisioningState ?? "").toLowerCase();
    if (!vm || state === "failed") {
      const nic = await this.ensureNic(c, names, grant.region, pip.id!, tags, launch, o);
      const body = this.vmBody(names, grant.region, size.name, confidential, nic.id!, tags, customData, envelope.ssh_public_key);
      vm = await this.call(
        `creating VM ${names.vm} (${size.name}${confidential ? ", confidential TDX" : ""} in ${grant.region})`,
        () => c.compute.virtualMachines.beginCreateOrUpdateAndWait(this.rg, names.vm, body, this.lro(launch)),
        { ...o, offering },
      );
      this.log.info({ request_id: id, vm: names.vm, vm_size: size.name, region: grant.region, confidential }, "azure VM created");
    } else if (state !== "succeeded") {
      throw new TransientError(`azure: VM ${names.vm} is ${vm.provisioningState ?? "in an unknown state"}; retrying later`, this.name);
    } else {
      this.log.info({ request_id: id, vm: names.vm }, "azure VM adopted (created by an earlier call)");
    }

    // 3. Its address, then SSH (or an early power-off: a short workload may finish first).
    while (!pip.ipAddress) {
      if (this.clock.now() > launchDeadline) throw new BackendError(`azure: public IP ${names.pip} has no address after launch_timeout_seconds (${this.cfg.launch_timeout_seconds} s)`, this.name);
      await this.clock.sleep(this.pollMs, signal);
      pip = await this.call(`reading public IP ${names.pip}`, () => c.network.publicIPAddresses.get(this.rg, names.pip, { abortSignal: launch }), o);
    }
    const host = pip.ipAddress;
    const ready = await this.waitReady(names, host, id, signal);
    // The guest's own report of its SSH host key, so whoever connects can pin it. A guest that
    // powered off before SSH answered is not waited for: its workload is over, nobody connects.
    const hostKey = ready === "ssh" ? await this.readHostKey(names.vm, id, signal) : null;
    // TDX: the vTPM evidence chain follows the host key report (read once if the VM already stopped).
    const attestation = await guestEvidence(this.serialReader(names.vm, signal), "azure", grant, envelope, { timeoutMs: ready === "ssh" ? this.cfg.host_key_timeout_seconds * 1000 : 0, intervalMs: this.pollMs, signal, clock: this.clock });

    return {
      request_id: id,
      backend: this.name,
      instance_id: names.vm,
      region: grant.region,
      host,
      ssh_port: this.cfg.ssh_port,
      ssh_user: this.cfg.admin_username,
      host_key_sha256: hostKey,
      started_at: (vm.timeCreated ?? new Date(this.clock.now())).toISOString(),
      cpu_millicores: grant.cpu_millicores,
      ram_mib: grant.ram_mib,
      details: {
        resource_group: this.rg,
        location: grant.region,
        vm_name: names.vm,
        vm_size: size.name,
        vm_vcpus: String(size.vcpus),
        vm_memory_mib: String(size.memory_mib),
        confidential: String(confidential),
        nic_name: names.nic,
        public_ip_name: names.pip,
        os_disk_name: vm.storageProfile?.osDisk?.name ?? names.osDisk,
        ...(vm.vmId ? { vm_id: vm.vmId } : {}),
      },
      ...(attestation ? { attestation } : {}),
    };
  }

  async watchUntilExit(instance: ProvisionedInstance, validTo: Date, signal: AbortSignal): Promise<ExitObservation> {
    const id = instance.request_id;
    const vmName = instance.details["vm_name"] ?? this.naming.names(id).vm;
    this.active.add(id);
    if (signal.aborted) throw abortError(signal);
    const remaining = validTo.getTime() - this.clock.now();
    if (remaining <= 0) return expired(this.clock.now());
    const ctl = new AbortController();
    const onAbort = () => ctl.abort(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    let outcome: { t: "status"; r: Awaited<ReturnType<BatchWatcher<VmStatus>["waitFor"]>> } | { t: "deadline" };
    try {
      outcome = await Promise.race([
        this.watcher()
          .waitFor(this.rg, vmName.toLowerCase(), { until: (s) => isStoppedOrFailed(s), signal: ctl.signal })
          .then((r) => ({ t: "status" as const, r })),
        this.clock.sleep(remaining, ctl.signal).then(() => ({ t: "deadline" as const })),
      ]);
    } catch (e) {
      if (signal.aborted) throw abortError(signal);
      throw e;
    } finally {
      signal.removeEventListener("abort", onAbort);
      ctl.abort();
    }
    if (outcome.t === "deadline") return expired(this.clock.now());
    const r = outcome.r;
    if (r.kind === "missing")
      return { kind: "lost", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: null, failure: { kind: "lost", message: `azure VM ${vmName} no longer exists` } };
    if ((r.status.provisioning ?? "").toLowerCase() === "deleting")
      return { kind: "lost", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: null, failure: { kind: "lost", message: `azure VM ${vmName} is being deleted (not by this bridge)` } };
    if ((r.status.provisioning ?? "").toLowerCase() === "failed" && !STOPPED.has(r.status.power ?? ""))
      return { kind: "lost", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: null, failure: { kind: "lost", message: `azure VM ${vmName} failed${r.status.failureCode ? ` (${r.status.failureCode})` : ""}` } };
    const endedAt = new Date(this.clock.now()).toISOString();
    const marker = await this.readMarker(vmName, id, signal);
    if (marker && "failure" in marker) {
      if (marker.failure.kind === "expired") return expired(this.clock.now());
      return { kind: "exited", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: endedAt, failure: marker.failure };
    }
    return { kind: "exited", exit_code: marker ? marker.exitCode : null, cpu_seconds: marker ? marker.cpuSeconds : null, peak_memory_mib: null, ended_at: endedAt, failure: null };
  }

  async terminate(instance: ProvisionedInstance): Promise<void> {
    const id = instance.request_id;
    const names = this.naming.names(id);
    const c = await this.clients();
    const vm = await this.call(`reading VM ${names.vm}`, () => c.compute.virtualMachines.get(this.rg, names.vm, { abortSignal: AbortSignal.timeout(READ_TIMEOUT_MS) }), {
      notFoundIsNull: true,
      limit: `${READ_TIMEOUT_MS / 1000} s`,
    });
    const disks = new Set([names.osDisk]);
    const nics = new Set([names.nic]);
    if (vm) {
      // A VM by our deterministic name that another owner tagged is never deleted.
      this.checkOwner(vm.tags, id, `VM ${names.vm}`);
      const osDisk = vm.storageProfile?.osDisk?.name;
      if (osDisk) disks.add(osDisk);
      for (const ref of vm.networkProfile?.networkInterfaces ?? []) {
        const p = parseResourceId(ref.id);
        if (p && p.resourceGroup.toLowerCase() === this.rg.toLowerCase() && this.naming.parse(p.name)?.hash === names.hash) nics.add(p.name);
      }
      await this.deleteVm(c, names.vm);
    }
    for (const n of nics) await this.deleteNic(c, n);
    await this.deletePublicIp(c, names.pip);
    for (const d of disks) await this.deleteDisk(c, d);
    this.active.delete(id);
    this.log.info({ request_id: id, vm: names.vm, existed: Boolean(vm) }, "azure resources deleted");
  }

  /**
   * Sweep this bridge's resources in the resource group: VMs, NICs and public IPs tagged with
   * its provider id, and OS disks named by its scheme (a VM's implicit OS disk carries no tags),
   * whose request is not live. Orphans younger than orphan_grace_seconds are left for a later pass.
   */
  async reconcile(live: ReadonlySet<string>): Promise<void> {
    const now = this.clock.now();
    if (now - this.lastReconcile < this.cfg.reconcile_interval_seconds * 1000) return;
    this.lastReconcile = now;
    try {
      await this.sweep(live);
      this.reconcileError = null;
    } catch (e) {
      const err = mapArmError(e, { what: "listing resources for the orphan sweep", backend: this.name });
      this.reconcileError = err.message;
      throw err;
    }
  }

  status(): Record<string, unknown> {
    return {
      active: this.active.size,
      max_concurrent_instances: this.cfg.max_concurrent_instances,
      ...(this.reconcileError ? { reconcile_error: this.reconcileError } : {}),
    };
  }

  async close(): Promise<void> {
    this.closed = true;
    this.watcherP?.close();
    this.blobAgentP?.destroy();
    this.armAgentP?.destroy();
  }

  // ---- sizes ----------------------------------------------------------------------------------

  private isTdxSize(name: string): boolean {
    return this.tdxSizes.some((s) => s.name.toLowerCase() === name.toLowerCase());
  }

  /** Sizes that can hold the grant, in preference order: plain sizes first (cheaper), smallest first. */
  private fittingSizes(grant: ComputeGrant): Size[] {
    const fits = (s: Size) => s.vcpus * 1000 >= grant.cpu_millicores && s.memory_mib >= grant.ram_mib;
    const bySize = (a: Size, b: Size) => a.vcpus - b.vcpus || a.memory_mib - b.memory_mib;
    const tdx = this.tdxSizes.filter(fits).sort(bySize);
    if (grant.tdx_required) return tdx;
    return [...this.plainSizes.filter(fits).sort(bySize), ...tdx];
  }

  private pickSize(grant: ComputeGrant): Size {
    const fitting = this.fittingSizes(grant);
    if (fitting.length === 0) throw new InvalidRequestError(`azure: no configured ${grant.tdx_required ? "TDX " : ""}VM size has ${grant.cpu_millicores}m CPU and ${grant.ram_mib} MiB`, this.name);
    const size = fitting.find((s) => !this.unavailable.isUnavailable(this.name, grant.region, s.name));
    if (!size)
      throw new CapacityError(`azure: every fitting VM size in ${grant.region} recently reported no capacity (${fitting.map((s) => s.name).join(", ")})`, this.name).withOffering(grant.region, fitting[0]!.name);
    return size;
  }

  /** The size of an adopted VM (from the config when listed there). */
  private sizeOf(vm: VirtualMachine, grant: ComputeGrant): Size {
    const name = vm.hardwareProfile?.vmSize ?? "";
    const known = [...this.plainSizes, ...this.tdxSizes].find((s) => s.name.toLowerCase() === name.toLowerCase());
    return known ?? { name, vcpus: Math.ceil(grant.cpu_millicores / 1000), memory_mib: grant.ram_mib };
  }

  // ---- provisioning steps ---------------------------------------------------------------------

  private customData(grant: ComputeGrant, envelope: Envelope): string {
    let script: string;
    try {
      script = renderBootScript({
        requestId: grant.request_id,
        envelope,
        sshUser: this.cfg.admin_username,
        deadlineEpochSeconds: Math.floor(this.almanac.toWallMs(grant.valid_to) / 1000),
        attestation: bootAttestation(grant.tdx_required, envelope.attestation_nonce, "azure"),
      });
    } catch (e) {
      if (e instanceof BootScriptError) throw new InvalidRequestError(`azure: ${e.message}`, this.name);
      throw e;
    }
    const bytes = Buffer.byteLength(script);
    if (bytes > MAX_CUSTOM_DATA_BYTES)
      throw new InvalidRequestError(`azure: the boot script is ${bytes} bytes, more than the ${MAX_CUSTOM_DATA_BYTES} bytes Azure custom data holds (envelope env or command too large)`, this.name);
    return Buffer.from(script).toString("base64");
  }

  private vmBody(names: AzureNames, location: string, vmSize: string, confidential: boolean, nicId: string, tags: Record<string, string>, customData: string, sshKey: string): VirtualMachine {
    const image = confidential ? this.cfg.confidential_image : this.cfg.image;
    if (!image) throw new BackendError("azure: backends.azure.confidential_image is required for tdx_vm_sizes", this.name);
    const user = this.cfg.admin_username;
    return {
      location,
      tags,
      hardwareProfile: { vmSize },
      storageProfile: {
        imageReference: { publisher: image.publisher, offer: image.offer, sku: image.sku, version: image.version },
        osDisk: {
          name: names.osDisk,
          createOption: "FromImage",
          deleteOption: "Delete",
          managedDisk: {
            storageAccountType: "StandardSSD_LRS",
            // Confidential OS disk encryption bound to the vTPM: the image the boot script fetches
            // lands on this disk, so the host must not be able to read it (needs secure boot: on).
            ...(confidential ? { securityProfile: { securityEncryptionType: "DiskWithVMGuestState" } } : {}),
          },
        },
      },
      osProfile: {
        computerName: names.base,
        adminUsername: user,
        customData,
        linuxConfiguration: {
          disablePasswordAuthentication: true,
          ssh: { publicKeys: [{ path: `/home/${user}/.ssh/authorized_keys`, keyData: sshKey }] },
        },
      },
      networkProfile: { networkInterfaces: [{ id: nicId, primary: true, deleteOption: "Delete" }] },
      diagnosticsProfile: { bootDiagnostics: { enabled: true } },
      ...(confidential ? { securityProfile: { securityType: "ConfidentialVM", uefiSettings: { secureBootEnabled: true, vTpmEnabled: true } } } : {}),
    };
  }

  private async ensurePublicIp(c: Clients, names: AzureNames, location: string, tags: Record<string, string>, signal: AbortSignal, o: CallOptions): Promise<PublicIPAddress> {
    const existing = await this.call(`reading public IP ${names.pip}`, () => c.network.publicIPAddresses.get(this.rg, names.pip, { abortSignal: signal }), { ...o, notFoundIsNull: true });
    if (existing) {
      this.checkOwner(existing.tags, tags[TAG_REQUEST]!, `public IP ${names.pip}`);
      if (!isBusy(existing.provisioningState)) return existing;
    }
    return this.call(
      `creating public IP ${names.pip} in ${location}`,
      () =>
        c.network.publicIPAddresses.beginCreateOrUpdateAndWait(
          this.rg,
          names.pip,
          { location, tags, sku: { name: "Standard", tier: "Regional" }, publicIPAllocationMethod: "Static", publicIPAddressVersion: "IPv4" },
          this.lro(signal),
        ),
      o,
    );
  }

  private async ensureNic(c: Clients, names: AzureNames, location: string, pipId: string, tags: Record<string, string>, signal: AbortSignal, o: CallOptions): Promise<NetworkInterface> {
    const existing = await this.call(`reading NIC ${names.nic}`, () => c.network.networkInterfaces.get(this.rg, names.nic, { abortSignal: signal }), { ...o, notFoundIsNull: true });
    if (existing) {
      this.checkOwner(existing.tags, tags[TAG_REQUEST]!, `NIC ${names.nic}`);
      if (!isBusy(existing.provisioningState)) return existing;
    }
    return this.call(
      `creating NIC ${names.nic} in ${location} (subnet ${this.subnetFor(location)})`,
      () =>
        c.network.networkInterfaces.beginCreateOrUpdateAndWait(
        this.rg,
        names.nic,
        {
          location,
          tags,
          ipConfigurations: [
            {
              name: "ipconfig1",
              subnet: { id: this.subnetFor(location) },
              privateIPAllocationMethod: "Dynamic",
              publicIPAddress: { id: pipId, deleteOption: "Delete" },
            },
          ],
        },
        this.lro(signal),
      ),
      o,
    );
  }

  /** A VM found mid-create (a crash during the create call): poll it until it settles. */
  private async waitVmSettled(c: Clients, vmName: string, deadline: number, signal: AbortSignal, o: CallOptions): Promise<VirtualMachine | null> {
    for (;;) {
      await this.clock.sleep(this.pollMs, o.signal);
      const vm = await this.call(`reading VM ${vmName}`, () => c.compute.virtualMachines.get(this.rg, vmName, { expand: "instanceView", abortSignal: signal }), { ...o, notFoundIsNull: true });
      if (!vm || !isBusy(vm.provisioningState)) return vm;
      if (this.clock.now() > deadline)
        throw new BackendError(`azure: VM ${vmName} is still ${vm.provisioningState} after launch_timeout_seconds (${this.cfg.launch_timeout_seconds} s)`, this.name);
    }
  }

  /** SSH answers with a banner, or the VM powers off first (a short workload may be done already). */
  private async waitReady(names: AzureNames, host: string, requestId: string, signal: AbortSignal): Promise<"ssh" | "stopped"> {
    const ctl = new AbortController();
    const onAbort = () => ctl.abort(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      const ssh = waitForSsh(host, this.cfg.ssh_port, { timeoutMs: this.cfg.ready_timeout_seconds * 1000, intervalMs: this.pollMs, signal: ctl.signal, clock: this.clock });
      const stopped = this.watcher().waitFor(this.rg, names.vm.toLowerCase(), { until: (s) => STOPPED.has(s.power ?? ""), signal: ctl.signal });
      const first = await Promise.race([ssh.then(() => "ssh" as const), stopped.then((r) => (r.kind === "match" ? ("stopped" as const) : ("missing" as const)))]);
      if (first === "stopped") this.log.info({ request_id: requestId, vm: names.vm }, "azure VM powered off before SSH answered: the workload already ended");
      if (first === "missing") throw new NotFoundError(`azure: VM ${names.vm} disappeared while waiting for SSH`, this.name);
      return first;
    } catch (e) {
      if (signal.aborted) throw abortError(signal);
      if (e instanceof SshNotReadyError) throw new BackendError(`azure: VM ${names.vm} is running but ${e.message} (ready_timeout_seconds; check the subnet's network security group allows SSH)`, this.name);
      throw e;
    } finally {
      signal.removeEventListener("abort", onAbort);
      ctl.abort();
    }
  }

  // ---- watching -------------------------------------------------------------------------------

  private watcher(): BatchWatcher<VmStatus> {
    if (this.closed) throw new BackendError("azure backend is closed", this.name);
    return (this.watcherP ??= new BatchWatcher<VmStatus>({
      intervalMs: this.pollMs,
      clock: this.clock,
      describe: (scope, ids, signal) => this.describeVms(scope, ids, signal),
      onPoll: (e) => this.onPoll(e),
    }));
  }

  private onPoll(e: PollEvent): void {
    if (e.ok || (e.consecutiveErrors !== 1 && e.consecutiveErrors % 10 !== 0)) return;
    const err = mapArmError(e.error, { what: `listing VMs in resource group ${e.scope}`, backend: this.name });
    this.log.warn({ resource_group: e.scope, failures: e.consecutiveErrors, err: { kind: err.kind, message: err.message } }, "azure VM status poll failed; retrying");
  }

  /**
   * One batched list of the VMs' power states: `listAll` with `statusOnly=true`, the documented
   * status call. (`list(rg, {expand: "instanceView"})` is documented as valid only with a
   * `$filter`; ARM ignoring the expand would leave every power state null and no exit seen.)
   * Subscription-wide, filtered to our resource group here: still one call per interval.
   */
  private async describeVms(rg: string, ids: readonly string[], signal: AbortSignal): Promise<ReadonlyMap<string, VmStatus>> {
    const want = new Set(ids);
    const out = new Map<string, VmStatus>();
    const c = await this.clients();
    signal = AbortSignal.any([signal, AbortSignal.timeout(READ_TIMEOUT_MS)]);
    const add = (vm: VirtualMachine) => {
      const n = vm.name?.toLowerCase();
      if (n && want.has(n)) out.set(n, statusOf(vm));
    };
    for await (const vm of c.compute.virtualMachines.listAll({ statusOnly: "true", abortSignal: signal })) {
      if (parseResourceId(vm.id)?.resourceGroup.toLowerCase() === rg.toLowerCase()) add(vm);
    }
    return out;
  }

  /**
   * The SSH host key fingerprint the guest's boot script reported on the serial console, read
   * until it appears or host_key_timeout_seconds pass; null when there is none (logged: the grant
   * goes on without it, its user falls back to trusting the first connection).
   */
  private async readHostKey(vmName: string, requestId: string, signal: AbortSignal): Promise<string | null> {
    const found = await waitForHostKey(this.serialReader(vmName, signal), requestId, { timeoutMs: this.cfg.host_key_timeout_seconds * 1000, intervalMs: this.pollMs, signal, clock: this.clock });
    if (found.fingerprint === null) this.log.warn({ request_id: requestId, vm: vmName, missing: found.missing }, "azure: no SSH host key fingerprint for the VM; host_key_sha256 stays empty");
    return found.fingerprint;
  }

  /**
   * The serial console log. Each read takes a slot only while it runs (not across the pauses): a
   * burst of launches and exits shares the same bound on concurrent boot-diagnostics calls.
   */
  private serialReader(vmName: string, signal: AbortSignal): () => Promise<string> {
    return () => this.serialReads.run(() => this.readSerialLog(vmName, signal), signal);
  }

  /** The exit marker from the serial console, via boot diagnostics; null when there is none. */
  private readMarker(vmName: string, requestId: string, signal: AbortSignal): Promise<ReturnType<typeof parseMarker>> {
    return this.serialReads.run(() => this.readMarkerNow(vmName, requestId, signal), signal);
  }

  private async readMarkerNow(vmName: string, requestId: string, signal: AbortSignal): Promise<ReturnType<typeof parseMarker>> {
    for (let attempt = 1; attempt <= SERIAL_LOG_READS; attempt++) {
      try {
        const marker = parseMarker(await this.readSerialLog(vmName, signal), requestId);
        if (marker) return marker;
      } catch (e) {
        if (signal.aborted) throw abortError(signal);
        if (e instanceof ConsoleUnavailableError) {
          this.log.warn({ request_id: requestId, vm: vmName, reason: e.message }, "azure: the VM's serial console log cannot be read; its exit code is unknown");
          return null;
        }
        const err = e instanceof BlobError ? e : mapArmError(e, { what: `reading the serial console of VM ${vmName}`, backend: this.name });
        this.log.warn({ request_id: requestId, vm: vmName, err: { kind: err instanceof BlobError ? "blob" : err.kind, message: err.message } }, "azure: cannot read the serial console log");
        const retry = err instanceof BlobError ? err.transient : err instanceof TransientError;
        if (!retry) return null;
      }
      if (attempt < SERIAL_LOG_READS) await this.clock.sleep(this.pollMs, signal);
    }
    this.log.warn({ request_id: requestId, vm: vmName }, "azure: the VM stopped without an exit marker on its serial console; its exit code is unknown");
    return null;
  }

  /**
   * The VM's serial console log (its last MiB) through boot diagnostics: ARM hands out a short-lived
   * SAS URL for the blob, which is then fetched. A blob that does not exist yet (nothing written
   * so far) is empty text. Rejects with ConsoleUnavailableError when the log can never be read
   * (boot diagnostics disabled on the VM, no serial log offered), with a BlobError or a mapped
   * BackendError (TransientError for throttling and 5xx) otherwise, with an AbortError on `signal`.
   */
  private async readSerialLog(vmName: string, signal: AbortSignal): Promise<string> {
    const c = await this.clients();
    const bounded = AbortSignal.any([signal, AbortSignal.timeout(READ_TIMEOUT_MS)]);
    let url: string | undefined;
    try {
      const uris = await c.compute.virtualMachines.retrieveBootDiagnosticsData(this.rg, vmName, { sasUriExpirationTimeInMinutes: 5, abortSignal: bounded });
      url = uris.serialConsoleLogBlobUri;
    } catch (e) {
      if (signal.aborted) throw abortError(signal);
      // Our VMs are created with boot diagnostics on; an adopted or hand-edited one may have them
      // off, and no amount of retrying makes its console readable.
      if (isBootDiagnosticsDisabled(e)) throw new ConsoleUnavailableError(`boot diagnostics are not enabled on VM ${vmName} (${describeArmError(e).message})`);
      throw mapArmError(e, { what: `reading the serial console of VM ${vmName}`, backend: this.name });
    }
    if (!url) throw new ConsoleUnavailableError(`ARM offers no serial console log for VM ${vmName}`);
    try {
      return await this.fetchBlobTail(url, bounded);
    } catch (e) {
      if (signal.aborted) throw abortError(signal);
      throw e;
    }
  }

  /** GET a boot-diagnostics blob (a SAS URL: never logged) and return its last MiB as text. */
  private fetchBlobTail(url: string, signal: AbortSignal): Promise<string> {
    return new Promise((resolve, reject) => {
      const u = new URL(url);
      if (u.protocol !== "https:") return reject(new ConsoleUnavailableError("the serial console log URL ARM gave is not https"));
      const req = https.get(u, { signal, agent: this.blobAgent(), timeout: READ_TIMEOUT_MS, headers: { "x-ms-version": "2021-08-06" } }, (res) => {
        const status = res.statusCode ?? 0;
        // Boot diagnostics create the blob on the guest's first console output: until then the
        // log is empty, not unreadable.
        if (status === 404) {
          res.resume();
          return resolve("");
        }
        if (status !== 200) {
          res.resume();
          return reject(new BlobError(`the boot diagnostics blob answered HTTP ${status}`, status === 429 || status >= 500));
        }
        const chunks: Buffer[] = [];
        let kept = 0;
        let total = 0;
        res.on("data", (chunk: Buffer) => {
          total += chunk.length;
          if (total > MAX_SERIAL_LOG_BYTES) return res.destroy(new BlobError("the serial console log is larger than 8 MiB", false));
          chunks.push(chunk);
          kept += chunk.length;
          while (kept - (chunks[0]?.length ?? 0) >= SERIAL_TAIL_BYTES) kept -= chunks.shift()!.length;
        });
        res.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
        res.on("error", (e) => reject(e instanceof BlobError ? e : new BlobError(`reading the boot diagnostics blob failed: ${(e as NodeJS.ErrnoException).code ?? e.name}`, true)));
      });
      req.on("timeout", () => req.destroy(new BlobError("the boot diagnostics blob did not answer in time", true)));
      // Never put the URL in a message: its query string is a SAS credential.
      req.on("error", (e) => reject(e instanceof BlobError ? e : new BlobError(`fetching the boot diagnostics blob failed: ${(e as NodeJS.ErrnoException).code ?? e.name}`, true)));
    });
  }

  // ---- deleting -------------------------------------------------------------------------------

  /** Deletes wait for ARM to confirm; each is bounded so a stuck operation is retried, not waited on forever. */
  private async deleteOne(what: string, fn: (o: { updateIntervalInMs: number; abortSignal: AbortSignal }) => Promise<void>): Promise<void> {
    const limitS = this.cfg.launch_timeout_seconds;
    const signal = AbortSignal.timeout(limitS * 1000);
    await this.call(`deleting ${what}`, () => fn({ updateIntervalInMs: this.pollMs, abortSignal: signal }), { notFoundIsNull: true, limit: `launch_timeout_seconds (${limitS} s)` });
  }
  private deleteVm(c: Clients, name: string): Promise<void> {
    return this.deleteOne(`VM ${name}`, (o) => c.compute.virtualMachines.beginDeleteAndWait(this.rg, name, o));
  }
  private deleteNic(c: Clients, name: string): Promise<void> {
    return this.deleteOne(`NIC ${name}`, (o) => c.network.networkInterfaces.beginDeleteAndWait(this.rg, name, o));
  }
  private deletePublicIp(c: Clients, name: string): Promise<void> {
    return this.deleteOne(`public IP ${name}`, (o) => c.network.publicIPAddresses.beginDeleteAndWait(this.rg, name, o));
  }
  private deleteDisk(c: Clients, name: string): Promise<void> {
    return this.deleteOne(`disk ${name}`, (o) => c.compute.disks.beginDeleteAndWait(this.rg, name, o));
  }

  private async sweep(live: ReadonlySet<string>): Promise<void> {
    const c = await this.clients();
    const now = this.clock.now();
    const graceMs = this.cfg.orphan_grace_seconds * 1000;
    const liveHashes = new Set([...live, ...this.active].map((r) => this.naming.requestHash(r)));
    const isLive = (requestId: string | undefined, hash: string | undefined) =>
      (requestId !== undefined && (live.has(requestId) || this.active.has(requestId))) || (hash !== undefined && liveHashes.has(hash));

    type Orphan = { kind: "vm" | "nic" | "pip" | "disk"; name: string; requestId: string | undefined };
    const orphans: Orphan[] = [];
    const seenNow = new Set<string>();
    const consider = (kind: Orphan["kind"], name: string | undefined, tags: Record<string, string> | undefined, created: Date | undefined, byNameOnly: boolean) => {
      if (!name) return;
      const ours = tags?.[TAG_PROVIDER] === this.providerId;
      const parsed = this.naming.parse(name);
      if (!ours && !(byNameOnly && parsed)) return;
      const requestId = ours ? tags?.[TAG_REQUEST] : undefined;
      const hash = parsed?.hash ?? (requestId !== undefined ? this.naming.requestHash(requestId) : undefined);
      if (isLive(requestId, hash)) {
        if (kind === "vm" && requestId !== undefined) this.active.add(requestId);
        return;
      }
      const key = `${kind}/${name.toLowerCase()}`;
      seenNow.add(key);
      const createdMs = Date.parse(tags?.[TAG_CREATED] ?? "") || created?.getTime() || NaN;
      const age = Number.isFinite(createdMs) ? now - createdMs : now - (this.firstSeen.get(key) ?? (this.firstSeen.set(key, now), now));
      if (age < graceMs) return;
      orphans.push({ kind, name, requestId });
    };

    const abortSignal = AbortSignal.timeout(SWEEP_LIST_TIMEOUT_MS);
    for await (const vm of c.compute.virtualMachines.list(this.rg, { abortSignal })) consider("vm", vm.name, vm.tags, vm.timeCreated, false);
    for await (const nic of c.network.networkInterfaces.list(this.rg, { abortSignal })) consider("nic", nic.name, nic.tags, undefined, false);
    for await (const pip of c.network.publicIPAddresses.list(this.rg, { abortSignal })) consider("pip", pip.name, pip.tags, undefined, false);
    for await (const d of c.compute.disks.listByResourceGroup(this.rg, { abortSignal })) {
      // Never a disk some VM still uses; ARM would refuse anyway.
      if (d.managedBy) continue;
      consider("disk", d.name, d.tags, d.timeCreated, true);
    }
    for (const k of this.firstSeen.keys()) if (!seenNow.has(k)) this.firstSeen.delete(k);
    if (orphans.length === 0) return;

    this.log.warn({ orphans: orphans.map((o) => `${o.kind}:${o.name}${o.requestId ? ` (request ${o.requestId})` : ""}`) }, "azure: deleting orphaned resources (no live grant owns them)");
    const failures: string[] = [];
    // VMs first (their deletion frees NICs, IPs and disks), then the leftovers.
    for (const kind of ["vm", "nic", "pip", "disk"] as const) {
      const batch = orphans.filter((o) => o.kind === kind);
      await mapLimit(batch, SWEEP_CONCURRENCY, async (o) => {
        try {
          if (kind === "vm") await this.deleteVm(c, o.name);
          else if (kind === "nic") await this.deleteNic(c, o.name);
          else if (kind === "pip") await this.deletePublicIp(c, o.name);
          else await this.deleteDisk(c, o.name);
          this.metrics?.orphanSwept(this.name, kind);
          this.firstSeen.delete(`${kind}/${o.name.toLowerCase()}`);
          if (o.requestId !== undefined) this.active.delete(o.requestId);
        } catch (e) {
          failures.push(`${kind} ${o.name}: ${(e as Error).message}`);
        }
      });
    }
    if (failures.length > 0) throw new TransientError(`azure: orphan sweep could not delete ${failures.length} resource(s); retrying at the next reconcile: ${failures.slice(0, 3).join("; ")}`, this.name);
  }

  // ---- SDK plumbing ---------------------------------------------------------------------------

  private lro(signal?: AbortSignal): { updateIntervalInMs: number; abortSignal?: AbortSignal } {
    return { updateIntervalInMs: this.pollMs, ...(signal ? { abortSignal: signal } : {}) };
  }

  /**
   * Run one SDK call and map its failure to a typed error. `notFoundIsNull` turns a 404 into
   * null (reads of something that may not exist yet, deletes of something already gone). An
   * abort is passed through only when `signal` (the caller's) was aborted; any other abort is
   * one of our own time limits and becomes a BackendError naming it.
   */
  private async call<T>(what: string, fn: () => Promise<T>, o: CallOptions & { notFoundIsNull: true }): Promise<T | null>;
  private async call<T>(what: string, fn: () => Promise<T>, o?: CallOptions & { notFoundIsNull?: false }): Promise<T>;
  private async call<T>(what: string, fn: () => Promise<T>, o: CallOptions & { notFoundIsNull?: boolean } = {}): Promise<T | null> {
    const op = what.split(" ").slice(0, 2).join(" "); // e.g. "creating NIC": bounded label values
    try {
      const r = await fn();
      this.metrics?.apiCall(this.name, op, "ok");
      return r;
    } catch (e) {
      const rest = e as { code?: unknown; statusCode?: unknown };
      this.metrics?.apiCall(this.name, op, typeof rest.code === "string" ? rest.code : typeof rest.statusCode === "number" ? String(rest.statusCode) : "error");
      if (rest.statusCode === 429) this.metrics?.throttled(this.name, op);
      const name = (e as Error | null)?.name;
      if (name === "AbortError" || name === "TimeoutError") {
        if (o.signal?.aborted) throw abortError(o.signal);
        if (o.limit) throw new BackendError(`azure: ${what} did not finish within ${o.limit}`, this.name);
        throw e;
      }
      if (o.notFoundIsNull && isNotFound(e)) return null;
      throw mapArmError(e, { what, backend: this.name, ...(o.offering ? { offering: o.offering } : {}) });
    }
  }

  /**
   * A resource with our deterministic name is ours by construction; its tags confirm it. One
   * tagged for another provider or request is never adopted or deleted. Missing tags (removed
   * by hand or by a policy) only warn: refusing would leave a billed VM behind.
   */
  private checkOwner(tags: Record<string, string> | undefined, requestId: string, what: string): void {
    const provider = tags?.[TAG_PROVIDER];
    const request = tags?.[TAG_REQUEST];
    if (provider === this.providerId && request === requestId) return;
    if (provider === undefined && request === undefined) {
      this.log.warn({ request_id: requestId, resource: what }, "azure: resource has this request's deterministic name but no compute-bridge tags; treating it as this request's");
      return;
    }
    throw new BackendError(
      `azure: ${what} in resource group ${this.rg} is tagged for provider ${provider ?? "(none)"} / request ${request ?? "(none)"}, not ${this.providerId} / ${requestId}; refusing to adopt or delete it`,
      this.name,
    );
  }

  private clients(): Promise<Clients> {
    if (!this.clientsP) {
      this.clientsP = this.createClients();
      this.clientsP.catch(() => (this.clientsP = null));
    }
    return this.clientsP;
  }

  private async createClients(): Promise<Clients> {
    let sdk: [typeof import("@azure/arm-compute"), typeof import("@azure/arm-network")];
    try {
      sdk = await Promise.all([import("@azure/arm-compute"), import("@azure/arm-network")]);
    } catch (e) {
      throw new BackendError(`azure: cannot load the Azure SDK (@azure/arm-compute, @azure/arm-network): ${(e as Error).message}`, this.name);
    }
    const [{ ComputeManagementClient }, { NetworkManagementClient }] = sdk;
    let credential: TokenCredential;
    try {
      credential = this.opts.credential ?? (await this.buildCredential());
    } catch (e) {
      if (e instanceof BackendError) throw e;
      throw new CredentialError(`azure: cannot set up the credential from backends.azure: ${redact((e as Error).message)}`, this.name);
    }
    const endpoint = this.cfg.endpoint?.replace(/\/+$/, "");
    // Tokens for the ARM endpoint in use. Left to themselves the clients disagree: the compute
    // client asks for the public cloud's audience whatever its endpoint, which a sovereign cloud's
    // authority refuses; the network client asks for its endpoint's.
    const scopes = [`${endpoint ?? "https://management.azure.com"}/.default`];
    const options = {
      ...(endpoint ? { endpoint } : {}),
      credentials: { scopes },
      credentialScopes: scopes,
      ...this.armAgent(),
      retryOptions: {
        maxRetries: this.opts.maxRetries ?? 3,
        ...(this.opts.retryDelayInMs !== undefined ? { retryDelayInMs: this.opts.retryDelayInMs } : {}),
        maxRetryDelayInMs: 60_000,
      },
      userAgentOptions: { userAgentPrefix: `compute-bridge/${VERSION}` },
    };
    return {
      compute: new ComputeManagementClient(credential, this.cfg.subscription_id, options),
      network: new NetworkManagementClient(credential, this.cfg.subscription_id, options),
    };
  }

  /** The public roots plus ca_file as one TLS context, built once; null without ca_file. */
  private secureContext(): tls.SecureContext | null {
    // Building a TLS context from ~150 PEM roots costs ~50 ms of CPU: once, not per connection.
    if (this.secureContextCache === undefined) this.secureContextCache = this.extraCa ? tls.createSecureContext({ ca: [...tls.rootCertificates, this.extraCa] }) : null;
    return this.secureContextCache;
  }

  private blobAgent(): https.Agent {
    const secureContext = this.secureContext();
    return (this.blobAgentP ??= new https.Agent({ keepAlive: true, maxSockets: SERIAL_READ_CONCURRENCY, ...(secureContext ? { secureContext } : {}) }));
  }

  /**
   * With ca_file, the ARM clients get one keep-alive agent holding the prebuilt TLS context. The
   * pipeline's `tlsOptions: { ca }` would instead make Node build a context from every root for
   * each new connection (~50 ms of CPU each) and hash the whole CA list into the agent key of every
   * request: a restart resuming 100 Azure grants blocked the event loop for seconds.
   */
  private armAgent(): { agent?: https.Agent } {
    const secureContext = this.secureContext();
    if (!secureContext) return {};
    return { agent: (this.armAgentP ??= new https.Agent({ keepAlive: true, secureContext })) };
  }

  private tlsOptions(): { tlsOptions?: { ca: string[] } } {
    // `ca` replaces Node's trust store, so keep the public roots next to the extra CA.
    return this.extraCa ? { tlsOptions: { ca: [...tls.rootCertificates, this.extraCa] } } : {};
  }

  /** Service principal (client secret) or managed identity (system- or user-assigned), from the config only. */
  private async buildCredential(): Promise<TokenCredential> {
    const identity = await import("@azure/identity");
    const common = this.tlsOptions();
    if (this.cfg.managed_identity) {
      const clientId = this.cfg.managed_identity_client_id;
      return new identity.ManagedIdentityCredential({ ...common, ...(clientId ? { clientId } : {}) });
    }
    const tenant = this.cfg.tenant_id;
    const client = this.cfg.client_id;
    const secret = readSecret(this.configDir, "backends.azure.client_secret", { file: this.cfg.client_secret_file, env: this.cfg.client_secret_env });
    if (!tenant || !client || !secret) throw new CredentialError("azure: backends.azure needs tenant_id, client_id and client_secret_file (or managed_identity = true)", this.name);
    const authorityHost = this.cfg.authority_host?.replace(/\/+$/, "");
    const custom = authorityHost !== undefined && !KNOWN_AUTHORITY_HOSTS.has(new URL(authorityHost).hostname);
    return new identity.ClientSecretCredential(tenant, client, secret, {
      ...common,
      ...(authorityHost ? { authorityHost } : {}),
      // A private authority (Azure Stack, tests) cannot be validated against login.microsoft.com.
      ...(custom ? { disableInstanceDiscovery: true } : {}),
    });
  }
}

// ---- helpers ------------------------------------------------------------------------------------

/** A failed read of a boot-diagnostics blob (never carries the SAS URL). */
class BlobError extends Error {
  override name = "BlobError";
  constructor(
    message: string,
    readonly transient: boolean,
  ) {
    super(message);
  }
}

function readCaFile(file: string): string {
  try {
    const pem = readFileSync(file, "utf8");
    if (!pem.includes("-----BEGIN CERTIFICATE-----")) throw new Error("no PEM certificate in it");
    return pem;
  } catch (e) {
    throw new SecretError(`backends.azure.ca_file: cannot use ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

function isBusy(state: string | undefined): boolean {
  const s = (state ?? "").toLowerCase();
  return s === "creating" || s === "updating" || s === "migrating";
}

function statusOf(vm: VirtualMachine): VmStatus {
  let power: string | null = null;
  let failureCode: string | null = null;
  for (const st of vm.instanceView?.statuses ?? []) {
    const code = st.code ?? "";
    if (code.startsWith("PowerState/")) power = code.slice("PowerState/".length).toLowerCase();
    const f = /^ProvisioningState\/failed\/(.+)$/i.exec(code);
    if (f) failureCode = f[1]!;
  }
  return { power, provisioning: vm.provisioningState ?? null, failureCode };
}

function isStoppedOrFailed(s: VmStatus): boolean {
  const p = (s.provisioning ?? "").toLowerCase();
  return STOPPED.has(s.power ?? "") || p === "failed" || p === "deleting";
}

function expired(nowMs: number): ExitObservation {
  return { kind: "expired", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: new Date(nowMs).toISOString(), failure: null };
}

async function mapLimit<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

