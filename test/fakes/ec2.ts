/**
 * Fake AWS EC2 endpoint speaking the real EC2 Query wire protocol (form-encoded `POST /`, XML replies in the
 * http://ec2.amazonaws.com/doc/2016-11-15/ namespace, `<Response><Errors>…</Errors><RequestID>` error bodies) on
 * 127.0.0.1, so the unmodified `EC2Client` from `@aws-sdk/client-ec2` works against it with
 * `endpoint: fake.endpoint`. Node built-ins only (plus the boot script's marker format from
 * src/backends/common/cloud-init.ts). Actions: RunInstances, DescribeInstances, TerminateInstances,
 * GetConsoleOutput. Requests must be SigV4-signed; the region in the credential scope selects the "region".
 *
 * SDK retry behaviour MEASURED against this fake (@aws-sdk/client-ec2 3.1169.0, @smithy/core standard retry
 * strategy, node 20; attempts counted server-side, see ec2.test.ts):
 *  - Default maxAttempts = 3 (1 call + 2 retries). Each attempt sends `amz-sdk-request: attempt=N; max=3` and the
 *    same `amz-sdk-invocation-id`; the fake records both in `calls`.
 *  - 3 attempts: RequestLimitExceeded/503, Throttling, and any 429 (retried by CODE even if the status were 400;
 *    throttling backoff rand*1s*2^n: 0.7–2.6 s total observed), and EVERY 500/502/503/504 whatever the code
 *    (InternalError/500, InsufficientInstanceCapacity/500, Unavailable/503; backoff rand*50ms*2^n: ~50–100 ms).
 *  - 1 attempt (not retried): 501 (non-transient 5xx), and all 4xx codes tried: InvalidInstanceID.NotFound,
 *    InvalidInstanceID.Malformed, IdempotentParameterMismatch, InstanceLimitExceeded, VcpuLimitExceeded,
 *    Unsupported (400), AuthFailure (401), UnauthorizedOperation/SignatureDoesNotMatch (403), DryRunOperation (412).
 *  - RunInstances without ClientToken: the SDK generates a UUID token and re-sends the SAME token on every retry,
 *    so a 500 after the launch committed (`failNext(..., { afterCommit: true })`) is healed by the retry getting
 *    the original reservation back.
 *  - Errors surface as `EC2ServiceException`s whose `name` is the wire `<Code>`, `message` the `<Message>`,
 *    `$metadata.httpStatusCode`/`.attempts` as sent/made, `$fault` "client" for 4xx and "server" for 5xx.
 * HTTP statuses per code (EC2 API reference: client errors 4xx, server errors 5xx; values as real EC2 sends them):
 * RequestLimitExceeded 503, InternalError 500, InsufficientInstanceCapacity 500, Unavailable 503,
 * AuthFailure 401, UnauthorizedOperation 403, SignatureDoesNotMatch 403, DryRunOperation 412, all others 400.
 *
 * Guest: when an instance first becomes running, the fake plays the first step of the bridge's boot script (the
 * user data, gzip or not, carrying a `CB_REQUEST_ID='...'` line): it appends
 * `COMPUTE-BRIDGE-HOSTKEY <request_id> <fingerprint>` to the console, the fingerprint being
 * `hostKeyFingerprint(instanceId)` (faults.hostKeyReport makes it report "none", or nothing). Instances launched
 * with other user data report nothing. GetConsoleOutput with `Latest=true` returns the same live text, except for
 * instance types in faults.nonNitroTypes, which answer UnsupportedOperation/400: only Nitro types support Latest
 * (GetConsoleOutput API reference, which names no error code; UnsupportedOperation is EC2's common client error
 * for an operation the resource does not support).
 *
 * Real-EC2 semantics modelled (each with its source in test/fakes/FIDELITY.md):
 *  - Request rate limits per action category and Region (faults.rateLimits, off by default): a token bucket per
 *    (region, API class) refilled every second on the fake's clock; an empty bucket answers RequestLimitExceeded/503.
 *  - Resource rate limits (faults.resourceLimits, off by default): RunInstances and TerminateInstances also take one
 *    token per instance from a resource bucket per Region (launches: 1000 / 2 per s; terminations: 1000 / 20 per s
 *    on EC2); a call its bucket cannot cover answers RequestLimitExceeded/503 and takes nothing.
 *  - Eventual consistency (faults.consistencyDelayMs, default 0): for that long after RunInstances the instance is
 *    invisible to DescribeInstances (filters omit it; InstanceId.N answers InvalidInstanceID.NotFound),
 *    TerminateInstances and GetConsoleOutput (InvalidInstanceID.NotFound) although it exists and boots.
 *  - ClientToken lifecycle: a token stays bound to the parameters of the call that used it, also when that call
 *    failed (capacity, limit): the same token with other parameters answers IdempotentParameterMismatch, with the
 *    same parameters the launch is tried again; a token whose instances are all terminated answers
 *    IdempotentInstanceTerminated (400; the message is the fake's own wording).
 *  - GetConsoleOutput returns only the most recent 64 KB of console output.
 *  - Terminated instances stay visible for faults.terminatedVisibleMs (default one hour), then vanish from every call.
 *
 * Time: state changes run on a virtual clock (`now()`, `advance(ms)`, `bootAll()`, `settleAll()`), applied
 * lazily when a request arrives or an accessor is read, so tests never sleep. RunInstances always answers
 * "pending"; TerminateInstances answers "shutting-down". Fault rates and generated ids come from a seeded PRNG.
 */
import { createHash, createHmac, randomUUID, timingSafeEqual } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { gunzipSync } from "node:zlib";
import { hostKeyMarker } from "../../src/backends/common/cloud-init.js";

export const EC2_API_VERSION = "2016-11-15";
export const EC2_NAMESPACE = `http://ec2.amazonaws.com/doc/${EC2_API_VERSION}/`;

/**
 * Credentials the fake accepts when `start()` is given neither `accessKeyIds` nor `credentials`.
 * Not frozen: the SDK writes bookkeeping (`$source`) onto the credentials object it is given.
 */
export const FAKE_EC2_CREDENTIALS: { readonly accessKeyId: string; readonly secretAccessKey: string } = {
  accessKeyId: "AKIAFAKEEC2000000000",
  secretAccessKey: "fake/ec2/secret/key/0000000000000000000000",
};

export type InstanceStateName = "pending" | "running" | "shutting-down" | "terminated" | "stopping" | "stopped";

export const STATE_CODES: Readonly<Record<InstanceStateName, number>> = Object.freeze({
  pending: 0,
  running: 16,
  "shutting-down": 32,
  terminated: 48,
  stopping: 64,
  stopped: 80,
});

/** Default HTTP status per error code; codes not listed answer 400. */
export const ERROR_STATUS: Readonly<Record<string, number>> = Object.freeze({
  RequestLimitExceeded: 503,
  Unavailable: 503,
  ServiceUnavailable: 503,
  InternalError: 500,
  InsufficientInstanceCapacity: 500,
  InsufficientHostCapacity: 500,
  InsufficientAddressCapacity: 500,
  InsufficientCapacity: 500,
  InsufficientReservedInstanceCapacity: 500,
  AuthFailure: 401,
  MissingAuthenticationToken: 401,
  UnauthorizedOperation: 403,
  SignatureDoesNotMatch: 403,
  DryRunOperation: 412,
});

export function statusForCode(code: string): number {
  return ERROR_STATUS[code] ?? 400;
}

export type Ec2Action = "RunInstances" | "DescribeInstances" | "TerminateInstances" | "GetConsoleOutput";
const ACTIONS: ReadonlySet<string> = new Set<Ec2Action>(["RunInstances", "DescribeInstances", "TerminateInstances", "GetConsoleOutput"]);

