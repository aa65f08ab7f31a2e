/**
 * ArmFake: a fake Azure Resource Manager for Microsoft.Compute and Microsoft.Network that
 * speaks the real ARM REST wire protocol over HTTPS on 127.0.0.1 (random port), meant to be
 * driven by the REAL `ComputeManagementClient` (@azure/arm-compute 24.1.0) and
 * `NetworkManagementClient` (@azure/arm-network 36.0.0). Node built-ins only; the TLS
 * certificate comes from `makeTestCert()` (openssl CLI) in ./tls.ts.
 *
 * ---------------------------------------------------------------------------------------------
 * Facts verified by experiment on this machine (Node 20.20, the exact SDK versions above):
 *
 *  Client options that work (both clients):
 *    new ComputeManagementClient(cred, subscriptionId, { endpoint, tlsOptions: { ca } })
 *    new NetworkManagementClient(cred, subscriptionId, { endpoint, tlsOptions: { ca } })
 *  - `endpoint` (not `$host`) routes requests for BOTH clients. arm-network 36 is an
 *    autorest/core-client SDK whose `$host` path parameter never appears in its paths; its
 *    ServiceClient base URL is `options.endpoint`.
 *  - `tlsOptions` (core-rest-pipeline PipelineOptions.tlsOptions -> tlsPolicy) is the option
 *    the pipeline uses; `{ ca }` with the self-signed cert is enough. The bearer-token policy
 *    refuses http://, hence HTTPS.
 *  - The credential may be a plain `{ getToken }` object (see `fakeTokenCredential`); the
 *    request carries `Authorization: Bearer <token>` on every ARM call including LRO polls.
 *  - Wire api-versions: Microsoft.Compute virtualMachines 2026-03-01, disks 2025-01-02,
 *    Microsoft.Network 2025-05-01. The fake checks api-version for presence only.
 *
 *  Flattening (callers pass flattened models, the wire nests them under `properties`):
 *  - VM: top-level `hardwareProfile`, `storageProfile`, `osProfile`, `networkProfile`,
 *    `securityProfile`, `diagnosticsProfile`, `priority`, `userData`, ... are sent as
 *    `{ location, tags, zones, properties: { hardwareProfile, ... } }`.
 *    `networkProfile.networkInterfaces[i]` = `{ id, properties: { primary, deleteOption } }`
 *    (`primary`/`deleteOption` are flattened again inside each reference).
 *    `storageProfile.osDisk.managedDisk.securityProfile.securityEncryptionType` and
 *    `securityProfile.securityType` are NOT flattened (plain nested objects).
 *  - NIC: `ipConfigurations[i]` = `{ name, properties: { subnet: { id, properties: {} },
 *    publicIPAddress: { id, properties: { deleteOption } }, privateIPAllocationMethod } }`.
 *  - Public IP: `{ location, sku, properties: { publicIPAllocationMethod, ... } }`; the
 *    response's `properties.ipAddress` surfaces as `pip.ipAddress`.
 *  - Responses are un-flattened the same way (`vm.provisioningState`, `vm.instanceView`).
 *
 *  LRO behaviour (core-lro 3.3.1 for compute, 2.7.2 for network):
 *  - PUT -> 201 + `Azure-AsyncOperation: <absolute url>`; the SDK GETs that URL (adding
 *    api-version if missing) until `status` is terminal, then GETs the resource (PUT only).
 *  - 202 + `Location`: polled while 202; any 2xx other than 202 ends it (body = result).
 *  - `{status:'Failed', error:{code,message}}` rejects with a plain `Error` whose message is
 *    `The long-running operation has failed. <code>. <message>` (no `code` property).
 *  - A non-2xx ARM reply `{error:{code,message}}` rejects with a `RestError`
 *    (`name === 'RestError'`, `.code`, `.statusCode`).
 *  - IMPORTANT: core-lro ignores `Retry-After: 0` for the poll interval (`if (intervalInMs)`
 *    is falsy for 0), so the SDK's default 2000 ms between polls applies unless the caller
 *    passes `{ updateIntervalInMs: 0 }` (or small) to begin*() calls. Measured: a compute
 *    create with one InProgress reply takes ~2060 ms without it, ~10-40 ms with it (or with
 *    `lroInProgressPolls: 0`). arm-network's begin*() already polls once before returning,
 *    so its first InProgress reply costs nothing; further ones cost 2 s each.
 *  - Request retries (429 / 503 with `Retry-After: 0`) happen immediately (throttling retry
 *    strategy honours 0). A 500 is retried by the exponential strategy (default ~0.5-1 s, up to
 *    3 retries) regardless of Retry-After; pass `retryOptions: { retryDelayInMs: 1 }` to speed.
 *
 *  Error payloads modelled on real ones (from public issue threads / REST docs):
 *  - 404 ResourceNotFound "The Resource 'Microsoft.Compute/virtualMachines/x' under resource
 *    group 'rg' was not found. ...", 401 InvalidAuthenticationToken / AuthenticationFailed,
 *    400 MissingApiVersionParameter, 400 BadRequest for ConfidentialVM mismatches
 *    ("The VM size 'Standard_D2as_v5' is not supported for creation of VMs and Virtual
 *    Machine Scale Set with 'ConfidentialVM' security type ..." and "Required parameter for
 *    Confidential VMs 'managedDisk.securityProfile.securityEncryptionType' is missing (null)."),
 *    400 InvalidParameter "SecurityType 'ConfidentialVM_...' is not supported by given image."
 *    for a ConfidentialVM from an image that is not a confidential-VM image (Azure/azure-cli#22200;
 *    the status is unverified),
 *    409 SkuNotAvailable, 409 OperationNotAllowed (quota), LRO AllocationFailed /
 *    ZonalAllocationFailed / OverconstrainedAllocationRequest, 400 NicInUse,
 *    400 PublicIPAddressCannotBeDeleted, 409 OperationNotAllowed for deleting an attached disk,
 *    400 InvalidResourceReference for dangling references. Messages are close paraphrases.
 * ---------------------------------------------------------------------------------------------
 *
 * Model summary
 *  - Resources keyed (case-insensitively, like ARM) by
 *    /subscriptions/{sub}/resourceGroups/{rg}/providers/{ns}/{type}/{name}; types:
 *    Microsoft.Compute/virtualMachines, Microsoft.Compute/disks,
 *    Microsoft.Network/networkInterfaces, Microsoft.Network/publicIPAddresses.
 *  - PUT is idempotent (same name -> update, 200) and records the received body.
 *  - VM create implicitly creates its OS disk (`storageProfile.osDisk.name` or
 *    `<vm>_OsDisk_1_<32 hex>`); VM delete keeps the disk unless `osDisk.deleteOption: 'Delete'`
 *    and detaches NICs unless the NIC reference has `deleteOption: 'Delete'`.
 *  - LRO progress is poll-count driven (deterministic): each poll of an operation (or GET of the
 *    affected resource) consumes one "InProgress" reply; `settleOperations()` finishes all.
 *  - Power: create LRO completes -> `PowerState/starting` until `bootDelayMs` of fake time has
 *    passed (fake clock: `now` option + `advanceTime()`), or `bootAll()` -> `PowerState/running`.
 *    No real timers are used anywhere.
 *  - The guest's boot script (the bridge's custom data, common/cloud-init.ts): on its first boot
 *    (PowerState/running) a VM whose custom data carries `CB_REQUEST_ID='<id>'` writes
 *    `COMPUTE-BRIDGE-HOSTKEY <id> <fingerprint>` to its serial log, the fingerprint being
 *    `hostKeyFingerprint()` (deterministic per VM). `faults.guestHostKey` (or `guestHostKey()` for
 *    one VM) makes the guest report `none` (no ed25519 host key) or nothing at all.
 *  - Faults on boot diagnostics: `failNext()` matches retrieveBootDiagnosticsData POSTs and the
 *    serial log blob's GETs (`/bootdiagnostics/.../<vm>.<vmId>.serialconsole.log`) like any other
 *    request; a VM whose diagnosticsProfile disables boot diagnostics answers
 *    retrieveBootDiagnosticsData with 409 OperationNotAllowed, as ARM does.
 */
import { createHash, createHmac } from "node:crypto";
import type { IncomingMessage, ServerResponse } from "node:http";
import https from "node:https";
import type { AddressInfo } from "node:net";
import { hostKeyMarker } from "../../src/backends/common/cloud-init.js";
import { makeTestCert, type TestCert } from "./tls.js";

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/** A JSON document as it travels on the wire. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type WireDoc = Record<string, any>;

export type ResourceType = "virtualMachines" | "disks" | "networkInterfaces" | "publicIPAddresses";

export type PowerState = "starting" | "running" | "stopping" | "stopped" | "deallocating" | "deallocated";

/**
 * What a booting guest's boot script writes about its SSH host key: its fingerprint (what the real
 * script does), `none` (an image without an ed25519 host key), or nothing (a script that never
 * gets that far, or a serial console that never shows it).
 */
export type GuestHostKeyReport = "fingerprint" | "none" | "never";

/**
 * Failure codes the allocation predicate may return.
 * LRO failures (the create/start operation ends `Failed`): AllocationFailed, ZonalAllocationFailed,
 * OverconstrainedAllocationRequest, OverconstrainedZonalAllocationRequest.
 * Synchronous failures (no resource is created): SkuNotAvailable (409), QuotaExceeded (409 with
 * ARM code `OperationNotAllowed` and a quota message).
 */
export type AllocationFailureCode =
  | "AllocationFailed"
  | "ZonalAllocationFailed"
  | "OverconstrainedAllocationRequest"
  | "OverconstrainedZonalAllocationRequest"
  | "SkuNotAvailable"
  | "QuotaExceeded";

export interface AllocationRequest {
  /** 'create' for a new VM (or re-PUT of a Failed one), 'start' for start/restart of a deallocated VM. */
  operation: "create" | "start";
  resourceGroup: string;
  name: string;
  location: string;
  vmSize: string;
  zones: string[];
  securityType?: string;
  priority?: string;
  /** The wire body of the PUT (create only). */
  body?: WireDoc;
}

/** `true` means AllocationFailed; falsy means allocate. */
export type AllocationFailureDecision =
  | boolean
  | AllocationFailureCode
  | { code: AllocationFailureCode; message?: string }
  | null
  | undefined;

/** Mutable at runtime through `fake.faults`. */
export interface ArmFaults {
  /** Probability (0..1) that an ARM request is answered 429 SubscriptionRequestsThrottled. */
  throttleRate: number;
  /** Probability (0..1) that an ARM request is answered 500 or 503 (chosen by the PRNG). */
  serverErrorRate: number;
  /** Decides whether a VM allocation fails, and how. */
  allocationFailure: ((req: AllocationRequest) => AllocationFailureDecision) | null;
  /** Fake-time delay between the create/start LRO completing and PowerState/running. */
  bootDelayMs: number;
  /** How many InProgress replies a create/update/action operation gives before finishing. */
  lroInProgressPolls: number;
  /** How many 202 replies a delete operation gives before finishing. */
  deleteInProgressPolls: number;
  /** What booting guests report about their SSH host key (see `guestHostKey()` for one VM). */
  guestHostKey: GuestHostKeyReport;
  /**
   * The Retry-After (seconds) on 429s and long-running-operation replies. Real ARM sends
   * seconds (https://learn.microsoft.com/azure/azure-resource-manager/management/request-limits-and-throttling);
   * the default 0 keeps tests fast, and the SDK waits out whatever is sent.
   */
  retryAfterSeconds: number;
}

