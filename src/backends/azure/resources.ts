/**
 * The ARM calls of the Azure adapter (adapter.ts): the public IP, NIC and VM of a request, their
 * deletes (each confirmed by ARM, bounded so a stuck operation is retried rather than waited on),
 * and one wrapper that maps every failure to a typed error and counts it.
 */
import type { VirtualMachine } from "@azure/arm-compute";
import type { NetworkInterface, PublicIPAddress } from "@azure/arm-network";
import type { AzureConfig } from "../../config/schema.js";
import { abortError, type Clock } from "../../util/clock.js";
import type { Logger } from "../../util/logger.js";
import { BackendError, CredentialError, InvalidRequestError, type BackendMetrics } from "../backend.js";
import type { Clients } from "./clients.js";
import { isAzureAuthError, isNotFound, mapArmError } from "./errors.js";
import { TAG_PROVIDER, TAG_REQUEST, type AzureNames } from "./naming.js";

export interface CallOptions {
  offering?: { region: string; size: string };
  /** The caller's signal: an abort of it is passed through as an AbortError. */
  signal?: AbortSignal;
  /** The time limit behind any other abort, for the message (e.g. "launch_timeout_seconds (900 s)"). */
  limit?: string;
  /** A confidential VM's create: the configured image, named when ARM refuses it (errors.ts). */
  confidentialImage?: string;
}

export const lc = (s: string | undefined | null) => (s ?? "").toLowerCase();

/** ARM is still working on it (a create or update in flight). */
export function isBusy(state: string | undefined): boolean {
  const s = lc(state);
  return s === "creating" || s === "updating" || s === "migrating";
}

export class ArmResources {
  /** Set while ARM refuses the bridge's token (401, token acquisition): new grants are declined. */
  refused: string | null = null;
  private readonly rg: string;

  constructor(
    private readonly cfg: AzureConfig,
    private readonly providerId: string,
    private readonly name: string,
    private readonly pollMs: number,
    private readonly clock: Clock,
    private readonly log: Logger,
    private readonly metrics: BackendMetrics | undefined,
  ) {
    this.rg = cfg.resource_group;
  }