/**
 * EC2's request-rate categories as the bridge uses them (devguide "Request throttling for the Amazon EC2 API"):
 * Describe* are non-mutating, RunInstances/TerminateInstances mutating, GetConsoleOutput in the lowest class.
 */
export type Ec2ApiClass = "describe" | "mutate" | "console";
export const EC2_API_CLASS: Readonly<Record<Ec2Action, Ec2ApiClass>> = Object.freeze({
  DescribeInstances: "describe",
  RunInstances: "mutate",
  TerminateInstances: "mutate",
  GetConsoleOutput: "console",
});

export interface RateLimit {
  bucket: number;
  refillPerSecond: number;
}

/** EC2 keeps only the most recent 64 KB of console output (GetConsoleOutput API reference). */
export const CONSOLE_OUTPUT_MAX_BYTES = 64 * 1024;

export interface StateReason {
  code: string;
  message: string;
}

export interface FakeInstance {
  readonly instanceId: string;
  readonly reservationId: string;
  readonly region: string;
  readonly availabilityZone: string;
  readonly accessKeyId: string;
  readonly imageId: string;
  readonly instanceType: string;
  readonly launchTime: Date;
  readonly amiLaunchIndex: number;
  readonly state: InstanceStateName;
  /** Private IP; kept for the whole life of the instance (omitted from replies once terminated, as EC2 does). */
  readonly privateIpAddress: string;
  /** Public IP; only set while running. */
  readonly publicIpAddress: string | undefined;
  readonly tags: Readonly<Record<string, string>>;
  readonly clientToken: string | undefined;
  /** UserData, base64-decoded as UTF-8 (what cloud-init would execute). */
  readonly userData: string | undefined;
  readonly userDataBase64: string | undefined;
  readonly keyName: string | undefined;
  readonly subnetId: string | undefined;
  readonly securityGroupIds: readonly string[];
  readonly shutdownBehavior: "stop" | "terminate";
  readonly consoleOutput: string;
  readonly stateReason: StateReason | undefined;
  /** Free-text `reason` (StateTransitionReason in the SDK), e.g. "User initiated (2024-01-01 00:00:00 GMT)". */
  readonly reason: string;
  /** All request parameters of the RunInstances call that created it (minus Action/Version). */
  readonly launchParams: Readonly<Record<string, string>>;
}

export interface CallRecord {
  action: string;
  params: Record<string, string>;
  status: number;
  /** Error code when status >= 300. */
  code: string | undefined;
  region: string | undefined;
  accessKeyId: string | undefined;
  /** From the SDK's `amz-sdk-request: attempt=N; max=M` header. */
  attempt: number | undefined;
  maxAttempts: number | undefined;
  /** From `amz-sdk-invocation-id`: identical for all attempts of one SDK call. */
  invocationId: string | undefined;
  /** Virtual time of the call. */
  at: number;
}

export interface InjectedError {
  code: string;
  /** Defaults to `statusForCode(code)`. */
  status?: number;
  message?: string;
}

export interface RunInstancesRequestInfo {
  region: string;
  availabilityZone: string;
  instanceType: string;
  imageId: string;
  minCount: number;
  maxCount: number;
  tags: Readonly<Record<string, string>>;
  clientToken: string | undefined;
  params: Readonly<Record<string, string>>;
}

/**
 * Capacity fault for RunInstances. A set/array answers InsufficientInstanceCapacity for requests whose instance
 * type, region or availability zone is in it. A predicate may return true (InsufficientInstanceCapacity), an
 * error code string (e.g. "InstanceLimitExceeded", "VcpuLimitExceeded", "Unsupported") or a full InjectedError;
 * false/undefined/null lets the launch proceed.
 */
/**
 * What the simulated boot script reports for the guest's SSH host key: "key" its fingerprint
 * (`hostKeyFingerprint(instanceId)`), "none" (the guest has no ed25519 host key), "never" (nothing reaches the
 * console, as when the script is not the bridge's or the console lags without end).
 */
export type HostKeyReport = "key" | "none" | "never";

export type CapacityFault =
  | ReadonlySet<string>
  | readonly string[]
  | ((req: RunInstancesRequestInfo) => boolean | string | InjectedError | null | undefined);

export interface Ec2Faults {
  /** Probability (0..1) that a request is answered RequestLimitExceeded/503 before it is processed. */
  throttleRate: number;
  /** Probability (0..1) that a request is answered InternalError/500 before it is processed. */
  serverErrorRate: number;
  /** Restrict throttleRate/serverErrorRate to these actions (default: all actions). */
  rateFaultActions: readonly string[] | undefined;
  capacity: CapacityFault | undefined;
  /** Max non-terminated instances per region; RunInstances beyond it answers InstanceLimitExceeded. */
  instanceLimit: number | undefined;
  /** pending -> running after this many (virtual) ms. */
  bootDelayMs: number;
  /** shutting-down -> terminated (and stopping -> stopped) after this many (virtual) ms. */
  terminateDelayMs: number;
  /** The host key report of instances that boot from now on, or a choice per instance. Default "key". */
  hostKeyReport: HostKeyReport | ((instance: FakeInstance) => HostKeyReport);
  /**
   * Instance types without the Nitro hypervisor: GetConsoleOutput with Latest=true answers
   * UnsupportedOperation/400 for their instances (without Latest it works as for any other type).
   */
  nonNitroTypes: ReadonlySet<string> | readonly string[] | undefined;
  /** Request-rate token buckets per API class (per region); a class without one is never rate limited. */
  rateLimits: Partial<Record<Ec2ApiClass, RateLimit>> | undefined;
  /** Resource-rate token buckets (per region): one token per instance launched or terminated. */
  resourceLimits: Partial<Record<"RunInstances" | "TerminateInstances", RateLimit>> | undefined;
  /** For this many (virtual) ms after launch an instance is invisible to Describe/Terminate/GetConsoleOutput. */
  consistencyDelayMs: number;
  /** How long a terminated instance stays visible (virtual ms); then every call answers as if it never existed. */
  terminatedVisibleMs: number;
}

export interface FailNextOptions {
  message?: string;
  /** Run the action (side effects happen) and then answer the error instead of the result: a "lost reply". */
  afterCommit?: boolean;
  /** How many matching requests fail (default 1). */
  times?: number;
}

export interface Ec2FakeOptions {
  /** Access key ids accepted without signature verification. */
  accessKeyIds?: readonly string[];
  /** Accepted credentials; requests signed with these are SigV4-verified (SignatureDoesNotMatch otherwise). */
  credentials?: ReadonlyArray<{ accessKeyId: string; secretAccessKey: string }>;
  /** Seed for the PRNG behind fault rates and generated ids. Default 1. */
  seed?: number | string;
  /** Public IP given to running instances. Default "127.0.0.1". */
  publicIp?: string | ((instance: FakeInstance) => string);
  ownerId?: string;
  /** Availability zones per region; default `${region}a`. The first one is used unless Placement.AvailabilityZone says otherwise. */
  availabilityZones?: Readonly<Record<string, readonly string[]>>;
  /** Base time source (ms). Default: a virtual clock frozen at start-up time; `advance()` adds to it. */
  now?: () => number;
  faults?: Partial<Ec2Faults>;
}

class Ec2Error extends Error {
  readonly status: number;
  constructor(
    readonly code: string,
    message: string,
    status?: number,
  ) {
    super(message);
    this.status = status ?? statusForCode(code);
  }
}

type InstanceRecord = { -readonly [K in keyof FakeInstance]: FakeInstance[K] } & {
  seq: number;
  /** Has been running once (the boot script's host key report is written on the first boot only). */
  booted: boolean;
  /** Next automatic state change, due at virtual time `at`. */
  transition: { to: InstanceStateName; at: number } | undefined;
  /** Virtual time it became terminated. */
  terminatedAt: number | undefined;
};