export interface ArmFakeOptions {
  /** Default '00000000-0000-0000-0000-000000000000'. */
  subscriptionId?: string;
  /** Bearer token the fake accepts; default 'arm-fake-token'. */
  accessToken?: string;
  /** ipAddress given to public IPs: a string, or a function of (resourceGroup, name). Default '127.0.0.1'. */
  publicIp?: string | ((resourceGroup: string, name: string) => string);
  /** PRNG seed (ids, disk suffixes, fault draws). Default 1. */
  seed?: number;
  /** Initial `faults.bootDelayMs`; default 0 (running as soon as the create LRO completes). */
  bootDelayMs?: number;
  /** Initial `faults.lroInProgressPolls`; default 1. */
  lroInProgressPolls?: number;
  /** Initial `faults.deleteInProgressPolls`; default 1. */
  deleteInProgressPolls?: number;
  /** Other initial faults. */
  faults?: Partial<ArmFaults>;
  /**
   * How a PUT that creates/updates answers: 'azure-async-operation' (default: 201/200 +
   * Azure-AsyncOperation, status polls then a final GET) or 'location' (202 + Location,
   * polled until 200 with the resource body; a failed operation answers 409 with the error).
   */
  createLroStyle?: "azure-async-operation" | "location";
  /** Clock for the fake (ms since epoch); `advanceTime()` adds to it. Default Date.now. */
  now?: () => number;
  /** TLS material; default: a fresh `makeTestCert()`. */
  tls?: TestCert;
  /** If set, only these resource groups exist (others: 404 ResourceGroupNotFound). */
  resourceGroups?: string[];
  /** If set, list responses are paged with `nextLink` after this many items. */
  pageSize?: number;
  /**
   * Which marketplace images are confidential-VM images (ARM refuses a ConfidentialVM from any
   * other). Default: offer or SKU naming them so (`confidential`, `cvm`, as Canonical's
   * `0001-com-ubuntu-confidential-vm-jammy` / `22_04-lts-cvm` and Windows' `*-cvm` do); images by
   * id (galleries) are taken as confidential.
   */
  confidentialImage?: (ref: { publisher?: string; offer?: string; sku?: string; id?: string }) => boolean;
}

export interface CallRecord {
  seq: number;
  /** Fake-clock time of the request. */
  time: number;
  method: string;
  /** URL path, decoded. */
  path: string;
  query: Record<string, string>;
  apiVersion?: string;
  kind: "arm" | "operation" | "blob";
  status: number;
  /** ARM error code of the reply, if it was an error. */
  errorCode?: string;
  /** Set when the reply was an injected fault. */
  fault?: "failNext" | "throttle" | "serverError";
  /** Parsed JSON request body (PUT/PATCH/POST), if any. */
  requestBody?: unknown;
}

export type CallFilter =
  | {
      method?: string;
      /** RegExp tested against the path, or a case-insensitive substring. */
      path?: RegExp | string;
      status?: number;
      kind?: CallRecord["kind"];
      fault?: CallRecord["fault"];
    }
  | ((call: CallRecord) => boolean);

export interface ReceivedBody {
  method: string;
  type: ResourceType;
  resourceGroup: string;
  name: string;
  body: WireDoc;
  time: number;
}

export interface FakeAccessToken {
  token: string;
  expiresOnTimestamp: number;
}

/** Structurally a @azure/core-auth TokenCredential (getToken only). */
export interface FakeTokenCredential {
  getToken(scopes: string | string[], options?: unknown): Promise<FakeAccessToken>;
}

/** A test credential that always returns `token` (no ambient credential discovery). */
export function fakeTokenCredential(token: string, lifetimeMs = 3_600_000): FakeTokenCredential {
  return {
    getToken: async () => ({ token, expiresOnTimestamp: Date.now() + lifetimeMs }),
  };
}

// ---------------------------------------------------------------------------------------------
// Internals
// ---------------------------------------------------------------------------------------------

const NAMESPACE: Record<ResourceType, "Microsoft.Compute" | "Microsoft.Network"> = {
  virtualMachines: "Microsoft.Compute",
  disks: "Microsoft.Compute",
  networkInterfaces: "Microsoft.Network",
  publicIPAddresses: "Microsoft.Network",
};

const TYPE_BY_LOWER: Record<string, ResourceType> = {
  virtualmachines: "virtualMachines",
  disks: "disks",
  networkinterfaces: "networkInterfaces",
  publicipaddresses: "publicIPAddresses",
};

interface VmRuntime {
  power: PowerState | null;
  bootAt: number;
  failure?: { code: string; message: string };
  serial: string;
  osDiskKey?: string;
  allocated: boolean;
  /** The custom data as sent (base64): ARM never returns it, the guest's boot script is in it. */
  customData?: string;
  /** The boot script ran (it runs once per VM, as cloud-init runs custom data once). */
  bootScriptRan?: boolean;
}

interface Res {
  key: string;
  type: ResourceType;
  rg: string;
  name: string;
  id: string;
  doc: WireDoc;
  provisioningState: string;
  etag: number;
  op?: Op;
  vm?: VmRuntime;
}

interface Op {
  id: string;
  ns: "Microsoft.Compute" | "Microsoft.Network";
  location: string;
  kind: "create" | "update" | "delete" | "action";
  resKey: string;
  remaining: number;
  done: boolean;
  failure?: { code: string; message: string };
  startTime: string;
  endTime?: string;
  onSuccess: () => void;
  onFailure?: () => void;
  /** Body for a 'location'-style final 200 (create/update). */
  resultBody?: () => WireDoc | undefined;
}

interface FailRule {
  method: string;
  path: RegExp;
  status: number;
  code: string;
  message: string;
  times: number;
}

interface RouteResult {
  status: number;
  body?: unknown;
  headers?: Record<string, string>;
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details?: WireDoc[],
    /** ARM's `target`: the parameter refused. */
    readonly target?: string,
  ) {
    super(message);
  }
}

/** The managed disk's security type for a confidential VM's OS disk encryption type. */
function diskSecurityType(enc: string): string {
  return enc === "DiskWithVMGuestState"
    ? "ConfidentialVM_DiskEncryptedWithPlatformKey"
    : enc === "NonPersistedTPM"
      ? "ConfidentialVM_NonPersistedTPM"
      : "ConfidentialVM_VMGuestStateOnlyEncryptedWithPlatformKey";
}

/** mulberry32 */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function clone<T>(v: T): T {
  return v === undefined ? v : (JSON.parse(JSON.stringify(v)) as T);
}