  vmBody(names: AzureNames, location: string, vmSize: string, confidential: boolean, nicId: string, tags: Record<string, string>, customData: string, sshKey: string): VirtualMachine {
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
        linuxConfiguration: { disablePasswordAuthentication: true, ssh: { publicKeys: [{ path: `/home/${user}/.ssh/authorized_keys`, keyData: sshKey }] } },
      },
      networkProfile: { networkInterfaces: [{ id: nicId, primary: true, deleteOption: "Delete" }] },
      diagnosticsProfile: { bootDiagnostics: { enabled: true } },
      ...(confidential ? { securityProfile: { securityType: "ConfidentialVM", uefiSettings: { secureBootEnabled: true, vTpmEnabled: true } } } : {}),
    };
  }

  async ensurePublicIp(c: Clients, names: AzureNames, location: string, tags: Record<string, string>, signal: AbortSignal, o: CallOptions): Promise<PublicIPAddress> {
    const existing = await this.call(`reading public IP ${names.pip}`, () => c.network.publicIPAddresses.get(this.rg, names.pip, { abortSignal: signal }), { ...o, notFoundIsNull: true });
    if (existing) {
      this.checkOwner(existing.tags, tags[TAG_REQUEST]!, `public IP ${names.pip}`);
      if (!isBusy(existing.provisioningState)) return existing;
    }
    const body = { location, tags, sku: { name: "Standard", tier: "Regional" }, publicIPAllocationMethod: "Static", publicIPAddressVersion: "IPv4" } as const;
    return this.call(`creating public IP ${names.pip} in ${location}`, () => c.network.publicIPAddresses.beginCreateOrUpdateAndWait(this.rg, names.pip, body, this.lro(signal)), o);
  }

  async ensureNic(c: Clients, names: AzureNames, location: string, pipId: string, tags: Record<string, string>, signal: AbortSignal, o: CallOptions): Promise<NetworkInterface> {
    const existing = await this.call(`reading NIC ${names.nic}`, () => c.network.networkInterfaces.get(this.rg, names.nic, { abortSignal: signal }), { ...o, notFoundIsNull: true });
    if (existing) {
      this.checkOwner(existing.tags, tags[TAG_REQUEST]!, `NIC ${names.nic}`);
      if (!isBusy(existing.provisioningState)) return existing;
    }
    const s = this.cfg.subnet_id;
    const subnet = typeof s === "string" ? s : s[location];
    if (!subnet) throw new InvalidRequestError(`backends.azure.subnet_id has no subnet for region ${location}`, this.name);
    const ipConfigurations = [{ name: "ipconfig1", subnet: { id: subnet }, privateIPAllocationMethod: "Dynamic", publicIPAddress: { id: pipId, deleteOption: "Delete" } }] as const;
    return this.call(`creating NIC ${names.nic} in ${location} (subnet ${subnet})`, () => c.network.networkInterfaces.beginCreateOrUpdateAndWait(this.rg, names.nic, { location, tags, ipConfigurations: [...ipConfigurations] }, this.lro(signal)), o);
  }

  /** The public IP's address, read until ARM has assigned one (within the launch deadline). */
  async address(c: Clients, names: AzureNames, pip: PublicIPAddress, deadlineMs: number, signal: AbortSignal, launch: AbortSignal, o: CallOptions): Promise<string> {
    while (!pip.ipAddress) {
      if (this.clock.now() > deadlineMs) throw new BackendError(`azure: public IP ${names.pip} has no address after launch_timeout_seconds (${this.cfg.launch_timeout_seconds} s)`, this.name);
      await this.clock.sleep(this.pollMs, signal);
      pip = await this.call(`reading public IP ${names.pip}`, () => c.network.publicIPAddresses.get(this.rg, names.pip, { abortSignal: launch }), o);
    }
    return pip.ipAddress;
  }

  getVm(c: Clients, name: string, o: CallOptions, signal: AbortSignal): Promise<VirtualMachine | null> {
    return this.call(`reading VM ${name}`, () => c.compute.virtualMachines.get(this.rg, name, { expand: "instanceView", abortSignal: signal }), { ...o, notFoundIsNull: true });
  }

  /** Deletes wait for ARM to confirm; each is bounded so a stuck operation is retried, not waited on forever. */
  private async deleteOne(what: string, fn: (o: { updateIntervalInMs: number; abortSignal: AbortSignal }) => Promise<void>): Promise<void> {
    const limitS = this.cfg.launch_timeout_seconds;
    await this.call(`deleting ${what}`, () => fn({ updateIntervalInMs: this.pollMs, abortSignal: AbortSignal.timeout(limitS * 1000) }), { notFoundIsNull: true, limit: `launch_timeout_seconds (${limitS} s)` });
  }
  deleteVm(c: Clients, name: string): Promise<void> {
    return this.deleteOne(`VM ${name}`, (o) => c.compute.virtualMachines.beginDeleteAndWait(this.rg, name, o));
  }
  deleteNic(c: Clients, name: string): Promise<void> {
    return this.deleteOne(`NIC ${name}`, (o) => c.network.networkInterfaces.beginDeleteAndWait(this.rg, name, o));
  }
  deletePublicIp(c: Clients, name: string): Promise<void> {
    return this.deleteOne(`public IP ${name}`, (o) => c.network.publicIPAddresses.beginDeleteAndWait(this.rg, name, o));
  }
  deleteDisk(c: Clients, name: string): Promise<void> {
    return this.deleteOne(`disk ${name}`, (o) => c.compute.disks.beginDeleteAndWait(this.rg, name, o));
  }

  lro(signal?: AbortSignal): { updateIntervalInMs: number; abortSignal?: AbortSignal } {
    return { updateIntervalInMs: this.pollMs, ...(signal ? { abortSignal: signal } : {}) };
  }

  /**
   * One SDK call, its failure mapped to a typed error. `notFoundIsNull` turns a 404 into null. An
   * abort is passed through only when `signal` (the caller's) was aborted; any other abort is one
   * of our own time limits and becomes a BackendError naming it. A refused token or a 401 is
   * remembered (canSatisfy declines) until a call succeeds.
   */
  async call<T>(what: string, fn: () => Promise<T>, o: CallOptions & { notFoundIsNull: true }): Promise<T | null>;
  async call<T>(what: string, fn: () => Promise<T>, o?: CallOptions & { notFoundIsNull?: false }): Promise<T>;
  async call<T>(what: string, fn: () => Promise<T>, o: CallOptions & { notFoundIsNull?: boolean } = {}): Promise<T | null> {
    const op = what.split(" ").slice(0, 2).join(" "); // e.g. "creating NIC": bounded label values
    try {
      const r = await fn();
      this.metrics?.apiCall(this.name, op, "ok");
      this.refused = null;
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
      const err = mapArmError(e, { what, backend: this.name, ...(o.offering ? { offering: o.offering } : {}), ...(o.confidentialImage ? { confidentialImage: o.confidentialImage } : {}) });
      if (err instanceof CredentialError && (isAzureAuthError(e) || rest.statusCode === 401)) {
        if (this.refused === null) this.log.error({ err: { kind: err.kind, message: err.message } }, "ARM refused the bridge's credentials; new grants are declined until a call succeeds");
        this.refused = err.message;
      }
      throw err;
    }
  }

  /** Tagged for this provider and request, or untagged (a policy may strip tags): ours. */
  isOwn(tags: Record<string, string> | undefined, requestId: string): boolean {
    const provider = tags?.[TAG_PROVIDER];
    const request = tags?.[TAG_REQUEST];
    return (provider === this.providerId && request === requestId) || (provider === undefined && request === undefined);
  }

  /**
   * A resource with our deterministic name is ours by construction; its tags confirm it. One
   * tagged for another provider or request is never adopted or deleted. Missing tags (removed
   * by hand or by a policy) only warn: refusing would leave a billed VM behind.
   */
  checkOwner(tags: Record<string, string> | undefined, requestId: string, what: string): void {
    if (!this.isOwn(tags, requestId))
      throw new BackendError(
        `azure: ${what} in resource group ${this.rg} is tagged for provider ${tags?.[TAG_PROVIDER] ?? "(none)"} / request ${tags?.[TAG_REQUEST] ?? "(none)"}, not ${this.providerId} / ${requestId}; refusing to adopt or delete it`,
        this.name,
      );
    if (tags?.[TAG_PROVIDER] === undefined) this.log.warn({ request_id: requestId, resource: what }, "azure: resource has this request's deterministic name but no compute-bridge tags; treating it as this request's");
  }
}