interface Reservation {
  reservationId: string;
  region: string;
  instances: InstanceRecord[];
}

interface PendingFailure {
  action: string;
  code: string;
  status: number;
  message: string | undefined;
  afterCommit: boolean;
  remaining: number;
}

interface RequestContext {
  region: string;
  accessKeyId: string;
}

const INSTANCE_ID_RE = /^i-(?:[0-9a-f]{8}|[0-9a-f]{17})$/;
const AMI_ID_RE = /^ami-(?:[0-9a-f]{8}|[0-9a-f]{17})$/;
const MAX_BODY_BYTES = 4 * 1024 * 1024;
const MAX_USER_DATA_BYTES = 16 * 1024;

/** mulberry32 */
function makePrng(seed: number | string): () => number {
  let s = typeof seed === "number" ? seed >>> 0 : createHash("sha256").update(seed).digest().readUInt32LE(0);
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function xml(s: string | number): string {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;" })[c]!);
}

function el(name: string, value: string | number | undefined): string {
  return value === undefined ? "" : `<${name}>${xml(value)}</${name}>`;
}

/** Sorted numeric indices N present as `${prefix}.N...` keys. */
function indices(params: Record<string, string>, prefix: string): number[] {
  const out = new Set<number>();
  const p = `${prefix}.`;
  for (const k of Object.keys(params)) {
    if (!k.startsWith(p)) continue;
    const seg = k.slice(p.length).split(".")[0] ?? "";
    if (/^\d+$/.test(seg)) out.add(Number(seg));
  }
  return [...out].sort((a, b) => a - b);
}

function list(params: Record<string, string>, prefix: string): string[] {
  return indices(params, prefix)
    .map((n) => params[`${prefix}.${n}`])
    .filter((v): v is string => v !== undefined);
}

function globMatch(pattern: string, value: string): boolean {
  if (!/[*?]/.test(pattern)) return pattern === value;
  let re = "^";
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i]!;
    if (c === "\\" && i + 1 < pattern.length) re += pattern[++i]!.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    else if (c === "*") re += "[\\s\\S]*";
    else if (c === "?") re += "[\\s\\S]";
    else re += c.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  }
  return new RegExp(re + "$").test(value);
}

function parseIntParam(params: Record<string, string>, name: string): number | undefined {
  const v = params[name];
  if (v === undefined) return undefined;
  if (!/^-?\d+$/.test(v)) throw new Ec2Error("InvalidParameterValue", `Invalid value '${v}' for ${name}`);
  return Number(v);
}

/**
 * The request id in the bridge's boot script (`CB_REQUEST_ID='...'`, quoted as util/shell.ts `shq` does), read
 * from the user data as cloud-init would see it (gzip inflated); undefined for any other user data.
 */
function bootScriptRequestId(userDataBase64: string | undefined): string | undefined {
  if (userDataBase64 === undefined) return undefined;
  let raw = Buffer.from(userDataBase64, "base64");
  if (raw[0] === 0x1f && raw[1] === 0x8b) {
    try {
      raw = gunzipSync(raw);
    } catch {
      return undefined;
    }
  }
  const m = /^CB_REQUEST_ID='((?:[^']|'\\'')*)'$/m.exec(raw.toString("utf8"));
  return m ? m[1]!.replace(/'\\''/g, "'") : undefined;
}

function gmt(ms: number): string {
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " GMT");
}

export class Ec2Fake {
  /** Runtime-adjustable fault injection. */
  readonly faults: Ec2Faults;
  readonly ownerId: string;
  private readonly defaultCredentials: { accessKeyId: string; secretAccessKey: string };
  /** Number of instances actually created (idempotent replays do not count). */
  createdCount = 0;
  /** ClientToken -> number of reservations actually created with it (EC2 idempotency keeps this at 1). */
  readonly createsByToken = new Map<string, number>();
  /** RunInstances calls answered from the idempotency cache instead of creating instances. */
  idempotentReplays = 0;
  /** Exceptions thrown by the fake itself (answered as InternalError/500); a test can assert this stays empty. */
  readonly internalErrors: Error[] = [];

  private server!: Server;
  private port = 0;
  private readonly baseNow: () => number;
  private offsetMs = 0;
  private readonly rng: () => number;
  private readonly keyIds: Set<string>;
  private readonly secrets = new Map<string, string>();
  private readonly publicIp: string | ((i: FakeInstance) => string);
  private readonly zones: Readonly<Record<string, readonly string[]>>;
  private readonly records: InstanceRecord[] = [];
  private readonly byId = new Map<string, InstanceRecord>();
  private readonly reservations = new Map<string, Reservation>();
  /** `${region}\n${token}` -> reservation + canonical params */
  private readonly tokens = new Map<string, { reservationId: string | undefined; fingerprint: string }>();
  /** `${region}\n${class}` -> request-rate bucket */
  private readonly buckets = new Map<string, { tokens: number; at: number }>();
  /** Requests answered RequestLimitExceeded by the request-rate buckets (not by throttleRate or failNext). */
  rateLimited = 0;
  /** Requests answered RequestLimitExceeded by the resource-rate buckets. */
  resourceLimited = 0;
  private readonly callLog: CallRecord[] = [];
  private readonly failures: PendingFailure[] = [];
  private seq = 0;

  private constructor(opts: Ec2FakeOptions) {
    this.rng = makePrng(opts.seed ?? 1);
    const start = Date.now();
    this.baseNow = opts.now ?? (() => start);
    this.ownerId = opts.ownerId ?? "123456789012";
    this.publicIp = opts.publicIp ?? "127.0.0.1";
    this.zones = opts.availabilityZones ?? {};
    const creds = opts.credentials ?? (opts.accessKeyIds === undefined ? [FAKE_EC2_CREDENTIALS] : []);
    for (const c of creds) this.secrets.set(c.accessKeyId, c.secretAccessKey);
    this.keyIds = new Set([...(opts.accessKeyIds ?? []), ...this.secrets.keys()]);
    const first = creds[0];
    this.defaultCredentials = first
      ? { accessKeyId: first.accessKeyId, secretAccessKey: first.secretAccessKey }
      : { accessKeyId: opts.accessKeyIds?.[0] ?? FAKE_EC2_CREDENTIALS.accessKeyId, secretAccessKey: "unverified" };
    this.faults = {
      throttleRate: 0,
      serverErrorRate: 0,
      rateFaultActions: undefined,
      capacity: undefined,
      instanceLimit: undefined,
      bootDelayMs: 0,
      terminateDelayMs: 0,
      hostKeyReport: "key",
      nonNitroTypes: undefined,
      rateLimits: undefined,
      resourceLimits: undefined,
      consistencyDelayMs: 0,
      terminatedVisibleMs: 3_600_000,
      ...opts.faults,
    };
  }

  static async start(opts: Ec2FakeOptions = {}): Promise<Ec2Fake> {
    const fake = new Ec2Fake(opts);
    fake.server = createServer((req, res) => fake.onRequest(req, res));
    await new Promise<void>((resolve, reject) => {
      fake.server.once("error", reject);
      fake.server.listen(0, "127.0.0.1", () => {
        fake.server.off("error", reject);
        resolve();
      });
    });
    fake.port = (fake.server.address() as AddressInfo).port;
    return fake;
  }

  /** Credentials this fake accepts (the first configured pair, or FAKE_EC2_CREDENTIALS); a fresh copy each time. */
  get credentials(): { accessKeyId: string; secretAccessKey: string } {
    return { ...this.defaultCredentials };
  }