function isObj(v: unknown): v is WireDoc {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function deepMerge(target: WireDoc, patch: WireDoc): WireDoc {
  const out: WireDoc = { ...target };
  for (const [k, v] of Object.entries(patch)) {
    if (v === undefined) continue;
    out[k] = isObj(v) && isObj(out[k]) ? deepMerge(out[k] as WireDoc, v) : clone(v);
  }
  return out;
}

interface ParsedId {
  sub: string;
  rg: string;
  ns: string;
  type: string;
  name: string;
}

function parseId(id: unknown): ParsedId | undefined {
  if (typeof id !== "string") return undefined;
  const m = /^\/subscriptions\/([^/]+)\/resourceGroups\/([^/]+)\/providers\/([^/]+)\/([^/]+)\/([^/]+)/i.exec(id);
  if (!m) return undefined;
  return { sub: m[1]!, rg: m[2]!, ns: m[3]!, type: m[4]!, name: m[5]! };
}

/** TDX: DCesv5/DCedsv5/ECesv5/ECedsv5 (+v6); SEV-SNP: DCasv5/DCadsv5/ECasv5/ECadsv5, isolated, v6, NCC H100. */
const CONFIDENTIAL_SIZE = /^Standard_(?:(?:DC|EC)\d+(?:i?a|e)d?s(?:_cc)?_v[56]|NCC\d+ads_H100_v5)$/i;
const TDX_SIZE = /^Standard_(?:DC|EC)\d+ed?s_v[56]$/i;
const ENCRYPTION_TYPES = ["VMGuestStateOnly", "DiskWithVMGuestState", "NonPersistedTPM"];

const POWER_DISPLAY: Record<PowerState, string> = {
  starting: "VM starting",
  running: "VM running",
  stopping: "VM stopping",
  stopped: "VM stopped",
  deallocating: "VM deallocating",
  deallocated: "VM deallocated",
};

const PROVISIONING_DISPLAY: Record<string, string> = {
  creating: "Creating",
  updating: "Updating",
  deleting: "Deleting",
  succeeded: "Provisioning succeeded",
  failed: "Provisioning failed",
};

function vcpusOf(size: string): number {
  const m = /^[A-Za-z]+_[A-Za-z]+?(\d+)/.exec(size);
  return m ? Math.max(1, Number(m[1])) : 2;
}

function familyOf(size: string): string {
  // Standard_DC4as_v5 -> standardDCASv5Family
  const m = /^Standard_([A-Za-z]+)\d+(?:-\d+)?([A-Za-z]*)(?:_(v\d+))?/i.exec(size);
  if (!m) return "standardFamily";
  return `standard${m[1]!.toUpperCase()}${m[2]!.toUpperCase()}${m[3] ?? ""}Family`;
}

// ---------------------------------------------------------------------------------------------
// ArmFake
// ---------------------------------------------------------------------------------------------

export class ArmFake {
  readonly endpoint: string;
  readonly ca: string;
  readonly port: number;
  readonly subscriptionId: string;
  readonly accessToken: string;
  /** Runtime-mutable fault switches. */
  readonly faults: ArmFaults;
  /** Every request received, in order. */
  readonly calls: CallRecord[] = [];
  /** Every PUT/PATCH body received for a modelled resource, in order. */
  readonly received: ReceivedBody[] = [];

  private readonly server: https.Server;
  private readonly opts: ArmFakeOptions;
  private readonly rand: () => number;
  private readonly resources = new Map<string, Res>();
  private readonly ops = new Map<string, Op>();
  private readonly failRules: FailRule[] = [];
  /** What a booting TDX guest prints as its evidence report, given its boot script (default: the "none" line). */
  guestEvidence: ((script: string) => string) | null = null;
  /** Per-VM overrides of `faults.guestHostKey`, by resource key (set before or after the VM exists). */
  private readonly hostKeyReports = new Map<string, GuestHostKeyReport>();
  private readonly creates = new Map<string, number>();
  private readonly createsPerType = new Map<ResourceType, number>();
  private readonly sasSecret: string;
  private timeOffset = 0;
  private seq = 0;
  private privateIpCounter = 4;

  private constructor(server: https.Server, port: number, ca: string, opts: ArmFakeOptions) {
    this.server = server;
    this.port = port;
    this.ca = ca;
    this.opts = opts;
    this.endpoint = `https://127.0.0.1:${port}`;
    this.subscriptionId = opts.subscriptionId ?? "00000000-0000-0000-0000-000000000000";
    this.accessToken = opts.accessToken ?? "arm-fake-token";
    this.rand = prng(opts.seed ?? 1);
    this.sasSecret = this.hex(32);
    this.faults = {
      throttleRate: 0,
      serverErrorRate: 0,
      allocationFailure: null,
      bootDelayMs: opts.bootDelayMs ?? 0,
      lroInProgressPolls: opts.lroInProgressPolls ?? 1,
      deleteInProgressPolls: opts.deleteInProgressPolls ?? 1,
      guestHostKey: "fingerprint",
      retryAfterSeconds: 0,
      ...opts.faults,
    };
  }

  /** Starts the fake on 127.0.0.1 with a random port. */
  static async start(opts: ArmFakeOptions = {}): Promise<ArmFake> {
    const tls = opts.tls ?? (await makeTestCert());
    let fake: ArmFake | undefined;
    const server = https.createServer({ cert: tls.cert, key: tls.key }, (req, res) => {
      if (!fake) {
        res.statusCode = 503;
        res.end();
        return;
      }
      fake.onRequest(req, res);
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => {
        server.off("error", reject);
        resolve();
      });
    });
    const port = (server.address() as AddressInfo).port;
    fake = new ArmFake(server, port, tls.ca, opts);
    return fake;
  }

  /** Stops listening and drops keep-alive connections. */
  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  /** Options for `new ComputeManagementClient(cred, sub, opts)` / `new NetworkManagementClient(...)`. */
  clientOptions(): { endpoint: string; tlsOptions: { ca: string } } {
    return { endpoint: this.endpoint, tlsOptions: { ca: this.ca } };
  }

  /** A credential yielding this fake's accepted token (or `token`). */
  credential(token: string = this.accessToken): FakeTokenCredential {
    return fakeTokenCredential(token);
  }

  // ----- clock ---------------------------------------------------------------------------------

  now(): number {
    return (this.opts.now ? this.opts.now() : Date.now()) + this.timeOffset;
  }

  /** Moves the fake clock forward (boot delays, SAS expiry). */
  advanceTime(ms: number): void {
    this.timeOffset += ms;
  }

  // ----- faults --------------------------------------------------------------------------------

  /**
   * The next `times` requests whose method matches and whose path matches `path` are answered
   * `status` with `{error:{code,message}}` (plus Retry-After: 0). Checked after authentication.
   */
  failNext(method: string, path: RegExp | string, status: number, code: string, message?: string, times = 1): void {
    this.failRules.push({
      method: method.toUpperCase(),
      path: typeof path === "string" ? new RegExp(path.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"), "i") : path,
      status,
      code,
      message: message ?? `Injected failure ${code}.`,
      times,
    });
  }

  clearFailNext(): void {
    this.failRules.length = 0;
  }

  // ----- call log ------------------------------------------------------------------------------

  findCalls(filter?: CallFilter): CallRecord[] {
    if (!filter) return [...this.calls];
    if (typeof filter === "function") return this.calls.filter(filter);
    return this.calls.filter(
      (c) =>
        (filter.method === undefined || c.method === filter.method.toUpperCase()) &&
        (filter.status === undefined || c.status === filter.status) &&
        (filter.kind === undefined || c.kind === filter.kind) &&
        (filter.fault === undefined || c.fault === filter.fault) &&
        (filter.path === undefined ||
          (typeof filter.path === "string"
            ? c.path.toLowerCase().includes(filter.path.toLowerCase())
            : filter.path.test(c.path))),
    );
  }

  countCalls(filter?: CallFilter): number {
    return this.findCalls(filter).length;
  }

  /** PUT/PATCH bodies received, optionally for one resource type / name. */
  receivedBodies(type?: ResourceType, name?: string): WireDoc[] {
    return this.received
      .filter((r) => (!type || r.type === type) && (!name || r.name.toLowerCase() === name.toLowerCase()))
      .map((r) => r.body);
  }

  /** Number of VMs created (new resources, not updates). */
  get createdCount(): number {
    return this.createsPerType.get("virtualMachines") ?? 0;
  }

  /** VM name -> how many times a VM of that name was created (re-creation after delete counts). */
  get createsByName(): Record<string, number> {
    return Object.fromEntries(this.creates);
  }

  /** Number of resources of `type` created. */
  createCount(type: ResourceType): number {
    return this.createsPerType.get(type) ?? 0;
  }

  // ----- state inspection ----------------------------------------------------------------------

  /** The resource as a GET would return it (VMs include instanceView), or undefined. */
  get(type: ResourceType, resourceGroup: string, name: string): WireDoc | undefined {
    const r = this.resources.get(this.key(type, resourceGroup, name));
    return r ? this.render(r, { instanceView: true }) : undefined;
  }

  has(type: ResourceType, resourceGroup: string, name: string): boolean {
    return this.resources.has(this.key(type, resourceGroup, name));
  }

  list(type: ResourceType, resourceGroup?: string): WireDoc[] {
    return [...this.resources.values()]
      .filter((r) => r.type === type && (!resourceGroup || r.rg.toLowerCase() === resourceGroup.toLowerCase()))
      .map((r) => this.render(r, { instanceView: true }));
  }

  powerState(resourceGroup: string, name: string): PowerState | null | undefined {
    const r = this.resources.get(this.key("virtualMachines", resourceGroup, name));
    if (!r?.vm) return undefined;
    this.refreshVm(r);
    return r.vm.power;
  }

  provisioningState(type: ResourceType, resourceGroup: string, name: string): string | undefined {
    return this.resources.get(this.key(type, resourceGroup, name))?.provisioningState;
  }

  serialLog(resourceGroup: string, name: string): string | undefined {
    const r = this.resources.get(this.key("virtualMachines", resourceGroup, name));
    if (!r?.vm) return undefined;
    this.refreshVm(r);
    return r.vm.serial;
  }

  // ----- state driving -------------------------------------------------------------------------

  /**
   * Every VM in PowerState/starting becomes running now (a VM whose create/start operation is
   * still pending becomes running as soon as that operation completes).
   */
  bootAll(): void {
    for (const r of this.resources.values()) {
      if (r.vm?.power === "starting") {
        r.vm.bootAt = -Infinity;
        this.refreshVm(r);
      }
    }
  }

  /** Like bootAll() for one VM. */
  boot(resourceGroup: string, name: string): void {
    const r = this.mustVm(resourceGroup, name);
    if (r.vm!.power === "starting") {
      r.vm!.bootAt = -Infinity;
      this.refreshVm(r);
    }
  }

  /** Completes every pending operation as if it had been polled to the end. */
  settleOperations(): void {
    for (const op of this.ops.values()) if (!op.done) this.finish(op);
  }

  /** The guest shut itself down: PowerState/stopped, serial log appended. */
  guestPowerOff(resourceGroup: string, name: string, serialText?: string): void {
    const r = this.mustVm(resourceGroup, name);
    this.refreshVm(r);
    this.appendSerial(r, serialText ?? "[  OK  ] Reached target System Power Off.\n[  123.456789] reboot: Power down\n");
    r.vm!.power = "stopped";
  }

  appendSerialLog(resourceGroup: string, name: string, text: string): void {
    this.appendSerial(this.mustVm(resourceGroup, name), text);
  }

  /**
   * The SSH host key fingerprint the VM's guest reports: `SHA256:` and the unpadded base64 of
   * sha256(vmId), as `ssh-keygen -lf` prints one (43 characters). A new VM of the same name has a
   * new vmId, hence a new host key, as on Azure.
   */
  hostKeyFingerprint(resourceGroup: string, name: string): string {
    const vmId = String(this.mustVm(resourceGroup, name).doc["properties"]["vmId"]);
    return `SHA256:${createHash("sha256").update(vmId).digest("base64").replace(/=+$/, "")}`;
  }

  /** What this VM's guest reports about its host key (overrides `faults.guestHostKey`); may be set before the VM is created. */
  guestHostKey(resourceGroup: string, name: string, report: GuestHostKeyReport): void {
    this.hostKeyReports.set(this.key("virtualMachines", resourceGroup, name), report);
  }

  // =============================================================================================
  // HTTP handling
  // =============================================================================================

  private onRequest(req: IncomingMessage, res: ServerResponse): void {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on("data", (c: Buffer) => {
      size += c.length;
      if (size <= 8 * 1024 * 1024) chunks.push(c);
    });
    req.on("end", () => {
      try {
        this.handle(req, res, Buffer.concat(chunks).toString("utf8"));
      } catch (err) {
        // A bug in the fake: answer 500 visibly rather than hanging the client.
        if (!res.headersSent) {
          res.statusCode = 500;
          res.setHeader("content-type", "application/json; charset=utf-8");
          res.end(JSON.stringify({ error: { code: "FakeInternalError", message: String((err as Error)?.stack ?? err) } }));
        }
      }
    });
  }

  private handle(req: IncomingMessage, res: ServerResponse, rawBody: string): void {
    const url = new URL(req.url ?? "/", this.endpoint);
    const method = (req.method ?? "GET").toUpperCase();
    let path: string;
    try {
      path = decodeURIComponent(url.pathname).replace(/\/+$/, "") || "/";
    } catch {
      path = url.pathname;
    }
    const query: Record<string, string> = {};
    for (const [k, v] of url.searchParams) query[k] = v;
    const isBlob = path.toLowerCase().startsWith("/bootdiagnostics/");
    const isOp = /^\/subscriptions\/[^/]+\/providers\/[^/]+\/locations\/[^/]+\/(operations|operationresults)\//i.test(path);
    let requestBody: unknown;
    if (rawBody.length > 0) {
      try {
        requestBody = JSON.parse(rawBody);
      } catch {
        requestBody = rawBody;
      }
    }
    const call: CallRecord = {
      seq: ++this.seq,
      time: this.now(),
      method,
      path,
      query,
      apiVersion: query["api-version"],
      kind: isBlob ? "blob" : isOp ? "operation" : "arm",
      status: 0,
      ...(requestBody !== undefined ? { requestBody } : {}),
    };
    this.calls.push(call);

    const reply = (status: number, body?: unknown, headers: Record<string, string> = {}, contentType = "application/json; charset=utf-8") => {
      call.status = status;
      if (isObj(body) && isObj(body["error"]) && typeof body["error"]["code"] === "string") call.errorCode = body["error"]["code"];
      res.statusCode = status;
      const requestId = this.guid();
      res.setHeader("x-ms-request-id", requestId);
      res.setHeader("x-ms-correlation-request-id", (req.headers["x-ms-correlation-request-id"] as string | undefined) ?? requestId);
      res.setHeader("x-ms-client-request-id", (req.headers["x-ms-client-request-id"] as string | undefined) ?? requestId);
      if (!isBlob) res.setHeader("Retry-After", String(this.faults.retryAfterSeconds));
      for (const [k, v] of Object.entries(headers)) res.setHeader(k, v);
      if (body === undefined || status === 204) {
        res.setHeader("content-length", "0");
        res.end();
        return;
      }
      const payload = Buffer.isBuffer(body) ? body : typeof body === "string" ? body : JSON.stringify(body);
      res.setHeader("content-type", contentType);
      res.end(payload);
    };
    const replyError = (e: HttpError, extraHeaders: Record<string, string> = {}) =>
      reply(
        e.status,
        { error: { code: e.code, message: e.message, ...(e.target ? { target: e.target } : {}), ...(e.details ? { details: e.details } : {}) } },
        extraHeaders,
      );

    if (isBlob) {
      const rule = this.takeFailRule(method, path);
      if (rule) {
        call.fault = "failNext";
        replyError(new HttpError(rule.status, rule.code, rule.message));
        return;
      }
      this.serveBlob(path, query, reply);
      return;
    }

    // --- authentication ---
    const auth = req.headers["authorization"];
    if (!auth) {
      replyError(
        new HttpError(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing."),
        { "WWW-Authenticate": 'Bearer authorization_uri="https://login.microsoftonline.com/common", error="invalid_token", error_description="The authentication failed because of missing \'Authorization\' header."' },
      );
      return;
    }
    const m = /^Bearer\s+(.+)$/i.exec(auth);
    if (!m || m[1] !== this.accessToken) {
      replyError(
        new HttpError(401, "InvalidAuthenticationToken", "The access token is invalid."),
        { "WWW-Authenticate": 'Bearer authorization_uri="https://login.microsoftonline.com/common", error="invalid_token", error_description="The access token is invalid."' },
      );
      return;
    }

    // --- injected faults ---
    const rule = this.takeFailRule(method, path);
    if (rule) {
      call.fault = "failNext";
      replyError(new HttpError(rule.status, rule.code, rule.message));
      return;
    }
    if (this.faults.throttleRate > 0 && this.rand() < this.faults.throttleRate) {
      call.fault = "throttle";
      const kind = method === "GET" ? "read" : method === "DELETE" ? "delete" : "write";
      replyError(
        new HttpError(
          429,
          "SubscriptionRequestsThrottled",
          `Number of '${kind}' requests for subscription '${this.subscriptionId}' actor 'fake-actor' exceeded. Please try again after '0' seconds after additional tokens are available. Refer to https://aka.ms/arm-throttling for additional information.`,
        ),
        { [`x-ms-ratelimit-remaining-subscription-${kind === "read" ? "reads" : kind === "delete" ? "deletes" : "writes"}`]: "0" },
      );
      return;
    }
    if (this.faults.serverErrorRate > 0 && this.rand() < this.faults.serverErrorRate) {
      call.fault = "serverError";
      if (this.rand() < 0.5) {
        replyError(
          new HttpError(
            500,
            "InternalServerError",
            `Encountered internal server error. Diagnostic information: timestamp '${new Date(this.now()).toISOString()}', subscription id '${this.subscriptionId}', tracking id '${this.guid()}', request correlation id '${this.guid()}'.`,
          ),
        );
      } else {
        replyError(new HttpError(503, "ServiceUnavailable", "The service is currently unavailable. Please retry the request."));
      }
      return;
    }

    // --- api-version ---
    if (!query["api-version"]) {
      replyError(
        new HttpError(400, "MissingApiVersionParameter", "The api-version query parameter (?api-version=) is required for all requests."),
      );
      return;
    }

    try {
      if (isOp) {
        this.serveOperation(path, query, reply);
        return;
      }
      const out = this.route(method, path, query, requestBody, rawBody, req);
      reply(out.status, out.body, out.headers);
    } catch (err) {
      if (err instanceof HttpError) replyError(err);
      else replyError(new HttpError(500, "FakeInternalError", `ArmFake bug: ${String((err as Error)?.stack ?? err)}`));
    }
  }

  private takeFailRule(method: string, path: string): FailRule | undefined {
    const i = this.failRules.findIndex((r) => (r.method === "*" || r.method === method) && r.path.test(path));
    if (i < 0) return undefined;
    const rule = this.failRules[i]!;
    rule.times -= 1;
    if (rule.times <= 0) this.failRules.splice(i, 1);
    return rule;
  }

  // ----- routing -------------------------------------------------------------------------------

  private route(
    method: string,
    path: string,
    query: Record<string, string>,
    body: unknown,
    rawBody: string,
    req: IncomingMessage,
  ): RouteResult {
    const apiVersion = query["api-version"]!;
    // subscription-level list: /subscriptions/{sub}/providers/{ns}/{type}
    let m = /^\/subscriptions\/([^/]+)\/providers\/([^/]+)\/([^/]+)$/i.exec(path);
    if (m) {
      this.checkSub(m[1]!);
      const type = this.resolveType(m[2]!, m[3]!, apiVersion);
      if (method !== "GET") throw this.methodNotAllowed(method);
      return { status: 200, body: this.listBody(type, undefined, query, path) };
    }
    // resource-group-level list
    m = /^\/subscriptions\/([^/]+)\/resourceGroups\/([^/]+)\/providers\/([^/]+)\/([^/]+)$/i.exec(path);
    if (m) {
      this.checkSub(m[1]!);
      this.checkRg(m[2]!);
      const type = this.resolveType(m[3]!, m[4]!, apiVersion);
      if (method !== "GET") throw this.methodNotAllowed(method);
      return { status: 200, body: this.listBody(type, m[2]!, query, path) };
    }
    // resource
    m = /^\/subscriptions\/([^/]+)\/resourceGroups\/([^/]+)\/providers\/([^/]+)\/([^/]+)\/([^/]+)$/i.exec(path);
    if (m) {
      this.checkSub(m[1]!);
      this.checkRg(m[2]!);
      const type = this.resolveType(m[3]!, m[4]!, apiVersion);
      const rg = m[2]!;
      const name = m[5]!;
      switch (method) {
        case "GET":
          return this.getResource(type, rg, name, query);
        case "PUT": {
          if (rawBody.trim() === "" || !isObj(body)) {
            throw new HttpError(
              400,
              "InvalidRequestContent",
              "The request content was invalid and could not be deserialized: 'Unexpected character encountered while parsing value.'",
            );
          }
          return this.putResource(type, rg, name, body, apiVersion, req);
        }
        case "PATCH": {
          if (!isObj(body)) throw new HttpError(400, "InvalidRequestContent", "The request content was invalid and could not be deserialized.");
          return this.patchResource(type, rg, name, body);
        }
        case "DELETE":
          return this.deleteResource(type, rg, name, apiVersion);
        default:
          throw this.methodNotAllowed(method);
      }
    }
    // VM sub-resources / actions
    m = /^\/subscriptions\/([^/]+)\/resourceGroups\/([^/]+)\/providers\/Microsoft\.Compute\/virtualMachines\/([^/]+)\/([^/]+)$/i.exec(path);
    if (m) {
      this.checkSub(m[1]!);
      this.checkRg(m[2]!);
      return this.vmAction(method, m[2]!, m[3]!, m[4]!, query, apiVersion);
    }
    throw new HttpError(404, "NotFound", `No HTTP resource was found that matches the request URI '${this.endpoint}${path}'.`);
  }

  private methodNotAllowed(method: string): HttpError {
    return new HttpError(405, "MethodNotAllowed", `The requested resource does not support http method '${method}'.`);
  }

  private checkSub(sub: string): void {
    if (sub.toLowerCase() !== this.subscriptionId.toLowerCase()) {
      throw new HttpError(404, "SubscriptionNotFound", `The subscription '${sub}' could not be found.`);
    }
  }

  private checkRg(rg: string): void {
    const allowed = this.opts.resourceGroups;
    if (allowed && !allowed.some((a) => a.toLowerCase() === rg.toLowerCase())) {
      throw new HttpError(404, "ResourceGroupNotFound", `Resource group '${rg}' could not be found.`);
    }
  }

  private resolveType(ns: string, type: string, apiVersion: string): ResourceType {
    const t = TYPE_BY_LOWER[type.toLowerCase()];
    if (!t || NAMESPACE[t].toLowerCase() !== ns.toLowerCase()) {
      throw new HttpError(
        400,
        "InvalidResourceType",
        `The resource type '${type}' could not be found in the namespace '${ns}' for api version '${apiVersion}'.`,
      );
    }
    return t;
  }

  // ----- ids / keys ----------------------------------------------------------------------------

  private key(type: ResourceType, rg: string, name: string): string {
    return `${rg}/${type}/${name}`.toLowerCase();
  }

  private idFor(type: ResourceType, rg: string, name: string): string {
    return `/subscriptions/${this.subscriptionId}/resourceGroups/${rg}/providers/${NAMESPACE[type]}/${type}/${name}`;
  }

  private byId(id: unknown, type: ResourceType): Res | undefined {
    const p = parseId(id);
    if (!p || p.sub.toLowerCase() !== this.subscriptionId.toLowerCase()) return undefined;
    if (TYPE_BY_LOWER[p.type.toLowerCase()] !== type) return undefined;
    return this.resources.get(this.key(type, p.rg, p.name));
  }

  private notFound(type: ResourceType, rg: string, name: string): HttpError {
    return new HttpError(
      404,
      "ResourceNotFound",
      `The Resource '${NAMESPACE[type]}/${type}/${name}' under resource group '${rg}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix`,
    );
  }

  private mustVm(rg: string, name: string): Res {
    const r = this.resources.get(this.key("virtualMachines", rg, name));
    if (!r?.vm) throw new Error(`ArmFake: no VM ${rg}/${name}`);
    return r;
  }

  private hex(n: number): string {
    let s = "";
    while (s.length < n) s += Math.floor(this.rand() * 16).toString(16);
    return s;
  }

  private guid(): string {
    const h = this.hex(32);
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-${"89ab"[Math.floor(this.rand() * 4)]}${h.slice(17, 20)}-${h.slice(20, 32)}`;
  }

  private iso(t = this.now()): string {
    return new Date(t).toISOString();
  }

  // ----- GET / list ----------------------------------------------------------------------------

  private getResource(type: ResourceType, rg: string, name: string, query: Record<string, string>) {
    const r = this.resources.get(this.key(type, rg, name));
    if (!r) throw this.notFound(type, rg, name);
    if (r.op && !r.op.done) this.observe(r.op);
    const cur = this.resources.get(r.key);
    if (!cur) throw this.notFound(type, rg, name);
    const expand = (query["$expand"] ?? "").toLowerCase();
    return {
      status: 200,
      body: this.render(cur, { instanceView: expand.includes("instanceview"), userData: expand.includes("userdata") }),
      headers: { etag: this.etagOf(cur) },
    };
  }

  private listBody(type: ResourceType, rg: string | undefined, query: Record<string, string>, path: string): WireDoc {
    // `$expand=instanceView` on a list is documented as valid only with `$filter`: without one it
    // is ignored here (VMs without instanceView), the case a client must not depend on.
    const expand = query["$filter"] !== undefined ? (query["$expand"] ?? "").toLowerCase() : "";
    const statusOnly = (query["statusOnly"] ?? "").toLowerCase() === "true";
    let items = [...this.resources.values()].filter((r) => r.type === type && (!rg || r.rg.toLowerCase() === rg.toLowerCase()));
    for (const r of items) this.refreshVm(r);
    items = items.filter((r) => this.resources.has(r.key));
    const docs = items.map((r) => this.render(r, { instanceView: statusOnly || expand.includes("instanceview") }));
    const pageSize = this.opts.pageSize;
    if (!pageSize || docs.length <= pageSize) return { value: docs };
    const skip = Number(query["$skiptoken"] ?? "0") || 0;
    const page = docs.slice(skip, skip + pageSize);
    const out: WireDoc = { value: page };
    if (skip + pageSize < docs.length) {
      const next = new URL(`${this.endpoint}${path}`);
      for (const [k, v] of Object.entries(query)) if (k !== "$skiptoken") next.searchParams.set(k, v);
      next.searchParams.set("$skiptoken", String(skip + pageSize));
      out["nextLink"] = next.toString();
    }
    return out;
  }

  private etagOf(r: Res): string {
    return NAMESPACE[r.type] === "Microsoft.Network" ? `W/"${r.etag.toString(16).padStart(8, "0")}-0000-4000-8000-000000000000"` : `"${r.etag}"`;
  }

  // ----- rendering -----------------------------------------------------------------------------

  private render(r: Res, o: { instanceView?: boolean; userData?: boolean } = {}): WireDoc {
    this.refreshVm(r);
    const doc = clone(r.doc);
    doc["id"] = r.id;
    doc["name"] = r.name;
    doc["type"] = `${NAMESPACE[r.type]}/${r.type}`;
    const props: WireDoc = isObj(doc["properties"]) ? doc["properties"] : {};
    doc["properties"] = props;
    props["provisioningState"] = r.provisioningState;
    doc["etag"] = this.etagOf(r);
    switch (r.type) {
      case "virtualMachines": {
        if (!o.userData) delete props["userData"];
        if (o.instanceView) props["instanceView"] = this.instanceView(r);
        break;
      }
      case "networkInterfaces": {
        const ipcs = Array.isArray(props["ipConfigurations"]) ? (props["ipConfigurations"] as WireDoc[]) : [];
        for (const ipc of ipcs) {
          ipc["etag"] = doc["etag"];
          if (isObj(ipc["properties"])) ipc["properties"]["provisioningState"] = r.provisioningState;
        }
        break;
      }
      case "publicIPAddresses":
      case "disks":
        break;
    }
    return doc;
  }

  private instanceView(r: Res): WireDoc {
    const vm = r.vm!;
    const props = r.doc["properties"] as WireDoc;
    const t = this.iso();
    const statuses: WireDoc[] = [];
    const ps = r.provisioningState.toLowerCase();
    if (ps === "failed" && vm.failure) {
      statuses.push({
        code: `ProvisioningState/failed/${vm.failure.code}`,
        level: "Error",
        displayStatus: "Provisioning failed",
        message: vm.failure.message,
        time: t,
      });
    } else {
      statuses.push({ code: `ProvisioningState/${ps}`, level: "Info", displayStatus: PROVISIONING_DISPLAY[ps] ?? ps, time: t });
    }
    if (vm.power) statuses.push({ code: `PowerState/${vm.power}`, level: "Info", displayStatus: POWER_DISPLAY[vm.power] });
    const osDisk = vm.osDiskKey ? this.resources.get(vm.osDiskKey) : undefined;
    const view: WireDoc = {
      hyperVGeneration: "V2",
      disks: osDisk
        ? [
            {
              name: osDisk.name,
              statuses: [{ code: "ProvisioningState/succeeded", level: "Info", displayStatus: "Provisioning succeeded", time: t }],
            },
          ]
        : [],
      bootDiagnostics: {},
      statuses,
    };
    if (vm.power === "running") {
      const computerName = props["osProfile"]?.["computerName"] ?? r.name;
      view["computerName"] = computerName;
      view["osName"] = props["osProfile"]?.["windowsConfiguration"] ? "Windows Server 2022 Datacenter" : "ubuntu";
      view["osVersion"] = props["osProfile"]?.["windowsConfiguration"] ? "10.0.20348" : "22.04";
      view["vmAgent"] = {
        vmAgentVersion: "2.12.0.2",
        statuses: [{ code: "ProvisioningState/succeeded", level: "Info", displayStatus: "Ready", message: "Guest Agent is running", time: t }],
      };
    }
    return view;
  }

  // ----- PUT -----------------------------------------------------------------------------------

  private putResource(type: ResourceType, rg: string, name: string, body: WireDoc, apiVersion: string, req: IncomingMessage) {
    const key = this.key(type, rg, name);
    const existing = this.resources.get(key);
    if (existing && existing.op && !existing.op.done) this.observe(existing.op);
    const current = this.resources.get(key);
    const ifNoneMatch = req.headers["if-none-match"];
    if (current && ifNoneMatch === "*") {
      throw new HttpError(412, "PreconditionFailed", `The resource '${name}' already exists and 'If-None-Match: *' was specified.`);
    }
    const ifMatch = req.headers["if-match"];
    if (typeof ifMatch === "string" && ifMatch !== "*" && (!current || ifMatch !== this.etagOf(current))) {
      throw new HttpError(412, "PreconditionFailed", "The condition specified using HTTP conditional header(s) is not met.");
    }
    if (typeof body["location"] !== "string" || body["location"] === "") {
      throw new HttpError(400, "LocationRequired", "The location property is required for this definition.");
    }
    if (current && current.provisioningState === "Deleting") {
      throw new HttpError(
        409,
        "OperationNotAllowed",
        `The resource '${current.id}' is being deleted. Retry the operation after the deletion completes.`,
      );
    }
    this.received.push({ method: "PUT", type, resourceGroup: rg, name, body: clone(body), time: this.now() });
    switch (type) {
      case "virtualMachines":
        return this.putVm(rg, name, body, current, apiVersion);
      case "disks":
        return this.putGeneric(type, rg, name, body, current, apiVersion, () => this.diskDoc(body, current));
      case "publicIPAddresses":
        return this.putGeneric(type, rg, name, body, current, apiVersion, () => this.pipDoc(rg, name, body, current));
      case "networkInterfaces":
        return this.putNic(rg, name, body, current, apiVersion);
    }
  }

  private newRes(type: ResourceType, rg: string, name: string, doc: WireDoc, provisioningState: string): Res {
    const r: Res = { key: this.key(type, rg, name), type, rg, name, id: this.idFor(type, rg, name), doc, provisioningState, etag: 1 };
    this.resources.set(r.key, r);
    this.createsPerType.set(type, (this.createsPerType.get(type) ?? 0) + 1);
    return r;
  }

  private lroReply(r: Res, op: Op, created: boolean, apiVersion: string): RouteResult {
    const style = this.opts.createLroStyle ?? "azure-async-operation";
    if (style === "location") {
      return { status: 202, body: undefined, headers: { Location: this.opUrl(op, apiVersion, true) } };
    }
    return {
      status: created ? 201 : 200,
      body: this.render(r),
      headers: { "Azure-AsyncOperation": this.opUrl(op, apiVersion, false), etag: this.etagOf(r) },
    };
  }

  private putGeneric(
    type: ResourceType,
    rg: string,
    name: string,
    body: WireDoc,
    current: Res | undefined,
    apiVersion: string,
    makeDoc: () => WireDoc,
  ) {
    const doc = makeDoc();
    let r: Res;
    if (current) {
      current.doc = doc;
      current.etag += 1;
      current.provisioningState = "Updating";
      r = current;
    } else {
      r = this.newRes(type, rg, name, doc, type === "disks" ? "Creating" : "Updating");
    }
    const op = this.newOp(r, current ? "update" : "create", String(body["location"]), () => {
      r.provisioningState = "Succeeded";
    });
    return this.lroReply(r, op, !current, apiVersion);
  }

  private diskDoc(body: WireDoc, current: Res | undefined): WireDoc {
    const base = current ? clone(current.doc) : {};
    const props: WireDoc = { ...(isObj(base["properties"]) ? base["properties"] : {}), ...(isObj(body["properties"]) ? clone(body["properties"]) : {}) };
    props["timeCreated"] ??= this.iso();
    props["uniqueId"] ??= this.guid();
    props["diskState"] ??= "Unattached";
    props["diskSizeGB"] ??= 32;
    props["diskSizeBytes"] = Number(props["diskSizeGB"]) * 1024 ** 3;
    props["encryption"] ??= { type: "EncryptionAtRestWithPlatformKey" };
    const doc: WireDoc = {
      ...base,
      location: body["location"],
      sku: body["sku"] ?? base["sku"] ?? { name: "Standard_LRS", tier: "Standard" },
      properties: props,
    };
    if (body["tags"] !== undefined) doc["tags"] = clone(body["tags"]);
    if (body["zones"] !== undefined) doc["zones"] = clone(body["zones"]);
    return doc;
  }

  private pipDoc(rg: string, name: string, body: WireDoc, current: Res | undefined): WireDoc {
    const base = current ? clone(current.doc) : {};
    const sku = body["sku"] ?? base["sku"] ?? { name: "Standard", tier: "Regional" };
    const props: WireDoc = { ...(isObj(body["properties"]) ? clone(body["properties"]) : {}) };
    const oldProps: WireDoc = isObj(base["properties"]) ? base["properties"] : {};
    const ip = this.opts.publicIp;
    props["ipAddress"] = oldProps["ipAddress"] ?? (typeof ip === "function" ? ip(rg, name) : (ip ?? "127.0.0.1"));
    props["resourceGuid"] = oldProps["resourceGuid"] ?? this.guid();
    props["publicIPAddressVersion"] ??= "IPv4";
    props["publicIPAllocationMethod"] ??= String(sku?.name ?? "").toLowerCase() === "basic" ? "Dynamic" : "Static";
    props["idleTimeoutInMinutes"] ??= 4;
    props["ipTags"] ??= [];
    if (oldProps["ipConfiguration"]) props["ipConfiguration"] = oldProps["ipConfiguration"];
    const doc: WireDoc = { location: body["location"], sku, properties: props };
    if (body["tags"] !== undefined) doc["tags"] = clone(body["tags"]);
    if (body["zones"] !== undefined) doc["zones"] = clone(body["zones"]);
    return doc;
  }

  private putNic(rg: string, name: string, body: WireDoc, current: Res | undefined, apiVersion: string) {
    const nicId = this.idFor("networkInterfaces", rg, name);
    const props: WireDoc = isObj(body["properties"]) ? clone(body["properties"]) : {};
    const ipcs: WireDoc[] = Array.isArray(props["ipConfigurations"]) ? (props["ipConfigurations"] as WireDoc[]) : [];
    if (ipcs.length === 0) {
      throw new HttpError(400, "NetworkInterfaceMustHaveAtLeastOneIpConfiguration", `Network interface ${nicId} must have at least one IP configuration.`);
    }
    // Validate references before mutating anything.
    const pipLinks: { pip: Res; ipcId: string }[] = [];
    ipcs.forEach((ipc, i) => {
      ipc["name"] ??= `ipconfig${i + 1}`;
      const ipcProps: WireDoc = isObj(ipc["properties"]) ? ipc["properties"] : (ipc["properties"] = {});
      const pipRef = ipcProps["publicIPAddress"];
      if (isObj(pipRef) && pipRef["id"] !== undefined) {
        const pip = this.byId(pipRef["id"], "publicIPAddresses");
        if (!pip) {
          throw new HttpError(
            400,
            "InvalidResourceReference",
            `Resource ${String(pipRef["id"])} referenced by resource ${nicId} was not found. Please make sure that the referenced resource exists, and that both resources are in the same region.`,
            [{ code: "NotFound", message: `Resource ${String(pipRef["id"])} not found.` }],
          );
        }
        const ipcId = `${nicId}/ipConfigurations/${String(ipc["name"])}`;
        const owner = pip.doc["properties"]?.["ipConfiguration"]?.["id"];
        if (owner && String(owner).toLowerCase() !== ipcId.toLowerCase() && !String(owner).toLowerCase().startsWith(nicId.toLowerCase() + "/")) {
          throw new HttpError(
            400,
            "PublicIPAddressInUse",
            `Resource ${pip.id} is referenced by ${String(owner)} and cannot be used by ${ipcId}.`,
          );
        }
        pipLinks.push({ pip, ipcId });
      }
    });
    const oldProps: WireDoc = current && isObj(current.doc["properties"]) ? current.doc["properties"] : {};
    const oldIps = new Map<string, string>();
    for (const o of (oldProps["ipConfigurations"] as WireDoc[] | undefined) ?? []) {
      oldIps.set(String(o["name"]).toLowerCase(), String(o["properties"]?.["privateIPAddress"] ?? ""));
    }
    // Detach public IPs no longer referenced.
    for (const pip of this.resources.values()) {
      if (pip.type !== "publicIPAddresses") continue;
      const owner = String(pip.doc["properties"]?.["ipConfiguration"]?.["id"] ?? "").toLowerCase();
      if (owner.startsWith(nicId.toLowerCase() + "/") && !pipLinks.some((l) => l.pip === pip)) {
        delete pip.doc["properties"]["ipConfiguration"];
      }
    }
    ipcs.forEach((ipc, i) => {
      const ipcProps = ipc["properties"] as WireDoc;
      ipc["id"] = `${nicId}/ipConfigurations/${String(ipc["name"])}`;
      ipc["type"] = "Microsoft.Network/networkInterfaces/ipConfigurations";
      ipcProps["privateIPAllocationMethod"] ??= "Dynamic";
      ipcProps["privateIPAddress"] ??= oldIps.get(String(ipc["name"]).toLowerCase()) || `10.0.0.${this.privateIpCounter++}`;
      ipcProps["privateIPAddressVersion"] ??= "IPv4";
      ipcProps["primary"] ??= i === 0;
      if (isObj(ipcProps["subnet"]) && isObj(ipcProps["subnet"]["properties"]) && Object.keys(ipcProps["subnet"]["properties"]).length === 0) {
        delete ipcProps["subnet"]["properties"];
      }
      if (isObj(ipcProps["publicIPAddress"])) ipcProps["publicIPAddress"] = { id: ipcProps["publicIPAddress"]["id"] };
    });
    for (const l of pipLinks) {
      l.pip.doc["properties"]["ipConfiguration"] = { id: l.ipcId };
      l.pip.etag += 1;
    }
    // Remember the deleteOption the caller set on each public IP reference (used when the NIC
    // is deleted together with its VM).
    (body["properties"]?.["ipConfigurations"] as WireDoc[] | undefined)?.forEach((ipc) => {
      const pipRef = ipc?.["properties"]?.["publicIPAddress"];
      const opt = pipRef?.["properties"]?.["deleteOption"];
      const pip = pipRef ? this.byId(pipRef["id"], "publicIPAddresses") : undefined;
      if (pip && typeof opt === "string") pip.doc["properties"]["deleteOption"] = opt;
    });
    props["resourceGuid"] = oldProps["resourceGuid"] ?? this.guid();
    props["enableAcceleratedNetworking"] ??= false;
    props["enableIPForwarding"] ??= false;
    props["nicType"] ??= "Standard";
    props["dnsSettings"] ??= { dnsServers: [], appliedDnsServers: [], internalDomainNameSuffix: `${this.hex(26)}.bx.internal.cloudapp.net` };
    props["hostedWorkloads"] = [];
    props["tapConfigurations"] = [];
    props["vnetEncryptionSupported"] = false;
    if (oldProps["virtualMachine"]) {
      props["virtualMachine"] = oldProps["virtualMachine"];
      props["macAddress"] = oldProps["macAddress"];
      props["primary"] = oldProps["primary"];
    }
    const doc: WireDoc = { location: body["location"], properties: props };
    if (body["tags"] !== undefined) doc["tags"] = clone(body["tags"]);
    let r: Res;
    if (current) {
      current.doc = doc;
      current.etag += 1;
      current.provisioningState = "Updating";
      r = current;
    } else {
      r = this.newRes("networkInterfaces", rg, name, doc, "Updating");
    }
    const op = this.newOp(r, current ? "update" : "create", String(body["location"]), () => {
      r.provisioningState = "Succeeded";
    });
    return this.lroReply(r, op, !current, apiVersion);
  }

  // ----- VM PUT --------------------------------------------------------------------------------

  private validateVm(rg: string, name: string, body: WireDoc, current: Res | undefined): void {
    const props: WireDoc = isObj(body["properties"]) ? body["properties"] : {};
    const size = String(props["hardwareProfile"]?.["vmSize"] ?? current?.doc["properties"]?.["hardwareProfile"]?.["vmSize"] ?? "Standard_D2s_v5");
    const securityType: string | undefined = props["securityProfile"]?.["securityType"];
    const encType: string | undefined = props["storageProfile"]?.["osDisk"]?.["managedDisk"]?.["securityProfile"]?.["securityEncryptionType"];
    const confidentialSize = CONFIDENTIAL_SIZE.test(size);
    if (securityType !== undefined && !["TrustedLaunch", "ConfidentialVM", "Standard"].includes(securityType)) {
      throw new HttpError(
        400,
        "InvalidParameter",
        `The value '${securityType}' of parameter 'securityProfile.securityType' is invalid. Allowed values are 'TrustedLaunch', 'ConfidentialVM' and 'Standard'.`,
      );
    }
    if (securityType === "ConfidentialVM") {
      if (!encType) {
        throw new HttpError(400, "BadRequest", "Required parameter for Confidential VMs 'managedDisk.securityProfile.securityEncryptionType' is missing (null).");
      }
      if (!ENCRYPTION_TYPES.includes(encType)) {
        throw new HttpError(
          400,
          "InvalidParameter",
          `The value '${encType}' of parameter 'managedDisk.securityProfile.securityEncryptionType' is invalid. Allowed values are ${ENCRYPTION_TYPES.map((e) => `'${e}'`).join(", ")}.`,
        );
      }
      if (!confidentialSize) {
        throw new HttpError(
          400,
          "BadRequest",
          `The VM size '${size}' is not supported for creation of VMs and Virtual Machine Scale Set with 'ConfidentialVM' security type and managedDisk.securityProfile.securityEncryptionType set as '${encType}'`,
        );
      }
      if (props["securityProfile"]?.["uefiSettings"]?.["vTpmEnabled"] === false) {
        throw new HttpError(
          400,
          "BadRequest",
          "Virtual machines with 'ConfidentialVM' security type require 'securityProfile.uefiSettings.vTpmEnabled' to be true.",
        );
      }
      if (encType === "DiskWithVMGuestState" && props["securityProfile"]?.["uefiSettings"]?.["secureBootEnabled"] === false) {
        throw new HttpError(
          400,
          "BadRequest",
          "Virtual machines with securityEncryptionType 'DiskWithVMGuestState' require 'securityProfile.uefiSettings.secureBootEnabled' to be true.",
        );
      }
      // Only confidential-VM images boot as ConfidentialVM. The reply is the one quoted in
      // Azure/azure-cli#22200 (InvalidParameter, target securityProfile.securityType) with this
      // encryption type's security type; its HTTP status is unverified (400 like every other
      // parameter refusal here).
      const img: WireDoc = props["storageProfile"]?.["imageReference"] ?? current?.doc["properties"]?.["storageProfile"]?.["imageReference"] ?? {};
      if (!this.isConfidentialImage(img)) {
        throw new HttpError(400, "InvalidParameter", `SecurityType '${diskSecurityType(encType)}' is not supported by given image.`, undefined, "securityProfile.securityType");
      }
    } else {
      if (encType) {
        throw new HttpError(
          400,
          "InvalidParameter",
          "Parameter 'managedDisk.securityProfile.securityEncryptionType' can be set only for Confidential VMs (securityProfile.securityType 'ConfidentialVM').",
        );
      }
      if (confidentialSize) {
        throw new HttpError(
          400,
          "BadRequest",
          `The VM size '${size}' is not supported for creation of VMs and Virtual Machine Scale Set with '${securityType ?? "<NULL>"}' security type.`,
        );
      }
    }
    const vmId = this.idFor("virtualMachines", rg, name);
    const nics = props["networkProfile"]?.["networkInterfaces"];
    if (Array.isArray(nics)) {
      for (const ref of nics as WireDoc[]) {
        const nic = this.byId(ref?.["id"], "networkInterfaces");
        if (!nic) {
          throw new HttpError(
            400,
            "InvalidResourceReference",
            `Resource ${String(ref?.["id"])} referenced by resource ${vmId} was not found. Please make sure that the referenced resource exists, and that both resources are in the same region.`,
            [{ code: "NotFound", message: `Resource ${String(ref?.["id"])} not found.` }],
          );
        }
        const owner = nic.doc["properties"]?.["virtualMachine"]?.["id"];
        if (owner && String(owner).toLowerCase() !== vmId.toLowerCase()) {
          throw new HttpError(
            400,
            "NicInUse",
            `Network Interface ${nic.id} is used by existing resource ${String(owner)}. In order to use the network interface, it must be dissociated from that resource.`,
          );
        }
      }
    }
  }

  private isConfidentialImage(img: WireDoc): boolean {
    const ref = { publisher: img["publisher"], offer: img["offer"], sku: img["sku"], id: img["id"] };
    if (this.opts.confidentialImage) return this.opts.confidentialImage(ref);
    if (ref.id && !ref.offer) return true;
    return /confidential|cvm/i.test(`${String(ref.offer ?? "")} ${String(ref.sku ?? "")}`);
  }

  /** Returns an LRO failure to apply, or throws the synchronous error. */
  private checkAllocation(req: AllocationRequest): { code: string; message: string } | undefined {
    const pred = this.faults.allocationFailure;
    if (!pred) return undefined;
    const d = pred(req);
    if (!d) return undefined;
    const code: AllocationFailureCode = d === true ? "AllocationFailed" : typeof d === "string" ? d : d.code;
    const custom = typeof d === "object" ? d.message : undefined;
    switch (code) {
      case "SkuNotAvailable":
        throw new HttpError(
          409,
          "SkuNotAvailable",
          custom ??
            `The requested VM size for resource 'Following SKUs have failed for Capacity Restrictions: ${req.vmSize}' is currently not available in location '${req.location}'. Please try another size or deploy to a different location or different zone. See https://aka.ms/azureskunotavailable for details.`,
        );
      case "QuotaExceeded": {
        const need = vcpusOf(req.vmSize);
        const limit = need * 2;
        const usage = limit;
        throw new HttpError(
          409,
          "OperationNotAllowed",
          custom ??
            `Operation could not be completed as it results in exceeding approved ${familyOf(req.vmSize)} Cores quota. Additional details - Deployment Model: Resource Manager, Location: ${req.location}, Current Limit: ${limit}, Current Usage: ${usage}, Additional Required: ${need}, (Minimum) New Limit Required: ${usage + need}. Submit a request for Quota increase at https://aka.ms/ProdportalCRP/#blade/Microsoft_Azure_Capacity/UsageAndQuota.ReactView/Parameters/%7B%22subscriptionId%22:%22${this.subscriptionId}%22,%22command%22:%22openQuotaApprovalBlade%22%7D by specifying parameters listed in the ‘Details’ section for deployment to succeed. Please read more about quota limits at https://docs.microsoft.com/en-us/azure/azure-supportability/per-vm-quota-requests`,
        );
      }
      case "ZonalAllocationFailed":
        return {
          code,
          message:
            custom ??
            "Allocation failed. We do not have sufficient capacity for the requested VM size in this zone. Read more about improving likelihood of allocation success at http://aka.ms/allocation-guidance",
        };
      case "OverconstrainedAllocationRequest":
      case "OverconstrainedZonalAllocationRequest":
        return {
          code,
          message:
            custom ??
            `Allocation failed. VM(s) with the following constraints cannot be allocated, because the condition is too restrictive. Please remove some constraints and try again. Constraints applied are:\n  - ${code === "OverconstrainedZonalAllocationRequest" ? "Availability Zone\n  - " : ""}VM Size\n`,
        };
      case "AllocationFailed":
      default:
        return {
          code: "AllocationFailed",
          message:
            custom ??
            "Allocation failed. We do not have sufficient capacity for the requested VM size in this region. Read more about improving likelihood of allocation success at http://aka.ms/allocation-guidance",
        };
    }
  }

  private putVm(rg: string, name: string, body: WireDoc, current: Res | undefined, apiVersion: string) {
    this.validateVm(rg, name, body, current);
    const vmId = this.idFor("virtualMachines", rg, name);
    const location = String(body["location"]);
    const bodyProps: WireDoc = isObj(body["properties"]) ? clone(body["properties"]) : {};
    const customData: unknown = bodyProps["osProfile"]?.["customData"];
    const needsAllocation = !current || !current.vm?.allocated;
    let failure: { code: string; message: string } | undefined;
    if (needsAllocation) {
      failure = this.checkAllocation(
        {
          operation: "create",
          resourceGroup: rg,
          name,
          location,
          vmSize: String(bodyProps["hardwareProfile"]?.["vmSize"] ?? "Standard_D2s_v5"),
          zones: Array.isArray(body["zones"]) ? (body["zones"] as string[]) : [],
          securityType: bodyProps["securityProfile"]?.["securityType"],
          priority: bodyProps["priority"],
          body: clone(body),
        });
    }

    // Build the stored document.
    const oldProps: WireDoc = current && isObj(current.doc["properties"]) ? current.doc["properties"] : {};
    const props: WireDoc = bodyProps;
    props["vmId"] = oldProps["vmId"] ?? this.guid();
    props["timeCreated"] = oldProps["timeCreated"] ?? this.iso();
    props["hardwareProfile"] ??= { vmSize: "Standard_D2s_v5" };
    const storage: WireDoc = (props["storageProfile"] ??= {});
    const osDisk: WireDoc = (storage["osDisk"] ??= {});
    const oldOsDisk: WireDoc = oldProps["storageProfile"]?.["osDisk"] ?? {};
    osDisk["name"] ??= oldOsDisk["name"] ?? `${name}_OsDisk_1_${this.hex(32)}`;
    osDisk["createOption"] ??= "FromImage";
    osDisk["caching"] ??= "ReadWrite";
    osDisk["osType"] ??= props["osProfile"]?.["windowsConfiguration"] ? "Windows" : "Linux";
    osDisk["deleteOption"] ??= "Detach";
    osDisk["diskSizeGB"] ??= oldOsDisk["diskSizeGB"] ?? 30;
    const md: WireDoc = (osDisk["managedDisk"] ??= {});
    md["storageAccountType"] ??= "Premium_LRS";
    md["id"] = this.idFor("disks", rg, String(osDisk["name"]));
    storage["dataDisks"] ??= [];
    if (isObj(storage["imageReference"])) storage["imageReference"]["exactVersion"] ??= String(storage["imageReference"]["version"] ?? "latest").replace("latest", "1.0.0");
    if (isObj(props["osProfile"])) {
      // Azure never returns secrets.
      delete props["osProfile"]["adminPassword"];
      delete props["osProfile"]["customData"];
      props["osProfile"]["secrets"] ??= [];
      props["osProfile"]["allowExtensionOperations"] ??= true;
      props["osProfile"]["requireGuestProvisionSignal"] ??= true;
    }
    const doc: WireDoc = { location, properties: props };
    if (body["tags"] !== undefined) doc["tags"] = clone(body["tags"]);
    if (body["zones"] !== undefined) doc["zones"] = clone(body["zones"]);
    if (body["identity"] !== undefined) doc["identity"] = clone(body["identity"]);
    if (body["plan"] !== undefined) doc["plan"] = clone(body["plan"]);

    let r: Res;
    const created = !current;
    if (current) {
      current.doc = doc;
      current.etag += 1;
      r = current;
    } else {
      r = this.newRes("virtualMachines", rg, name, doc, "Creating");
      r.vm = { power: null, bootAt: Infinity, serial: "", allocated: false };
      this.creates.set(name, (this.creates.get(name) ?? 0) + 1);
    }
    const vm = r.vm!;
    // An update that does not send custom data (a GET result PUT back) keeps what the VM had.
    if (typeof customData === "string") vm.customData = customData;
    this.attachNics(r);

    if (needsAllocation) {
      r.provisioningState = "Creating";
      vm.failure = undefined;
      if (!failure) {
        this.ensureOsDisk(r);
        vm.allocated = true;
        vm.power = "starting";
        vm.bootAt = Infinity;
        this.appendSerial(r, this.bootPreamble(r));
      } else {
        vm.power = null;
      }
    } else {
      r.provisioningState = "Updating";
      this.ensureOsDisk(r);
    }
    const op = this.newOp(
      r,
      created ? "create" : "update",
      location,
      () => {
        r.provisioningState = "Succeeded";
        if (vm.power === "starting" && vm.bootAt === Infinity) vm.bootAt = this.now() + this.faults.bootDelayMs;
        this.refreshVm(r);
      },
      failure,
      () => {
        r.provisioningState = "Failed";
        vm.failure = failure;
      },
    );
    return this.lroReply(r, op, created, apiVersion);
  }

  private attachNics(r: Res): void {
    const refs: WireDoc[] = r.doc["properties"]?.["networkProfile"]?.["networkInterfaces"] ?? [];
    const wanted = new Set<Res>();
    refs.forEach((ref, i) => {
      const nic = this.byId(ref["id"], "networkInterfaces");
      if (!nic) return;
      wanted.add(nic);
      const p = nic.doc["properties"] as WireDoc;
      p["virtualMachine"] = { id: r.id };
      p["primary"] = ref["properties"]?.["primary"] ?? i === 0;
      p["macAddress"] ??= Array.from({ length: 6 }, (_, j) => (j === 0 ? "00" : this.hex(2)).toUpperCase()).join("-");
      nic.etag += 1;
    });
    for (const nic of this.resources.values()) {
      if (nic.type !== "networkInterfaces" || wanted.has(nic)) continue;
      const owner = String(nic.doc["properties"]?.["virtualMachine"]?.["id"] ?? "").toLowerCase();
      if (owner === r.id.toLowerCase()) this.detachNic(nic);
    }
  }

  private detachNic(nic: Res): void {
    const p = nic.doc["properties"] as WireDoc;
    delete p["virtualMachine"];
    delete p["primary"];
    delete p["macAddress"];
    nic.etag += 1;
  }

  private ensureOsDisk(r: Res): void {
    const props = r.doc["properties"] as WireDoc;
    const osDisk = props["storageProfile"]["osDisk"] as WireDoc;
    const diskName = String(osDisk["name"]);
    const key = this.key("disks", r.rg, diskName);
    r.vm!.osDiskKey = key;
    const existing = this.resources.get(key);
    if (existing) {
      existing.doc["managedBy"] = r.id;
      existing.doc["properties"]["diskState"] = "Attached";
      return;
    }
    const secType: string | undefined = props["securityProfile"]?.["securityType"];
    const enc: string | undefined = osDisk["managedDisk"]?.["securityProfile"]?.["securityEncryptionType"];
    const img: WireDoc = props["storageProfile"]["imageReference"] ?? {};
    const sizeGb = Number(osDisk["diskSizeGB"] ?? 30);
    const diskProps: WireDoc = {
      osType: osDisk["osType"],
      hyperVGeneration: "V2",
      creationData: {
        createOption: osDisk["createOption"] === "Attach" ? "Import" : "FromImage",
        ...(img["publisher"]
          ? {
              imageReference: {
                id: `/Subscriptions/${this.subscriptionId}/Providers/Microsoft.Compute/Locations/${String(r.doc["location"])}/Publishers/${String(img["publisher"])}/ArtifactTypes/VMImage/Offers/${String(img["offer"])}/Skus/${String(img["sku"])}/Versions/${String(img["exactVersion"] ?? img["version"] ?? "1.0.0")}`,
              },
            }
          : img["id"]
            ? { imageReference: { id: img["id"] } }
            : {}),
      },
      diskSizeGB: sizeGb,
      diskSizeBytes: sizeGb * 1024 ** 3,
      diskIOPSReadWrite: 120,
      diskMBpsReadWrite: 25,
      encryption: { type: "EncryptionAtRestWithPlatformKey" },
      timeCreated: this.iso(),
      uniqueId: this.guid(),
      diskState: "Attached",
      networkAccessPolicy: "AllowAll",
      publicNetworkAccess: "Enabled",
      tier: "P4",
    };
    if (secType === "ConfidentialVM" && enc) {
      diskProps["securityProfile"] = { securityType: diskSecurityType(enc) };
    } else if (secType === "TrustedLaunch") {
      diskProps["securityProfile"] = { securityType: "TrustedLaunch" };
    }
    const sat = String(osDisk["managedDisk"]?.["storageAccountType"] ?? "Premium_LRS");
    const doc: WireDoc = {
      location: r.doc["location"],
      managedBy: r.id,
      sku: { name: sat, tier: sat.startsWith("Premium") ? "Premium" : "Standard" },
      properties: diskProps,
    };
    if (r.doc["zones"]) doc["zones"] = clone(r.doc["zones"]);
    this.newRes("disks", r.rg, diskName, doc, "Succeeded");
  }

  // ----- PATCH ---------------------------------------------------------------------------------

  private patchResource(type: ResourceType, rg: string, name: string, body: WireDoc) {
    const r = this.resources.get(this.key(type, rg, name));
    if (!r) throw this.notFound(type, rg, name);
    this.received.push({ method: "PATCH", type, resourceGroup: rg, name, body: clone(body), time: this.now() });
    const { properties, ...rest } = body;
    for (const [k, v] of Object.entries(rest)) if (v !== undefined) r.doc[k] = clone(v);
    if (isObj(properties)) r.doc["properties"] = deepMerge(r.doc["properties"] ?? {}, properties);
    r.etag += 1;
    return { status: 200, body: this.render(r), headers: { etag: this.etagOf(r) } };
  }

  // ----- DELETE --------------------------------------------------------------------------------

  private deleteResource(type: ResourceType, rg: string, name: string, apiVersion: string) {
    const r = this.resources.get(this.key(type, rg, name));
    if (!r) return { status: 204 };
    if (r.op && !r.op.done) this.observe(r.op);
    if (!this.resources.has(r.key)) return { status: 204 };
    if (r.op && !r.op.done && r.op.kind === "delete") {
      return { status: 202, headers: { Location: this.opUrl(r.op, apiVersion, true) } };
    }
    const props = r.doc["properties"] as WireDoc;
    if (type === "disks" && r.doc["managedBy"]) {
      throw new HttpError(409, "OperationNotAllowed", `Disk ${name} is attached to VM ${String(r.doc["managedBy"])}.`);
    }
    if (type === "networkInterfaces" && props["virtualMachine"]) {
      throw new HttpError(
        400,
        "NicInUse",
        `Network Interface ${r.id} is used by existing resource ${String(props["virtualMachine"]["id"])}. In order to delete the network interface, it must be dissociated from the resource. To learn more, see aka.ms/deletenic.`,
      );
    }
    if (type === "publicIPAddresses" && props["ipConfiguration"]) {
      throw new HttpError(
        400,
        "PublicIPAddressCannotBeDeleted",
        `Public IP address ${r.id} can not be deleted since it is still allocated to resource ${String(props["ipConfiguration"]["id"])}. In order to delete the public IP, disassociate/detach the Public IP address from the resource.  To learn how to do this, see aka.ms/deletepublicip.`,
      );
    }
    r.provisioningState = "Deleting";
    if (r.vm) {
      this.refreshVm(r);
      if (r.vm.power) r.vm.power = "deallocating";
    }
    const op = this.newOp(r, "delete", String(r.doc["location"] ?? "eastus"), () => this.removeResource(r));
    return { status: 202, headers: { Location: this.opUrl(op, apiVersion, true) } };
  }

  private removeResource(r: Res): void {
    this.resources.delete(r.key);
    if (r.type === "virtualMachines") {
      const props = r.doc["properties"] as WireDoc;
      const osDisk = props["storageProfile"]?.["osDisk"] as WireDoc | undefined;
      const disk = r.vm?.osDiskKey ? this.resources.get(r.vm.osDiskKey) : undefined;
      if (disk) {
        if (osDisk?.["deleteOption"] === "Delete") {
          this.resources.delete(disk.key);
        } else {
          delete disk.doc["managedBy"];
          disk.doc["properties"]["diskState"] = "Unattached";
          disk.etag += 1;
        }
      }
      for (const ref of (props["networkProfile"]?.["networkInterfaces"] as WireDoc[] | undefined) ?? []) {
        const nic = this.byId(ref["id"], "networkInterfaces");
        if (!nic) continue;
        this.detachNic(nic);
        if (ref["properties"]?.["deleteOption"] === "Delete") this.removeResource(nic);
      }
    } else if (r.type === "networkInterfaces") {
      for (const pip of [...this.resources.values()]) {
        if (pip.type !== "publicIPAddresses") continue;
        const owner = String(pip.doc["properties"]?.["ipConfiguration"]?.["id"] ?? "").toLowerCase();
        if (owner.startsWith(r.id.toLowerCase() + "/")) {
          delete pip.doc["properties"]["ipConfiguration"];
          pip.etag += 1;
          if (pip.doc["properties"]["deleteOption"] === "Delete") this.resources.delete(pip.key);
        }
      }
    }
  }

  // ----- VM actions ----------------------------------------------------------------------------

  private vmAction(method: string, rg: string, name: string, action: string, query: Record<string, string>, apiVersion: string) {
    const r = this.resources.get(this.key("virtualMachines", rg, name));
    if (!r || !r.vm) throw this.notFound("virtualMachines", rg, name);
    if (r.op && !r.op.done) this.observe(r.op);
    if (!this.resources.has(r.key)) throw this.notFound("virtualMachines", rg, name);
    this.refreshVm(r);
    const vm = r.vm;
    const a = action.toLowerCase();
    if (a === "instanceview") {
      if (method !== "GET") throw this.methodNotAllowed(method);
      return { status: 200, body: this.instanceView(r) };
    }
    if (method !== "POST") throw this.methodNotAllowed(method);
    const location = String(r.doc["location"]);
    const started = (): { code: string; message: string } | undefined =>
      vm.allocated
        ? undefined
        : this.checkAllocation(
            {
              operation: "start",
              resourceGroup: rg,
              name,
              location,
              vmSize: String(r.doc["properties"]?.["hardwareProfile"]?.["vmSize"] ?? ""),
              zones: Array.isArray(r.doc["zones"]) ? (r.doc["zones"] as string[]) : [],
              securityType: r.doc["properties"]?.["securityProfile"]?.["securityType"],
              priority: r.doc["properties"]?.["priority"],
            });
    const actionReply = (op: Op) => ({
      status: 202,
      headers: { "Azure-AsyncOperation": this.opUrl(op, apiVersion, false), Location: this.opUrl(op, apiVersion, true) },
    });
    switch (a) {
      case "retrievebootdiagnosticsdata": {
        const enabled = r.doc["properties"]?.["diagnosticsProfile"]?.["bootDiagnostics"]?.["enabled"];
        if (enabled === false) {
          throw new HttpError(409, "OperationNotAllowed", `Boot diagnostics is not enabled for virtual machine '${name}'.`);
        }
        const minutes = Math.min(1440, Math.max(1, Number(query["sasUriExpirationTimeInMinutes"] ?? "120") || 120));
        const vmId = String(r.doc["properties"]["vmId"]);
        const base = `/bootdiagnostics/${this.subscriptionId}/${rg}/${name}/${vmId}`;
        return {
          status: 200,
          body: {
            consoleScreenshotBlobUri: this.sasUrl(`${base}/${name}.${vmId}.screenshot.bmp`, minutes),
            serialConsoleLogBlobUri: this.sasUrl(`${base}/${name}.${vmId}.serialconsole.log`, minutes),
          },
        };
      }
      case "start":
      case "restart": {
        if (a === "start" && vm.power === "running") {
          return actionReply(this.newOp(r, "action", location, () => undefined));
        }
        const failure = started();
        vm.power = "starting";
        vm.bootAt = Infinity;
        const op = this.newOp(
          r,
          "action",
          location,
          () => {
            vm.allocated = true;
            this.appendSerial(r, this.bootPreamble(r));
            if (vm.bootAt === Infinity) vm.bootAt = this.now() + this.faults.bootDelayMs;
            this.refreshVm(r);
          },
          failure,
          () => {
            vm.power = "deallocated";
          },
        );
        return actionReply(op);
      }
      case "poweroff": {
        vm.power = "stopping";
        const op = this.newOp(r, "action", location, () => {
          this.appendSerial(r, "[  OK  ] Reached target System Power Off.\n[  123.456789] reboot: Power down\n");
          vm.power = "stopped";
        });
        return actionReply(op);
      }
      case "deallocate": {
        vm.power = "deallocating";
        const op = this.newOp(r, "action", location, () => {
          vm.power = "deallocated";
          vm.allocated = false;
        });
        return actionReply(op);
      }
      default:
        throw new HttpError(404, "NotFound", `The virtual machine action '${action}' is not supported by the fake.`);
    }
  }

  // ----- operations ----------------------------------------------------------------------------

  private newOp(
    r: Res,
    kind: Op["kind"],
    location: string,
    onSuccess: () => void,
    failure?: { code: string; message: string },
    onFailure?: () => void,
  ): Op {
    const op: Op = {
      id: this.guid(),
      ns: NAMESPACE[r.type],
      location,
      kind,
      resKey: r.key,
      remaining: Math.max(0, kind === "delete" ? this.faults.deleteInProgressPolls : this.faults.lroInProgressPolls),
      done: false,
      ...(failure ? { failure } : {}),
      startTime: this.iso(),
      onSuccess,
      ...(onFailure ? { onFailure } : {}),
      resultBody: () => {
        const cur = this.resources.get(r.key);
        return cur ? this.render(cur) : undefined;
      },
    };
    // A new operation supersedes a pending one on the same resource.
    if (r.op && !r.op.done) this.finish(r.op);
    r.op = op;
    this.ops.set(op.id, op);
    return op;
  }

  private opUrl(op: Op, apiVersion: string, location: boolean): string {
    const seg = location && op.ns === "Microsoft.Network" ? "operationResults" : "operations";
    const q = location ? `monitor=true&api-version=${apiVersion}` : `p=${op.id}&api-version=${apiVersion}`;
    return `${this.endpoint}/subscriptions/${this.subscriptionId}/providers/${op.ns}/locations/${op.location}/${seg}/${op.id}?${q}`;
  }

  /** One observation: consumes an InProgress reply or finishes the operation. */
  private observe(op: Op): void {
    if (op.done) return;
    if (op.remaining > 0) {
      op.remaining -= 1;
      return;
    }
    this.finish(op);
  }

  private finish(op: Op): void {
    if (op.done) return;
    op.done = true;
    op.endTime = this.iso();
    const r = this.resources.get(op.resKey);
    if (r && r.op === op) r.op = undefined;
    if (op.failure) op.onFailure?.();
    else op.onSuccess();
  }

  private serveOperation(
    path: string,
    query: Record<string, string>,
    reply: (status: number, body?: unknown, headers?: Record<string, string>) => void,
  ): void {
    const m = /^\/subscriptions\/([^/]+)\/providers\/([^/]+)\/locations\/([^/]+)\/(operations|operationresults)\/([^/]+)$/i.exec(path);
    if (!m) throw new HttpError(404, "NotFound", "Operation not found.");
    if (m[1]!.toLowerCase() !== this.subscriptionId.toLowerCase()) {
      reply(404, { error: { code: "SubscriptionNotFound", message: `The subscription '${m[1]!}' could not be found.` } });
      return;
    }
    const op = this.ops.get(m[5]!);
    if (!op) {
      reply(404, { error: { code: "NotFound", message: `The operation '${m[5]!}' was not found.` } });
      return;
    }
    this.observe(op);
    const locationStyle = m[4]!.toLowerCase() === "operationresults" || (query["monitor"] ?? "").toLowerCase() === "true";
    const apiVersion = query["api-version"] ?? "";
    if (!locationStyle) {
      const body: WireDoc = { name: op.id, startTime: op.startTime, status: op.done ? (op.failure ? "Failed" : "Succeeded") : "InProgress" };
      if (op.done) body["endTime"] = op.endTime;
      if (op.done && op.failure) body["error"] = { code: op.failure.code, message: op.failure.message };
      reply(200, body);
      return;
    }
    if (!op.done) {
      reply(202, undefined, { Location: this.opUrl(op, apiVersion, true) });
      return;
    }
    if (op.failure) {
      reply(409, { error: { code: op.failure.code, message: op.failure.message } });
      return;
    }
    if (op.kind === "delete") {
      reply(204);
      return;
    }
    if (op.kind === "action") {
      reply(200);
      return;
    }
    reply(200, op.resultBody?.());
  }

  // ----- VM runtime ----------------------------------------------------------------------------

  private refreshVm(r: Res): void {
    const vm = r.vm;
    if (!vm) return;
    if (r.op && !r.op.done) return;
    if (vm.power === "starting" && this.now() >= vm.bootAt) {
      vm.power = "running";
      const report = this.bootScriptReport(r);
      if (report) this.appendSerial(r, report);
      this.appendSerial(r, this.bootEpilogue(r));
    }
  }

  /**
   * What the bridge's boot script writes on the serial console as cloud-init runs it, on the VM's
   * first boot only: its host key report (common/cloud-init.ts), for the request id in its custom
   * data. Nothing for custom data that is not the bridge's script.
   */
  private bootScriptReport(r: Res): string | null {
    const vm = r.vm!;
    if (vm.bootScriptRan || !vm.customData) return null;
    vm.bootScriptRan = true;
    const script = Buffer.from(vm.customData, "base64").toString("utf8");
    const requestId = /^CB_REQUEST_ID='([^']*)'$/m.exec(script)?.[1];
    if (requestId === undefined) return null;
    const report = this.hostKeyReports.get(r.key) ?? this.faults.guestHostKey;
    if (report === "never") return null;
    const fingerprint = report === "none" ? null : this.hostKeyFingerprint(r.rg, r.name);
    // The script writes straight to the console device: no cloud-init prefix on its lines.
    // A TDX grant's script reports its evidence next (src/attestation/guest.ts): this fake VM has no
    // tpm2-tools, so the report is the script's "none" line, unless a test supplies the guest's own.
    const evidence = /^CB_ATTEST_NONCE=/m.test(script) ? (this.guestEvidence?.(script) ?? `COMPUTE-BRIDGE-EVIDENCE-NONE ${requestId} tpm2-tools is not installed (tpm2_nvdefine missing)\n`) : "";
    return `compute-bridge: boot script for ${requestId} started\n${hostKeyMarker(requestId, fingerprint)}\n${evidence}`;
  }

  private appendSerial(r: Res, text: string): void {
    if (!r.vm) return;
    r.vm.serial += text.endsWith("\n") ? text : `${text}\n`;
  }

  private bootPreamble(r: Res): string {
    const props = r.doc["properties"] as WireDoc;
    const size = String(props["hardwareProfile"]?.["vmSize"] ?? "");
    const lines = [
      "[    0.000000] Linux version 6.8.0-1021-azure (buildd@lcy02-amd64-051) (x86_64-linux-gnu-gcc-12 (Ubuntu 12.3.0-1ubuntu1~22.04) 12.3.0) #25~22.04.1-Ubuntu SMP",
      "[    0.000000] Command line: BOOT_IMAGE=/boot/vmlinuz-6.8.0-1021-azure root=PARTUUID=0f0a0b0c-0d0e-0f10-1112-131415161718 ro console=tty1 console=ttyS0 earlyprintk=ttyS0 panic=-1",
      "[    0.000000] DMI: Microsoft Corporation Virtual Machine/Virtual Machine, BIOS Hyper-V UEFI Release v4.1 08/23/2024",
    ];
    if (props["securityProfile"]?.["securityType"] === "ConfidentialVM") {
      lines.push(
        TDX_SIZE.test(size)
          ? "[    0.000000] Memory Encryption Features active: Intel TDX"
          : "[    0.000000] Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP",
      );
    }
    return lines.join("\n") + "\n";
  }

  private bootEpilogue(r: Res): string {
    const props = r.doc["properties"] as WireDoc;
    const host = String(props["osProfile"]?.["computerName"] ?? r.name);
    return [
      `[   11.234567] cloud-init[812]: Cloud-init v. 24.4-0ubuntu1~22.04.1 finished at ${new Date(this.now()).toUTCString()}. Datasource DataSourceAzure [seed=/dev/sr0].  Up 11.23 seconds`,
      "",
      `Ubuntu 22.04.5 LTS ${host} ttyS0`,
      "",
      `${host} login: `,
    ].join("\n");
  }

  // ----- boot diagnostics blobs ----------------------------------------------------------------

  private sign(path: string, se: string): string {
    return createHmac("sha256", this.sasSecret).update(`${path}\n${se}`).digest("base64");
  }

  private sasUrl(path: string, minutes: number): string {
    const se = new Date(this.now() + minutes * 60_000).toISOString().replace(/\.\d{3}Z$/, "Z");
    const q = new URLSearchParams({ sv: "2022-11-02", spr: "https", se, sr: "b", sp: "r", sig: this.sign(path, se) });
    return `${this.endpoint}${path.split("/").map(encodeURIComponent).join("/")}?${q.toString()}`;
  }

  private serveBlob(
    path: string,
    query: Record<string, string>,
    reply: (status: number, body?: unknown, headers?: Record<string, string>, contentType?: string) => void,
  ): void {
    const xml = (code: string, message: string) =>
      `\ufeff<?xml version="1.0" encoding="utf-8"?><Error><Code>${code}</Code><Message>${message}\nRequestId:${this.guid()}\nTime:${this.iso()}</Message></Error>`;
    const se = query["se"];
    const sig = query["sig"];
    if (!se || !sig || sig !== this.sign(path, se) || query["sp"] !== "r") {
      reply(
        403,
        xml("AuthenticationFailed", "Server failed to authenticate the request. Make sure the value of Authorization header is formed correctly including the signature."),
        { "x-ms-error-code": "AuthenticationFailed" },
        "application/xml",
      );
      return;
    }
    if (Date.parse(se) < this.now()) {
      reply(403, xml("AuthenticationFailed", "Signed expiry time has to be after signed start time or the SAS has expired."), { "x-ms-error-code": "AuthenticationFailed" }, "application/xml");
      return;
    }
    const m = /^\/bootdiagnostics\/[^/]+\/([^/]+)\/([^/]+)\/([^/]+)\/[^/]+\.(serialconsole\.log|screenshot\.bmp)$/i.exec(path);
    const r = m ? this.resources.get(this.key("virtualMachines", m[1]!, m[2]!)) : undefined;
    if (!m || !r?.vm || String(r.doc["properties"]?.["vmId"]) !== m[3]) {
      reply(404, xml("BlobNotFound", "The specified blob does not exist."), { "x-ms-error-code": "BlobNotFound" }, "application/xml");
      return;
    }
    this.refreshVm(r);
    const headers = { "x-ms-blob-type": "BlockBlob", "x-ms-version": "2022-11-02", "last-modified": new Date(this.now()).toUTCString() };
    if (m[4]!.toLowerCase() === "serialconsole.log") {
      reply(200, r.vm.serial, headers, "text/plain");
      return;
    }
    reply(200, TINY_BMP, headers, "image/bmp");
  }
}

/** 1x1 white 24-bit BMP. */
const TINY_BMP = Buffer.from(
  "424d3a0000000000000036000000280000000100000001000000010018000000000004000000130b0000130b00000000000000000000ffffff00",
  "hex",
);