  /** "http://127.0.0.1:PORT" */
  get endpoint(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  // ---------------------------------------------------------------- clock

  /** Current virtual time in ms. */
  now(): number {
    return this.baseNow() + this.offsetMs;
  }

  /** Move the virtual clock forward and apply every state transition that became due. */
  advance(ms: number): void {
    if (!(ms >= 0)) throw new RangeError("advance(ms) needs ms >= 0");
    this.offsetMs += ms;
    this.tick();
  }

  /** Finish every pending boot right now (pending -> running), regardless of bootDelayMs. */
  bootAll(): void {
    this.tick();
    for (const r of this.records) if (r.state === "pending") this.applyTransition(r, "running");
  }

  /** Finish every in-flight shutdown right now (shutting-down -> terminated, stopping -> stopped). */
  settleAll(): void {
    this.tick();
    for (const r of this.records) {
      if (r.state === "shutting-down") this.applyTransition(r, "terminated");
      else if (r.state === "stopping") this.applyTransition(r, "stopped");
    }
  }

  // ---------------------------------------------------------------- inspection

  /** Every instance ever created, all regions, in creation order (live objects). */
  get instances(): readonly FakeInstance[] {
    this.tick();
    return [...this.records];
  }

  instancesIn(region: string): FakeInstance[] {
    this.tick();
    return this.records.filter((r) => r.region === region);
  }

  getInstance(instanceId: string): FakeInstance | undefined {
    this.tick();
    return this.byId.get(instanceId);
  }

  /** Instances ever created carrying tag `key` (with `value`, if given), terminated ones included. */
  instancesByTag(key: string, value?: string): FakeInstance[] {
    this.tick();
    return this.records.filter((r) => key in r.tags && (value === undefined || r.tags[key] === value));
  }

  /** How many instances were ever created with tag key=value. */
  createsByTag(key: string, value: string): number {
    return this.records.filter((r) => r.tags[key] === value).length;
  }

  /** Tag values of `key` that more than one instance was ever created with, with their counts. */
  duplicateTagValues(key: string): Map<string, number> {
    const counts = new Map<string, number>();
    for (const r of this.records) {
      const v = r.tags[key];
      if (v !== undefined) counts.set(v, (counts.get(v) ?? 0) + 1);
    }
    for (const [v, n] of counts) if (n < 2) counts.delete(v);
    return counts;
  }

  get calls(): readonly CallRecord[] {
    return this.callLog;
  }

  countCalls(action?: string): number {
    return action === undefined ? this.callLog.length : this.callLog.filter((c) => c.action === action).length;
  }

  resetCalls(): void {
    this.callLog.length = 0;
  }

  // ---------------------------------------------------------------- guest / provider side events

  /**
   * The guest powers itself off (e.g. `poweroff` at the end of user data). With InstanceInitiatedShutdownBehavior
   * terminate (what RunInstances got): shutting-down -> terminated; with stop: stopping -> stopped.
   */
  guestPowerOff(instanceId: string, consoleOutput?: string): void {
    const r = this.mustGet(instanceId);
    if (consoleOutput !== undefined) r.consoleOutput += consoleOutput;
    if (r.state !== "pending" && r.state !== "running") return;
    r.stateReason = { code: "Client.InstanceInitiatedShutdown", message: "Client.InstanceInitiatedShutdown: Instance initiated shutdown" };
    r.reason = `Client.InstanceInitiatedShutdown: Instance initiated shutdown (${gmt(this.now())})`;
    this.beginShutdown(r, r.shutdownBehavior === "stop" ? "stopping" : "shutting-down");
  }

  /**
   * The SSH host key fingerprint the simulated guest reports: `SHA256:` + base64 of sha256(instanceId) without
   * padding (43 characters, the form `ssh-keygen -lf` prints), deterministic per instance.
   */
  hostKeyFingerprint(instanceId: string): string {
    return `SHA256:${createHash("sha256").update(instanceId).digest("base64").replace(/=+$/, "")}`;
  }

  /** Append text to the instance's console output (what GetConsoleOutput returns, base64). */
  appendConsole(instanceId: string, text: string): void {
    this.mustGet(instanceId).consoleOutput += text;
  }

  /** The provider kills the instance (hardware failure, spot reclaim…): shutting-down -> terminated. */
  reclaim(instanceId: string, reason: StateReason = { code: "Server.InternalError", message: "Server.InternalError: Internal error on launch" }): void {
    const r = this.mustGet(instanceId);
    if (r.state === "terminated" || r.state === "shutting-down") return;
    r.stateReason = reason;
    this.beginShutdown(r, "shutting-down");
  }

  // ---------------------------------------------------------------- fault injection

  /** The next `times` (default 1) requests for `action` ("*" = any) answer `code` with `status`. */
  failNext(action: Ec2Action | "*", code: string, status?: number, opts: FailNextOptions = {}): void {
    this.failures.push({
      action,
      code,
      status: status ?? statusForCode(code),
      message: opts.message,
      afterCommit: opts.afterCommit ?? false,
      remaining: opts.times ?? 1,
    });
  }

  /**
   * Remove all injected faults (rates, capacity, limits, one-shot failures, host key reports other than "key",
   * non-Nitro types, request-rate limits, eventual-consistency delay); delays and terminatedVisibleMs are kept.
   */
  clearFaults(): void {
    this.failures.length = 0;
    this.faults.throttleRate = 0;
    this.faults.serverErrorRate = 0;
    this.faults.rateFaultActions = undefined;
    this.faults.capacity = undefined;
    this.faults.instanceLimit = undefined;
    this.faults.hostKeyReport = "key";
    this.faults.nonNitroTypes = undefined;
    this.faults.rateLimits = undefined;
    this.faults.resourceLimits = undefined;
    this.faults.consistencyDelayMs = 0;
  }

  // ---------------------------------------------------------------- internals: state machine

  private mustGet(instanceId: string): InstanceRecord {
    this.tick();
    const r = this.byId.get(instanceId);
    if (!r) throw new Error(`Ec2Fake: no instance ${instanceId}`);
    return r;
  }

  private tick(): void {
    const now = this.now();
    for (const r of this.records) if (r.transition && r.transition.at <= now) this.applyTransition(r, r.transition.to);
  }

  private applyTransition(r: InstanceRecord, to: InstanceStateName): void {
    // Terminated when it was due (a lazily applied transition may be applied late).
    if (to === "terminated") r.terminatedAt = Math.min(r.transition?.at ?? Infinity, this.now());
    r.state = to;
    r.transition = undefined;
    if (to === "running") {
      r.stateReason = undefined;
      r.publicIpAddress = typeof this.publicIp === "function" ? this.publicIp(r) : this.publicIp;
      if (!r.booted) {
        r.booted = true;
        this.bootScriptHostKey(r);
      }
    } else {
      r.publicIpAddress = undefined;
    }
  }

  /**
   * The boot script's first console line that matters to the bridge: its host key report, written before anything
   * from the image runs (so it is on the console by the time sshd answers).
   */
  private bootScriptHostKey(r: InstanceRecord): void {
    const requestId = bootScriptRequestId(r.userDataBase64);
    if (requestId === undefined) return;
    const choice = this.faults.hostKeyReport;
    const report = typeof choice === "function" ? choice(r) : choice;
    if (report === "never") return;
    r.consoleOutput += `${hostKeyMarker(requestId, report === "key" ? this.hostKeyFingerprint(r.instanceId) : null)}\n`;
  }

  private isNitro(instanceType: string): boolean {
    const non = this.faults.nonNitroTypes;
    if (non === undefined) return true;
    return !("has" in non ? (non as ReadonlySet<string>).has(instanceType) : (non as readonly string[]).includes(instanceType));
  }

  /**
   * What the API shows: nothing of an instance in its first consistencyDelayMs (eventual consistency), nor of one
   * terminated longer than terminatedVisibleMs ago.
   */
  private visible(r: InstanceRecord): boolean {
    const now = this.now();
    if (r.launchTime.getTime() + Math.max(0, this.faults.consistencyDelayMs) > now) return false;
    return !(r.state === "terminated" && r.terminatedAt !== undefined && r.terminatedAt + this.faults.terminatedVisibleMs <= now);
  }

  /** Request-rate limiting: one token from the (region, class) bucket, refilled every second; false when empty. */
  private takeRateToken(action: Ec2Action, region: string): boolean {
    const cls = EC2_API_CLASS[action];
    return this.takeTokens(`${region}\n${cls}`, this.faults.rateLimits?.[cls], 1);
  }

  /** Resource-rate limiting: one token per instance the call launches or terminates; false (nothing taken) when short. */
  private takeResourceTokens(action: Ec2Action, region: string, params: Record<string, string>): boolean {
    if (action !== "RunInstances" && action !== "TerminateInstances") return true;
    const n = action === "RunInstances" ? (parseIntParam(params, "MaxCount") ?? 1) : Math.max(1, list(params, "InstanceId").length);
    return this.takeTokens(`${region}\nresource:${action}`, this.faults.resourceLimits?.[action], n);
  }

  private takeTokens(key: string, spec: RateLimit | undefined, n: number): boolean {
    if (!spec) return true;
    const now = this.now();
    const b = this.buckets.get(key) ?? { tokens: spec.bucket, at: now };
    b.tokens = Math.min(spec.bucket, b.tokens + ((now - b.at) / 1000) * spec.refillPerSecond);
    b.at = now;
    this.buckets.set(key, b);
    if (b.tokens < n) return false;
    b.tokens -= n;
    return true;
  }

  private beginShutdown(r: InstanceRecord, to: "shutting-down" | "stopping"): void {
    this.applyTransition(r, to);
    r.transition = { to: to === "shutting-down" ? "terminated" : "stopped", at: this.now() + Math.max(0, this.faults.terminateDelayMs) };
  }

  private hexId(prefix: string): string {
    let s = "";
    for (let i = 0; i < 17; i++) s += Math.floor(this.rng() * 16).toString(16);
    return `${prefix}-${s}`;
  }

  // ---------------------------------------------------------------- internals: HTTP

  private onRequest(req: IncomingMessage, res: ServerResponse): void {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on("data", (c: Buffer) => {
      size += c.length;
      if (size <= MAX_BODY_BYTES) chunks.push(c);
    });
    req.on("error", () => res.destroy());
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      let reply: { status: number; body: string };
      try {
        reply = this.handle(req, body, size);
      } catch (e) {
        this.internalErrors.push(e instanceof Error ? e : new Error(String(e)));
        reply = this.errorReply(new Ec2Error("InternalError", "Ec2Fake bug while parsing the request"));
      }
      const requestId = /<request[Ii][Dd]>([^<]*)</.exec(reply.body)?.[1] ?? randomUUID();
      res.writeHead(reply.status, {
        "content-type": "text/xml;charset=UTF-8",
        "content-length": Buffer.byteLength(reply.body),
        "x-amzn-requestid": requestId,
        server: "AmazonEC2",
      });
      res.end(reply.body);
    });
  }

  private handle(req: IncomingMessage, body: Buffer, size: number): { status: number; body: string } {
    const url = new URL(req.url ?? "/", "http://127.0.0.1");
    const form = new URLSearchParams(req.method === "POST" ? body.toString("utf8") : url.search);
    const params: Record<string, string> = {};
    for (const [k, v] of form) params[k] = v;
    const action = params.Action ?? "";
    delete params.Action;
    delete params.Version;

    const sdkRequest = req.headers["amz-sdk-request"];
    const attemptHeader = typeof sdkRequest === "string" ? sdkRequest : "";
    const attempt = /attempt=(\d+)/.exec(attemptHeader)?.[1];
    const max = /max=(\d+)/.exec(attemptHeader)?.[1];
    const invocation = req.headers["amz-sdk-invocation-id"];
    const record: CallRecord = {
      action,
      params,
      status: 200,
      code: undefined,
      region: undefined,
      accessKeyId: undefined,
      attempt: attempt === undefined ? undefined : Number(attempt),
      maxAttempts: max === undefined ? undefined : Number(max),
      invocationId: typeof invocation === "string" ? invocation : undefined,
      at: this.now(),
    };
    this.callLog.push(record);

    let reply: { status: number; body: string };
    try {
      if (size > MAX_BODY_BYTES) throw new Ec2Error("RequestEntityTooLarge", "Request body too large", 413);
      const ctx = this.authenticate(req, body, record);
      this.tick();
      reply = this.dispatch(action, params, ctx);
    } catch (e) {
      let err: Ec2Error;
      if (e instanceof Ec2Error) err = e;
      else {
        this.internalErrors.push(e instanceof Error ? e : new Error(String(e)));
        err = new Ec2Error("InternalError", `Ec2Fake bug: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
      }
      reply = this.errorReply(err);
      record.code = err.code;
    }
    record.status = reply.status;
    return reply;
  }

  private authenticate(req: IncomingMessage, body: Buffer, record: CallRecord): RequestContext {
    const auth = req.headers.authorization;
    if (typeof auth !== "string" || auth === "") {
      throw new Ec2Error("MissingAuthenticationToken", "The request must contain either a valid (registered) AWS access key ID or X.509 certificate.");
    }
    const m = /^AWS4-HMAC-SHA256\s+Credential=([^/,\s]+)\/(\d{8})\/([^/,\s]+)\/([^/,\s]+)\/aws4_request\s*,\s*SignedHeaders=([^,\s]+)\s*,\s*Signature=([0-9a-f]{64})\s*$/.exec(auth);
    if (!m) throw new Ec2Error("IncompleteSignature", `Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters. Authorization=${auth}`, 400);
    const [, akid, date, region, service, signedHeaders, signature] = m as unknown as [string, string, string, string, string, string, string];
    record.accessKeyId = akid;
    record.region = region;
    if (!this.keyIds.has(akid)) throw new Ec2Error("AuthFailure", "AWS was not able to validate the provided access credentials");
    const secret = this.secrets.get(akid);
    if (secret !== undefined) {
      const amzDate = req.headers["x-amz-date"];
      const expected = typeof amzDate === "string" ? this.sign(req, body, secret, amzDate, `${date}/${region}/${service}/aws4_request`, date, region, service, signedHeaders) : "";
      const ok = expected.length === signature.length && timingSafeEqual(Buffer.from(expected), Buffer.from(signature));
      if (!ok) {
        throw new Ec2Error(
          "SignatureDoesNotMatch",
          "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
        );
      }
    }
    return { region, accessKeyId: akid };
  }

  private sign(
    req: IncomingMessage,
    body: Buffer,
    secret: string,
    amzDate: string,
    scope: string,
    date: string,
    region: string,
    service: string,
    signedHeaders: string,
  ): string {
    const url = new URL(req.url ?? "/", "http://127.0.0.1");
    const query = [...url.searchParams]
      .map(([k, v]) => [encodeRfc3986(k), encodeRfc3986(v)] as const)
      .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0))
      .map(([k, v]) => `${k}=${v}`)
      .join("&");
    const headerLines = signedHeaders
      .split(";")
      .map((h) => {
        const v = req.headers[h];
        const s = Array.isArray(v) ? v.join(",") : (v ?? "");
        return `${h}:${s.trim().replace(/\s+/g, " ")}\n`;
      })
      .join("");
    const payloadHeader = req.headers["x-amz-content-sha256"];
    const payloadHash = typeof payloadHeader === "string" ? payloadHeader : createHash("sha256").update(body).digest("hex");
    const canonical = [req.method ?? "POST", url.pathname || "/", query, headerLines, signedHeaders, payloadHash].join("\n");
    const toSign = ["AWS4-HMAC-SHA256", amzDate, scope, createHash("sha256").update(canonical).digest("hex")].join("\n");
    const kDate = createHmac("sha256", `AWS4${secret}`).update(date).digest();
    const kRegion = createHmac("sha256", kDate).update(region).digest();
    const kService = createHmac("sha256", kRegion).update(service).digest();
    const kSigning = createHmac("sha256", kService).update("aws4_request").digest();
    return createHmac("sha256", kSigning).update(toSign).digest("hex");
  }

  private takeFailure(action: string, afterCommit: boolean): PendingFailure | undefined {
    const i = this.failures.findIndex((f) => (f.action === "*" || f.action === action) && f.afterCommit === afterCommit);
    if (i < 0) return undefined;
    const f = this.failures[i]!;
    if (--f.remaining <= 0) this.failures.splice(i, 1);
    return f;
  }

  private rateFault(action: string): Ec2Error | undefined {
    const scoped = this.faults.rateFaultActions;
    if (scoped !== undefined && !scoped.includes(action)) return undefined;
    const hit = (rate: number) => rate >= 1 || (rate > 0 && this.rng() < rate);
    if (hit(this.faults.throttleRate)) return new Ec2Error("RequestLimitExceeded", "Request limit exceeded.");
    if (hit(this.faults.serverErrorRate)) return new Ec2Error("InternalError", "An internal error has occurred");
    return undefined;
  }

  private dispatch(action: string, params: Record<string, string>, ctx: RequestContext): { status: number; body: string } {
    if (!ACTIONS.has(action)) {
      throw new Ec2Error("InvalidAction", `The action ${action || "(none)"} is not valid for this web service.`);
    }
    const before = this.takeFailure(action, false);
    if (before) throw new Ec2Error(before.code, before.message ?? `Injected ${before.code}`, before.status);
    const rate = this.rateFault(action);
    if (rate) throw rate;
    if (!this.takeRateToken(action as Ec2Action, ctx.region)) {
      this.rateLimited++;
      throw new Ec2Error("RequestLimitExceeded", "Request limit exceeded.");
    }
    if (!this.takeResourceTokens(action as Ec2Action, ctx.region, params)) {
      this.resourceLimited++;
      throw new Ec2Error("RequestLimitExceeded", "Request limit exceeded.");
    }

    const requestId = randomUUID();
    let body: string;
    switch (action as Ec2Action) {
      case "RunInstances":
        body = this.runInstances(params, ctx, requestId);
        break;
      case "DescribeInstances":
        body = this.describeInstances(params, ctx, requestId);
        break;
      case "TerminateInstances":
        body = this.terminateInstances(params, ctx, requestId);
        break;
      case "GetConsoleOutput":
        body = this.getConsoleOutput(params, ctx, requestId);
        break;
    }
    const after = this.takeFailure(action, true);
    if (after) throw new Ec2Error(after.code, after.message ?? `Injected ${after.code}`, after.status);
    return { status: 200, body };
  }

  private errorReply(e: Ec2Error): { status: number; body: string } {
    return {
      status: e.status,
      body:
        `<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>${xml(e.code)}</Code>` +
        `<Message>${xml(e.message)}</Message></Error></Errors><RequestID>${randomUUID()}</RequestID></Response>`,
    };
  }

  // ---------------------------------------------------------------- actions

  private checkDryRun(params: Record<string, string>): void {
    if (params.DryRun === "true") throw new Ec2Error("DryRunOperation", "Request would have succeeded, but DryRun flag is set.");
  }

  private lookup(ids: readonly string[], ctx: RequestContext): InstanceRecord[] {
    const malformed = ids.find((id) => !INSTANCE_ID_RE.test(id));
    if (malformed !== undefined) throw new Ec2Error("InvalidInstanceID.Malformed", `Invalid id: "${malformed}" (expecting "i-...")`);
    const found: InstanceRecord[] = [];
    const missing: string[] = [];
    for (const id of ids) {
      const r = this.byId.get(id);
      if (r && r.region === ctx.region && this.visible(r)) {
        if (!found.includes(r)) found.push(r);
      } else missing.push(id);
    }
    if (missing.length === 1) throw new Ec2Error("InvalidInstanceID.NotFound", `The instance ID '${missing[0]}' does not exist`);
    if (missing.length > 1) throw new Ec2Error("InvalidInstanceID.NotFound", `The instance IDs '${missing.join(", ")}' do not exist`);
    return found;
  }

  private runInstances(params: Record<string, string>, ctx: RequestContext, requestId: string): string {
    const minCount = parseIntParam(params, "MinCount");
    const maxCount = parseIntParam(params, "MaxCount");
    if (minCount === undefined) throw new Ec2Error("MissingParameter", "The request must contain the parameter MinCount");
    if (maxCount === undefined) throw new Ec2Error("MissingParameter", "The request must contain the parameter MaxCount");
    if (minCount < 1) throw new Ec2Error("InvalidParameterValue", `Value (${minCount}) for parameter minCount is invalid. Expected a positive integer.`);
    if (maxCount < minCount) throw new Ec2Error("InvalidParameterValue", `Value (${maxCount}) for parameter maxCount is invalid. Expected a value >= minCount (${minCount}).`);
    const imageId = params.ImageId;
    if (imageId === undefined) throw new Ec2Error("MissingParameter", "The request must contain the parameter ImageId");
    if (!AMI_ID_RE.test(imageId)) throw new Ec2Error("InvalidAMIID.Malformed", `Invalid id: "${imageId}" (expecting "ami-...")`);
    const instanceType = params.InstanceType ?? "m1.small";
    const clientToken = params.ClientToken;
    if (clientToken !== undefined && clientToken.length > 64) {
      throw new Ec2Error("InvalidParameterValue", "Value for parameter clientToken is invalid. Client tokens are limited to 64 ASCII characters.");
    }
    const shutdown = params.InstanceInitiatedShutdownBehavior ?? "stop";
    if (shutdown !== "stop" && shutdown !== "terminate") {
      throw new Ec2Error("InvalidParameterValue", `Value (${shutdown}) for parameter instanceInitiatedShutdownBehavior is invalid.`);
    }
    let userData: string | undefined;
    const userDataBase64 = params.UserData;
    if (userDataBase64 !== undefined) {
      const raw = Buffer.from(userDataBase64, "base64");
      if (raw.toString("base64").replace(/=+$/, "") !== userDataBase64.replace(/\s+/g, "").replace(/=+$/, "")) {
        throw new Ec2Error("InvalidParameterValue", "Invalid BASE64 encoding of user data.");
      }
      if (raw.length > MAX_USER_DATA_BYTES) throw new Ec2Error("InvalidParameterValue", `User data is limited to ${MAX_USER_DATA_BYTES} bytes`);
      userData = raw.toString("utf8");
    }
    const tags: Record<string, string> = {};
    for (const n of indices(params, "TagSpecification")) {
      const rt = params[`TagSpecification.${n}.ResourceType`];
      if (rt !== "instance") continue;
      for (const t of indices(params, `TagSpecification.${n}.Tag`)) {
        const key = params[`TagSpecification.${n}.Tag.${t}.Key`];
        if (key === undefined) continue;
        if (key.toLowerCase().startsWith("aws:")) throw new Ec2Error("InvalidParameterValue", "Tag keys starting with 'aws:' are reserved for internal use");
        tags[key] = params[`TagSpecification.${n}.Tag.${t}.Value`] ?? "";
      }
    }
    const zones = this.zones[ctx.region] ?? [`${ctx.region}a`];
    const availabilityZone = params["Placement.AvailabilityZone"] ?? zones[0] ?? `${ctx.region}a`;
    if (!availabilityZone.startsWith(ctx.region)) {
      throw new Ec2Error("InvalidParameterValue", `Invalid availability zone: [${availabilityZone}]`);
    }

    // Idempotency: same token + same parameters => original reservation; different parameters => mismatch.
    const fingerprint = Object.keys(params)
      .filter((k) => k !== "ClientToken" && k !== "DryRun")
      .sort()
      .map((k) => `${k}=${params[k]}`)
      .join("&");
    const tokenKey = clientToken === undefined ? undefined : `${ctx.region}\n${clientToken}`;
    const prior = tokenKey === undefined ? undefined : this.tokens.get(tokenKey);
    if (prior) {
      if (prior.fingerprint !== fingerprint) {
        throw new Ec2Error("IdempotentParameterMismatch", "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).");
      }
      this.checkDryRun(params);
      if (prior.reservationId !== undefined) {
        const res = this.reservations.get(prior.reservationId)!;
        if (res.instances.every((r) => r.state === "terminated")) {
          // boto/boto3#4406: the token of a terminated instance is not replayed any more. Wording is the fake's own.
          throw new Ec2Error("IdempotentInstanceTerminated", "The client token you provided is associated with a resource that is already deleted. Please use a different client token.");
        }
        this.idempotentReplays++;
        return this.runInstancesXml(res, requestId);
      }
      // A failed launch with the same parameters: tried again below.
    }
    this.checkDryRun(params);
    // ubicloud/ubicloud#5898: a token used by a failed RunInstances stays bound to that call's parameters.
    const bindFailed = () => {
      if (tokenKey !== undefined && !prior) this.tokens.set(tokenKey, { reservationId: undefined, fingerprint });
    };

    const info: RunInstancesRequestInfo = {
      region: ctx.region,
      availabilityZone,
      instanceType,
      imageId,
      minCount,
      maxCount,
      tags,
      clientToken,
      params,
    };
    const capacityErr = this.capacityFault(info);
    if (capacityErr) {
      bindFailed();
      throw capacityErr;
    }
    let count = maxCount;
    const limit = this.faults.instanceLimit;
    if (limit !== undefined) {
      const used = this.records.filter((r) => r.region === ctx.region && r.state !== "terminated" && r.state !== "stopped").length;
      const available = Math.max(0, limit - used);
      if (available < minCount) {
        bindFailed();
        throw new Ec2Error(
          "InstanceLimitExceeded",
          `You have requested more instances (${used + minCount}) than your current instance limit of ${limit} allows for the specified instance type. Please visit http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit.`,
        );
      }
      count = Math.min(maxCount, available);
    }

    const res: Reservation = { reservationId: this.hexId("r"), region: ctx.region, instances: [] };
    const launchAt = this.now();
    for (let i = 0; i < count; i++) {
      const seq = ++this.seq;
      const rec: InstanceRecord = {
        seq,
        instanceId: this.hexId("i"),
        reservationId: res.reservationId,
        region: ctx.region,
        availabilityZone,
        accessKeyId: ctx.accessKeyId,
        imageId,
        instanceType,
        launchTime: new Date(launchAt),
        amiLaunchIndex: i,
        state: "pending",
        privateIpAddress: `10.${(seq >> 16) & 255}.${(seq >> 8) & 255}.${seq & 255}`,
        publicIpAddress: undefined,
        tags: Object.freeze({ ...tags }),
        clientToken,
        userData,
        userDataBase64,
        keyName: params.KeyName,
        subnetId: params.SubnetId,
        securityGroupIds: Object.freeze(list(params, "SecurityGroupId")),
        shutdownBehavior: shutdown,
        consoleOutput: "",
        booted: false,
        stateReason: { code: "pending", message: "pending" },
        reason: "",
        launchParams: Object.freeze({ ...params }),
        transition: { to: "running", at: launchAt + Math.max(0, this.faults.bootDelayMs) },
        terminatedAt: undefined,
      };
      res.instances.push(rec);
      this.records.push(rec);
      this.byId.set(rec.instanceId, rec);
    }
    this.reservations.set(res.reservationId, res);
    this.createdCount += count;
    if (clientToken !== undefined) {
      this.tokens.set(tokenKey!, { reservationId: res.reservationId, fingerprint });
      this.createsByToken.set(clientToken, (this.createsByToken.get(clientToken) ?? 0) + 1);
    }
    return this.runInstancesXml(res, requestId);
  }

  private capacityFault(info: RunInstancesRequestInfo): Ec2Error | undefined {
    const cap = this.faults.capacity;
    if (cap === undefined) return undefined;
    const insufficient = () =>
      new Ec2Error(
        "InsufficientInstanceCapacity",
        `We currently do not have sufficient ${info.instanceType} capacity in the Availability Zone you requested (${info.availabilityZone}). Our system will be working on provisioning additional capacity.`,
      );
    if (typeof cap === "function") {
      const v = cap(info);
      if (v === true) return insufficient();
      if (typeof v === "string") return new Ec2Error(v, `Injected ${v}`);
      if (v && typeof v === "object") return new Ec2Error(v.code, v.message ?? `Injected ${v.code}`, v.status);
      return undefined;
    }
    const has = (s: string) => ("has" in cap ? (cap as ReadonlySet<string>).has(s) : (cap as readonly string[]).includes(s));
    return has(info.instanceType) || has(info.region) || has(info.availabilityZone) ? insufficient() : undefined;
  }

  private describeInstances(params: Record<string, string>, ctx: RequestContext, requestId: string): string {
    const ids = list(params, "InstanceId");
    const maxResults = parseIntParam(params, "MaxResults");
    if (maxResults !== undefined && ids.length > 0) {
      throw new Ec2Error("InvalidParameterCombination", "The parameter instancesSet cannot be used with the parameter maxResults");
    }
    if (maxResults !== undefined && (maxResults < 5 || maxResults > 1000)) {
      throw new Ec2Error("InvalidParameterValue", `Value ( ${maxResults} ) for parameter maxResults is invalid. Expecting a value between 5 and 1000.`);
    }
    this.checkDryRun(params);
    let candidates: InstanceRecord[] = ids.length > 0 ? this.lookup(ids, ctx) : this.records.filter((r) => r.region === ctx.region && this.visible(r));

    for (const n of indices(params, "Filter")) {
      const name = params[`Filter.${n}.Name`];
      if (name === undefined) throw new Ec2Error("InvalidParameterValue", `The filter 'null' is invalid`);
      const values = list(params, `Filter.${n}.Value`);
      const field = this.filterField(name);
      candidates = candidates.filter((r) => {
        const have = field(r);
        return values.some((v) => have.some((h) => globMatch(v, h)));
      });
    }
    if (ids.length > 0) candidates.sort((a, b) => a.seq - b.seq);

    // Pagination over instances (EC2 counts instances, not reservations).
    const fp = createHash("sha256")
      .update(
        Object.keys(params)
          .filter((k) => k !== "NextToken" && k !== "MaxResults")
          .sort()
          .map((k) => `${k}=${params[k]}`)
          .join("&") + `\n${ctx.region}`,
      )
      .digest("hex")
      .slice(0, 16);
    let after = 0;
    const token = params.NextToken;
    if (token !== undefined && token !== "") {
      let parsed: unknown;
      try {
        parsed = JSON.parse(Buffer.from(token, "base64url").toString("utf8"));
      } catch {
        parsed = undefined;
      }
      const p = parsed as { s?: unknown; f?: unknown } | undefined;
      if (!p || typeof p.s !== "number" || p.f !== fp) throw new Ec2Error("InvalidParameterValue", `The specified NextToken is not valid: '${token}'`);
      after = p.s;
      candidates = candidates.filter((r) => r.seq > after);
    }
    let nextToken: string | undefined;
    if (maxResults !== undefined && candidates.length > maxResults) {
      candidates = candidates.slice(0, maxResults);
      nextToken = Buffer.from(JSON.stringify({ s: candidates[candidates.length - 1]!.seq, f: fp })).toString("base64url");
    }

    // Group consecutive instances by reservation.
    const groups: { res: string; items: InstanceRecord[] }[] = [];
    for (const r of candidates) {
      const last = groups[groups.length - 1];
      if (last && last.res === r.reservationId) last.items.push(r);
      else groups.push({ res: r.reservationId, items: [r] });
    }
    const reservationSet = groups
      .map(
        (g) =>
          `<item>${el("reservationId", g.res)}${el("ownerId", this.ownerId)}<groupSet/>` +
          `<instancesSet>${g.items.map((r) => this.instanceXml(r)).join("")}</instancesSet></item>`,
      )
      .join("");
    return this.doc(
      "DescribeInstancesResponse",
      `${el("requestId", requestId)}<reservationSet>${reservationSet}</reservationSet>${el("nextToken", nextToken)}`,
    );
  }

  private filterField(name: string): (r: InstanceRecord) => string[] {
    if (name.startsWith("tag:")) {
      const key = name.slice(4);
      return (r) => (key in r.tags ? [r.tags[key]!] : []);
    }
    switch (name) {
      case "tag-key":
        return (r) => Object.keys(r.tags);
      case "tag-value":
        return (r) => Object.values(r.tags);
      case "instance-state-name":
        return (r) => [r.state];
      case "instance-state-code":
        return (r) => [String(STATE_CODES[r.state])];
      case "instance-id":
        return (r) => [r.instanceId];
      case "instance-type":
        return (r) => [r.instanceType];
      case "image-id":
        return (r) => [r.imageId];
      case "client-token":
        return (r) => (r.clientToken === undefined ? [] : [r.clientToken]);
      case "reservation-id":
        return (r) => [r.reservationId];
      case "availability-zone":
        return (r) => [r.availabilityZone];
      case "key-name":
        return (r) => (r.keyName === undefined ? [] : [r.keyName]);
      case "subnet-id":
        return (r) => (r.subnetId === undefined ? [] : [r.subnetId]);
      case "ip-address":
        return (r) => (r.publicIpAddress === undefined ? [] : [r.publicIpAddress]);
      case "private-ip-address":
        return (r) => (r.state === "terminated" ? [] : [r.privateIpAddress]);
      default:
        throw new Ec2Error("InvalidParameterValue", `The filter '${name}' is invalid`);
    }
  }

  private terminateInstances(params: Record<string, string>, ctx: RequestContext, requestId: string): string {
    const ids = list(params, "InstanceId");
    if (ids.length === 0) throw new Ec2Error("MissingParameter", "The request must contain the parameter InstanceId");
    const found = this.lookup(ids, ctx);
    this.checkDryRun(params);
    const items = found.map((r) => {
      const previous = r.state;
      if (previous !== "terminated" && previous !== "shutting-down") {
        r.stateReason = { code: "Client.UserInitiatedShutdown", message: "Client.UserInitiatedShutdown: User initiated shutdown" };
        r.reason = `User initiated (${gmt(this.now())})`;
        this.beginShutdown(r, "shutting-down");
      }
      return (
        `<item>${el("instanceId", r.instanceId)}` +
        `<currentState>${el("code", STATE_CODES[r.state])}${el("name", r.state)}</currentState>` +
        `<previousState>${el("code", STATE_CODES[previous])}${el("name", previous)}</previousState></item>`
      );
    });
    return this.doc("TerminateInstancesResponse", `${el("requestId", requestId)}<instancesSet>${items.join("")}</instancesSet>`);
  }

  private getConsoleOutput(params: Record<string, string>, ctx: RequestContext, requestId: string): string {
    const id = params.InstanceId;
    if (id === undefined) throw new Ec2Error("MissingParameter", "The request must contain the parameter InstanceId");
    const latest = params.Latest;
    if (latest !== undefined && latest !== "true" && latest !== "false") throw new Ec2Error("InvalidParameterValue", `Invalid value '${latest}' for Latest`);
    const [r] = this.lookup([id], ctx);
    if (latest === "true" && !this.isNitro(r!.instanceType)) {
      // EC2's code for an operation the resource does not support; the wording is the fake's own.
      throw new Ec2Error("UnsupportedOperation", `The instance type ${r!.instanceType} does not support retrieving the latest console output.`);
    }
    this.checkDryRun(params);
    // Live (Latest=true) and buffered output are the same text here: the fake posts console text as it is written.
    const bytes = Buffer.from(r!.consoleOutput, "utf8");
    const output = bytes.length === 0 ? undefined : bytes.subarray(Math.max(0, bytes.length - CONSOLE_OUTPUT_MAX_BYTES)).toString("base64");
    return this.doc(
      "GetConsoleOutputResponse",
      `${el("requestId", requestId)}${el("instanceId", r!.instanceId)}${el("timestamp", new Date(this.now()).toISOString())}${el("output", output)}`,
    );
  }

  // ---------------------------------------------------------------- XML

  private doc(root: string, inner: string): string {
    return `<?xml version="1.0" encoding="UTF-8"?>\n<${root} xmlns="${EC2_NAMESPACE}">${inner}</${root}>`;
  }

  private runInstancesXml(res: Reservation, requestId: string): string {
    return this.doc(
      "RunInstancesResponse",
      `${el("requestId", requestId)}${el("reservationId", res.reservationId)}${el("ownerId", this.ownerId)}<groupSet/>` +
        `<instancesSet>${res.instances.map((r) => this.instanceXml(r)).join("")}</instancesSet>`,
    );
  }

  private instanceXml(r: InstanceRecord): string {
    const live = r.state !== "terminated";
    const tags = Object.entries(r.tags)
      .map(([k, v]) => `<item>${el("key", k)}${el("value", v)}</item>`)
      .join("");
    const groups = r.securityGroupIds.map((g) => `<item>${el("groupId", g)}</item>`).join("");
    return (
      `<item>${el("instanceId", r.instanceId)}${el("imageId", r.imageId)}` +
      `<instanceState>${el("code", STATE_CODES[r.state])}${el("name", r.state)}</instanceState>` +
      `${el("privateDnsName", live ? `ip-${r.privateIpAddress.replace(/\./g, "-")}.ec2.internal` : "")}` +
      `${el("dnsName", "")}${el("reason", r.reason)}${el("keyName", r.keyName)}` +
      `${el("amiLaunchIndex", r.amiLaunchIndex)}<productCodes/>${el("instanceType", r.instanceType)}` +
      `${el("launchTime", r.launchTime.toISOString())}` +
      `<placement>${el("availabilityZone", r.availabilityZone)}<groupName/>${el("tenancy", "default")}</placement>` +
      `<monitoring>${el("state", "disabled")}</monitoring>` +
      `${live ? el("subnetId", r.subnetId) : ""}` +
      `${live ? el("privateIpAddress", r.privateIpAddress) : ""}${el("ipAddress", r.publicIpAddress)}` +
      `<groupSet>${groups}</groupSet>` +
      `${r.stateReason ? `<stateReason>${el("code", r.stateReason.code)}${el("message", r.stateReason.message)}</stateReason>` : ""}` +
      `${el("architecture", "x86_64")}${el("rootDeviceType", "ebs")}${el("rootDeviceName", "/dev/xvda")}` +
      `${el("virtualizationType", "hvm")}${el("clientToken", r.clientToken ?? "")}` +
      `${tags === "" ? "" : `<tagSet>${tags}</tagSet>`}${el("hypervisor", "xen")}</item>`
    );
  }
}

/** RFC 3986 encoding as SigV4 canonical query strings need it. */
function encodeRfc3986(s: string): string {
  return encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}
