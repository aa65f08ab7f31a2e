/**
 * AWS EC2 backend: one on-demand instance per grant, in the grant's region.
 *
 * - capabilities/canSatisfy come from config only; the SDK (`@aws-sdk/client-ec2`, ~0.4 s to
 *   import) is loaded on first use, so the card and the listener never wait for it.
 * - provision: every configured instance type that fits the grant, smallest first, skipping those
 *   in the Fleet's unavailable cache: a capacity error on one marks it unavailable and tries the
 *   next before the grant fails over to another backend. Each RunInstances carries a ClientToken
 *   derived from (provider id, request_id, instance type): EC2 binds a token to the parameters of
 *   the call that used it, also a failed one, so one token per shape keeps every attempt
 *   retryable; a retry or a restarted daemon never creates a second instance (an instance tagged
 *   with the request, from any earlier attempt, is adopted first); tags `${tag_prefix}:bridge-id` / `:request-id`;
 *   InstanceInitiatedShutdownBehavior=terminate; user data = common/cloud-init.ts. Then waits
 *   for `running` (batched polling) and for an SSH banner (common/ssh-ready.ts), then reads the
 *   guest's SSH host key fingerprint from the live serial console (GetConsoleOutput Latest=true,
 *   Nitro types only) as host_key_sha256; null, with a warning, when it does not come.
 * - watchUntilExit: batched — one poller per region issues one DescribeInstances (by the bridge
 *   tag, paged 1000 at a time) per interval for every watched instance; the exit code comes from
 *   the COMPUTE-BRIDGE marker in GetConsoleOutput; valid_to is enforced.
 * - terminate: TerminateInstances, idempotent, resolves once EC2 reports shutting-down or
 *   terminated; with no instance id it finds the request's instances by tag. EC2 is eventually
 *   consistent: InvalidInstanceID.NotFound for an instance launched minutes ago does not mean it
 *   is gone, so it is asked again (with backoff) before the instance counts as terminated.
 * - pacing: every call (and every SDK retry) takes a token from a bucket per region and API class
 *   (common/token-bucket.ts; backends.aws.rate_limits, EC2's documented buckets by default); a
 *   throttling answer empties the bucket for a refill interval.
 * - reconcile: terminates instances with this bridge's tag that no live grant owns, once older
 *   than orphan_grace_seconds, at most every reconcile_interval_seconds.
 * - errors: capacity and account-limit codes -> CapacityError carrying the offering (region,
 *   instance type) so the Fleet fails over and skips it for a while; throttling and 5xx ->
 *   retried by the SDK's adaptive retry (bounded), then TransientError; auth -> CredentialError.
 */
import { createHash } from "node:crypto";
import { gzipSync } from "node:zlib";
import type { AwsConfig } from "../config/schema.js";
import type { Almanac, Capabilities, ComputeGrant, Envelope, ExitObservation, ProvisionedInstance } from "../domain/index.js";
import { readSecret } from "../config/secrets.js";
import { abortError, isAbort, type Clock } from "../util/clock.js";
import { scrubSecrets, type Logger } from "../util/logger.js";
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
import { BatchLookup, BatchWatcher, type PollEvent } from "./common/batch-watcher.js";
import { BootScriptError, parseHostKey, parseMarker, renderBootScript, type MarkerResult } from "./common/cloud-init.js";
import { Semaphore } from "./common/semaphore.js";
import { RateLimiter } from "./common/token-bucket.js";
import { ConsoleUnavailableError, SshNotReadyError, waitForHostKey, waitForSsh } from "./common/ssh-ready.js";
import type { OfferingCache } from "./offering-cache.js";
import type { EC2Client, Instance, RunInstancesCommandInput } from "@aws-sdk/client-ec2";
import type { RetryErrorInfo, RetryStrategyV2, RetryToken, StandardRetryToken } from "@smithy/types";

// ---- instance type table ------------------------------------------------------------------------

export interface InstanceShape {
  vcpus: number;
  memory_mib: number;
}

const GIB = 1024;
const SIZE_VCPUS: Record<string, number> = {
  medium: 1, large: 2, xlarge: 4, "2xlarge": 8, "4xlarge": 16, "8xlarge": 32, "9xlarge": 36, "12xlarge": 48,
  "16xlarge": 64, "18xlarge": 72, "24xlarge": 96, "32xlarge": 128, "48xlarge": 192,
};
const STD = ["large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge"];
const TO32 = [...STD, "32xlarge"];
const TO48 = [...TO32, "48xlarge"];
const I7 = [...STD, "48xlarge"];
const A7 = ["medium", ...TO48];
const GRAVITON = ["medium", "large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge"];
/** family -> [GiB per vCPU, sizes] for the fixed-ratio families. */
const FAMILIES: Record<string, [number, string[]]> = {
  m5: [4, STD], m5a: [4, STD], m6i: [4, TO32], m6a: [4, TO48], m7i: [4, I7], m7a: [4, A7], m6g: [4, GRAVITON], m7g: [4, GRAVITON],
  c5: [2, ["large", "xlarge", "2xlarge", "4xlarge", "9xlarge", "12xlarge", "18xlarge", "24xlarge"]], c5a: [2, STD], c6i: [2, TO32], c6a: [2, TO48], c7i: [2, I7], c7a: [2, A7], c6g: [2, GRAVITON], c7g: [2, GRAVITON],
  r5: [8, STD], r5a: [8, STD], r6i: [8, TO32], r6a: [8, TO48], r7i: [8, I7], r7a: [8, A7], r6g: [8, GRAVITON], r7g: [8, GRAVITON],
};
const BURSTABLE: Record<string, [number, number]> = {
  nano: [2, 0.5], micro: [2, 1], small: [2, 2], medium: [2, 4], large: [2, 8], xlarge: [4, 16], "2xlarge": [8, 32],
};

/** vCPUs and memory of the EC2 instance types the bridge knows (on-demand, current generation). */
export const AWS_INSTANCE_TYPES: Readonly<Record<string, InstanceShape>> = Object.freeze(
  (() => {
    const t: Record<string, InstanceShape> = {};
    for (const [family, [ratio, sizes]] of Object.entries(FAMILIES))
      for (const size of sizes) t[`${family}.${size}`] = { vcpus: SIZE_VCPUS[size]!, memory_mib: SIZE_VCPUS[size]! * ratio * GIB };
    for (const family of ["t3", "t3a", "t4g"])
      for (const [size, [vcpus, gib]] of Object.entries(BURSTABLE)) t[`${family}.${size}`] = { vcpus, memory_mib: gib * GIB };
    return t;
  })(),
);

// ---- errors ------------------------------------------------------------------------------------

/** No capacity for the shape here, or an account limit: fail over, remember the offering. */
const CAPACITY_CODES = new Set([
  "InsufficientInstanceCapacity",
  "InsufficientHostCapacity",
  "InsufficientCapacity",
  "InsufficientAddressCapacity",
  "InsufficientFreeAddressesInSubnet",
  "InstanceLimitExceeded",
  "VcpuLimitExceeded",
  "Unsupported",
]);
const LIMIT_CODES = new Set(["InstanceLimitExceeded", "VcpuLimitExceeded"]);
const CREDENTIAL_CODES = new Set([
  "AuthFailure",
  "UnauthorizedOperation",
  "SignatureDoesNotMatch",
  "InvalidClientTokenId",
  "MissingAuthenticationToken",
  "ExpiredToken",
  "ExpiredTokenException",
  "OptInRequired",
  "Blocked",
  "CredentialsProviderError",
]);
/**
 * GetConsoleOutput with Latest=true on an instance type without the Nitro hypervisor: the API
 * reference says only Nitro types support it, without naming the error; the client error for
 * an operation a resource does not support is UnsupportedOperation ("Unsupported" being its
 * sibling for requests that cannot be served there). Neither heals while the instance lives, so
 * the host key wait stops at once instead of retrying until host_key_timeout_seconds.
 */
const LATEST_UNSUPPORTED_CODES = new Set(["UnsupportedOperation", "Unsupported"]);
const THROTTLE_CODES = new Set(["RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException"]);
const NETWORK_CODES = new Set(["ECONNREFUSED", "ECONNRESET", "EPIPE", "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH", "EAI_AGAIN", "ENOTFOUND", "TimeoutError", "RequestTimeout"]);
/** Codes the SDK would retry (HTTP 500) that only waste time: another try finds no capacity either. */
const NO_SDK_RETRY = new Set([...CAPACITY_CODES]);

/** This request's ClientToken for one instance type is held by an earlier failed call with other parameters. */
class TokenBoundError extends BackendError {}

interface SdkErrorLike {
  name?: string;
  code?: string;
  message?: string;
  $fault?: string;
  $metadata?: { httpStatusCode?: number; attempts?: number };
}

function errorCode(e: unknown): string {
  const x = e as SdkErrorLike;
  return x?.name && x.name !== "Error" ? x.name : (x?.code ?? "Error");
}

function clean(s: string): string {
  return scrubSecrets(s).replace(/\s+/g, " ").slice(0, 600);
}

// ---- statuses as the pollers see them ------------------------------------------------------------

export interface Ec2Status {
  id: string;
  state: string;
  publicIp: string | undefined;
  privateIp: string | undefined;
  reasonCode: string | undefined;
  reasonMessage: string | undefined;
  transition: string | undefined;
  launchTime: Date | undefined;
  instanceType: string | undefined;
  availabilityZone: string | undefined;
  requestId: string | undefined;
}

const FINAL_STATES = new Set(["shutting-down", "terminated", "stopping", "stopped"]);
const isFinal = (s: Ec2Status) => FINAL_STATES.has(s.state);
const SELF_SHUTDOWN = "Client.InstanceInitiatedShutdown";

// ---- options ----------------------------------------------------------------------------------

/** Overrides for tests and benchmarks; production takes everything from the config. */
export interface AwsBackendOptions {
  /** Exit-watch poll interval; default poll_interval_seconds. */
  pollIntervalMs?: number;
  /** Poll interval while an instance boots; default min(poll interval, 1 s). */
  readyPollIntervalMs?: number;
  /** Pause between SSH probes; default the ready poll interval. */
  sshProbeIntervalMs?: number;
  /** How long to keep reading the console of a self-powered-off instance for its marker. Default 120 s. */
  consoleGraceMs?: number;
  /** SDK attempts per call (1 + retries). Default 5. */
  maxAttempts?: number;
  /** SDK retry strategy per regional client; default the SDK's adaptive strategy. */
  retryStrategy?: () => RetryStrategyV2;
  /** Largest image the guest downloads. Default 2 GiB. */
  maxImageBytes?: number;
  /** Concurrent GetConsoleOutput calls per region. Default 8. */
  consoleConcurrency?: number;
  /** Observes every batched poll (which poller, what happened). */
  onPoll?: (poller: "launch" | "exit", e: PollEvent) => void;
}

/** EC2's request-rate class of each call the backend makes (backends.aws.rate_limits). */
type ApiClass = "describe" | "mutate" | "console";
const API_CLASS: Readonly<Record<string, ApiClass>> = {
  DescribeInstancesCommand: "describe",
  RunInstancesCommand: "mutate",
  TerminateInstancesCommand: "mutate",
  GetConsoleOutputCommand: "console",
};
const apiClass = (commandName: string | undefined): ApiClass => API_CLASS[commandName ?? ""] ?? "mutate";

/**
 * How long after launch an InvalidInstanceID.NotFound may only mean "not visible yet" (EC2 API
 * reference, "Eventual consistency"; AWS gives no bound, minutes is what careful clients assume).
 */
const CONSISTENCY_WINDOW_MS = 5 * 60_000;
/** TerminateInstances tries on NotFound within that window (1, 2, 4, 8, 10 s apart) before terminate() reports a retryable error. */
const NOT_FOUND_TRIES = 6;
/** GetConsoleOutput returns only the most recent 64 KB of console output. */
const CONSOLE_WINDOW_BYTES = 64 * 1024;

/** EC2 takes at most 16 KiB of user data (before base64). */
const USER_DATA_LIMIT = 16 * 1024;
const FILTER_VALUES_MAX = 200;
const TERMINATE_BATCH = 100;
const MAX_PAGES = 1000;

type Ec2Sdk = typeof import("@aws-sdk/client-ec2");
type RetrySdk = typeof import("@smithy/core/retry");

/**
 * Refuses the SDK's retries for codes where another attempt is pointless (capacity errors come
 * back as HTTP 500, which the SDK would otherwise retry); everything else goes to `inner`.
 */
class FailFastRetry implements RetryStrategyV2 {
  constructor(
    private readonly inner: RetryStrategyV2,
    private readonly noRetry: ReadonlySet<string>,
  ) {}
  acquireInitialRetryToken(scope: string): Promise<RetryToken> {
    return this.inner.acquireInitialRetryToken(scope);
  }
  refreshRetryTokenForRetry(token: RetryToken, info: RetryErrorInfo): Promise<RetryToken> {
    const name = (info.error as { name?: string } | undefined)?.name;
    if (name !== undefined && this.noRetry.has(name)) return Promise.reject(info.error);
    return this.inner.refreshRetryTokenForRetry(token, info);
  }
  recordSuccess(token: RetryToken): void {
    this.inner.recordSuccess(token as StandardRetryToken);
  }
}

export class AwsBackend implements ManagedBackend {
  readonly name = "aws";
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly almanac: Almanac;
  private readonly unavailable: OfferingCache;
  private readonly metrics: BackendMetrics | undefined;
  private readonly providerId: string;
  private readonly bridgeTag: string;
  private readonly requestTag: string;
  private readonly types: { name: string; shape: InstanceShape }[];
  private readonly maxShape: InstanceShape;
  /** Static keys configured (files or env), read on first use; else `profile`. */
  private readonly usesKeys: boolean;
  private keys: { accessKeyId: string; secretAccessKey: string } | null = null;
  private readonly configDir: string;
  private readonly pollMs: number;
  private readonly readyPollMs: number;
  private readonly sshProbeMs: number;
  private readonly consoleGraceMs: number;
  private readonly maxAttempts: number;
  /** request_ids holding (or about to hold) an instance; bounded by max_concurrent_instances. */
  private readonly active = new Set<string>();
  private readonly clients = new Map<string, Promise<EC2Client>>();
  private readonly consoleLimits = new Map<string, Semaphore>();
  /** Client-side request-rate buckets per (region, API class). */
  private readonly pacer: RateLimiter<ApiClass>;
  private sdk: Promise<{ ec2: Ec2Sdk; retry: RetrySdk }> | null = null;
  private sdkLoaded = false;
  /** Batched polling while instances boot (describe by instance id) and while they run (by tag). */
  private readonly launchWatcher: BatchWatcher<Ec2Status>;
  private readonly exitWatcher: BatchWatcher<Ec2Status>;
  /** "Which instances carry this request's tag?", coalesced per region (a restart asks it for every grant). */
  private readonly requestLookup: BatchLookup<Ec2Status>;
  private lastReconcileAt: number | null = null;
  private closed = false;

  constructor(
    private readonly cfg: AwsConfig,
    ctx: BackendContext,
    private readonly opts: AwsBackendOptions = {},
  ) {
    this.log = ctx.log.child({ backend: this.name });
    this.clock = ctx.clock;
    this.almanac = ctx.almanac;
    this.unavailable = ctx.unavailable;
    this.metrics = ctx.metrics;
    this.providerId = ctx.providerId;
    if (/^aws($|:)/i.test(cfg.tag_prefix)) throw new BackendError(`backends.aws.tag_prefix: "${cfg.tag_prefix}" is reserved by AWS (tag keys may not start with "aws:")`, this.name);
    this.bridgeTag = `${cfg.tag_prefix}:bridge-id`;
    this.requestTag = `${cfg.tag_prefix}:request-id`;

    const unknown = cfg.instance_types.filter((t) => !AWS_INSTANCE_TYPES[t]);
    if (unknown.length > 0)
      throw new BackendError(
        `backends.aws.instance_types: ${unknown.map((t) => `"${t}"`).join(", ")} ${unknown.length === 1 ? "is" : "are"} not in compute-bridge's instance type table (vCPUs and memory unknown); supported families: ${[...Object.keys(FAMILIES), "t3", "t3a", "t4g"].join(", ")}`,
        this.name,
      );
    this.types = [...new Set(cfg.instance_types)]
      .map((name) => ({ name, shape: AWS_INSTANCE_TYPES[name]! }))
      .sort((a, b) => a.shape.vcpus - b.shape.vcpus || a.shape.memory_mib - b.shape.memory_mib);
    this.maxShape = {
      vcpus: Math.max(...this.types.map((t) => t.shape.vcpus)),
      memory_mib: Math.max(...this.types.map((t) => t.shape.memory_mib)),
    };

    // Credentials are read on first use, not here: check-config and card build backends offline
    // on machines that may not hold the secrets. `doctor` (check()) and the start-up reconcile
    // surface an unreadable key file at once, naming the config key. Default credential discovery
    // (env, IMDS, ...) is never used: static keys, or the named profile only.
    this.usesKeys = cfg.access_key_id_file !== undefined || cfg.access_key_id_env !== undefined;
    this.configDir = ctx.configDir;

    this.pollMs = opts.pollIntervalMs ?? cfg.poll_interval_seconds * 1000;
    // While something boots, one batched call per region per second: detection lag ~0.5 s on average.
    this.readyPollMs = opts.readyPollIntervalMs ?? Math.min(this.pollMs, 1000);
    this.sshProbeMs = opts.sshProbeIntervalMs ?? this.readyPollMs;
    this.consoleGraceMs = opts.consoleGraceMs ?? 120_000;
    this.maxAttempts = opts.maxAttempts ?? 5;
    this.pacer = new RateLimiter<ApiClass>(cfg.rate_limits, this.clock);

    this.launchWatcher = new BatchWatcher<Ec2Status>({
      describe: (region, ids, signal) => this.describeByIds(region, ids, signal),
      intervalMs: this.readyPollMs,
      clock: this.clock,
      // Right after RunInstances, DescribeInstances may not list the instance for a few seconds.
      missingAfter: Math.max(5, Math.ceil(15_000 / this.readyPollMs)),
      onPoll: (e) => this.onPoll("launch", e),
    });
    this.exitWatcher = new BatchWatcher<Ec2Status>({
      describe: (region, ids, signal) => this.describeWatched(region, ids, signal),
      intervalMs: this.pollMs,
      clock: this.clock,
      missingAfter: 3,
      onPoll: (e) => this.onPoll("exit", e),
    });
    this.requestLookup = new BatchLookup<Ec2Status>((region, requestIds) => this.describeRequests(region, requestIds), FILTER_VALUES_MAX);
  }

  // ---- the contract -----------------------------------------------------------------------------

  capabilities(): Capabilities {
    return {
      regions: Object.keys(this.cfg.regions).sort(),
      tdx_capable: false,
      max_cpu_millicores: this.cfg.max_concurrent_instances * this.maxShape.vcpus * 1000,
      max_ram_mib: this.cfg.max_concurrent_instances * this.maxShape.memory_mib,
    };
  }

  canSatisfy(grant: ComputeGrant, held: Held = NOTHING_HELD): Satisfaction {
    if (grant.tdx_required) return { ok: false, code: "tdx_not_supported", message: "EC2 has no Intel TDX instances" };
    if (!this.cfg.regions[grant.region])
      return { ok: false, code: "region_not_served", message: `aws serves ${Object.keys(this.cfg.regions).sort().join(", ")}` };
    const fitting = this.fitting(grant);
    if (fitting.length === 0) {
      const big = this.types[this.types.length - 1]!;
      return { ok: false, code: "too_large", message: `grant needs ${grant.cpu_millicores}m CPU / ${grant.ram_mib} MiB; the largest configured instance type ${big.name} has ${big.shape.vcpus * 1000}m / ${big.shape.memory_mib} MiB` };
    }
    const full = countDecline(this.name, held, this.cfg.max_concurrent_instances, "max_concurrent_instances");
    if (full) return full;
    const first = fitting.find((t) => !this.unavailable.isUnavailable(this.name, grant.region, t.name));
    if (!first) return { ok: false, code: "offering_unavailable", message: `no capacity was reported recently in ${grant.region} for ${fitting.map((t) => t.name).join(", ")}` };
    return { ok: true, shape: first.name };
  }

  async provision(grant: ComputeGrant, envelope: Envelope, signal: AbortSignal): Promise<ProvisionedInstance> {
    const rid = grant.request_id;
    const region = grant.region;
    const rcfg = this.cfg.regions[region];
    if (!rcfg) throw new InvalidRequestError(`aws does not serve region ${region}`, this.name);
    if (grant.tdx_required) throw new InvalidRequestError("the grant requires Intel TDX; EC2 has no TDX instances", this.name);
    const userData = this.userData(grant, envelope);
    this.active.add(rid);

    // A retried or resumed provision adopts what an earlier call created.
    const existing = await this.findRequestInstance(region, rid, signal);
    let status: Ec2Status;
    if (existing) {
      this.log.info({ request_id: rid, instance_id: existing.id, region, state: existing.state }, "adopting the instance an earlier provision created");
      status = existing;
    } else {
      status = await this.launchFitting(grant, userData, signal);
    }
    return this.waitReady(grant, status, signal);
  }

  async watchUntilExit(instance: ProvisionedInstance, validTo: Date, signal: AbortSignal): Promise<ExitObservation> {
    const id = instance.instance_id;
    if (!id) throw new NotFoundError(`grant ${instance.request_id} has no EC2 instance id to watch`, this.name);
    if (signal.aborted) throw abortError(signal);
    this.active.add(instance.request_id);
    const ctl = new AbortController();
    const onAbort = () => ctl.abort(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      const remaining = validTo.getTime() - this.clock.now();
      const expiry = remaining > 0 ? this.clock.sleep(remaining, ctl.signal).then(() => null) : Promise.resolve(null);
      const r = await Promise.race([this.exitWatcher.waitFor(instance.region, id, { until: isFinal, signal: ctl.signal }), expiry]);
      if (r === null) {
        // valid_to: one direct look, in case the workload ended since the last poll.
        const now = await this.describeOne(instance.region, id, signal).catch((e: unknown) => {
          if (isAbort(e, signal)) throw e;
          return undefined;
        });
        if (now && isFinal(now)) return await this.exitObservation(instance, now, signal);
        this.log.info({ request_id: instance.request_id, instance_id: id, region: instance.region }, "valid_to reached; the instance is still running");
        return { kind: "expired", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: new Date(this.clock.now()).toISOString(), failure: null };
      }
      if (r.kind === "missing")
        return { kind: "lost", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: null, failure: { kind: "lost", message: `EC2 no longer lists instance ${id} in ${instance.region}` } };
      return await this.exitObservation(instance, r.status, signal);
    } finally {
      signal.removeEventListener("abort", onAbort);
      ctl.abort();
    }
  }

  async terminate(instance: ProvisionedInstance): Promise<void> {
    const rid = instance.request_id;
    const region = instance.region;
    if (!this.cfg.regions[region]) {
      this.active.delete(rid);
      return;
    }
    let ids: string[];
    if (instance.instance_id) {
      ids = [instance.instance_id];
    } else {
      // A placeholder: whatever a create call for this request left behind, found by tag.
      const found = await this.findRequestInstances(region, rid, undefined);
      ids = found.filter((s) => s.state !== "terminated" && s.state !== "shutting-down").map((s) => s.id);
    }
    if (ids.length > 0) {
      const launched = Date.parse(instance.started_at);
      await this.terminateIds(region, ids, instance.instance_id && Number.isFinite(launched) ? launched : undefined);
      this.log.info({ request_id: rid, instance_ids: ids, region }, "EC2 confirmed termination");
    }
    this.active.delete(rid);
  }

  // ---- hooks ------------------------------------------------------------------------------------

  /** Terminate tagged instances no live grant owns (orphans), throttled to reconcile_interval_seconds. */
  async reconcile(live: ReadonlySet<string>): Promise<void> {
    const now = this.clock.now();
    if (this.lastReconcileAt !== null && now - this.lastReconcileAt < this.cfg.reconcile_interval_seconds * 1000) return;
    const failures: string[] = [];
    for (const region of Object.keys(this.cfg.regions).sort()) {
      try {
        await this.reconcileRegion(region, live, now);
      } catch (e) {
        const err = this.mapError(e, "reconcile", region);
        failures.push(`${region}: ${err.message}`);
        this.log.error({ region, err: { kind: err.kind, message: err.message } }, "reconciling EC2 instances failed in this region");
      }
    }
    if (failures.length > 0) throw new BackendError(`aws reconcile failed (${failures.join("; ")}); it runs again at the next interval`, this.name);
    this.lastReconcileAt = now;
  }

  /**
   * For the (signed) card: stable values only, so the card does not change with every poll.
   * `failing_regions` appears while batched DescribeInstances calls keep failing there.
   */
  status(): Record<string, unknown> {
    const failing = [...new Set([...this.launchWatcher.failingScopes(), ...this.exitWatcher.failingScopes()])].sort();
    return { active: this.active.size, max_concurrent_instances: this.cfg.max_concurrent_instances, ...(failing.length > 0 ? { failing_regions: failing } : {}) };
  }

  /** Counters for metrics, tests and benchmarks. */
  stats(): { active: number; booting: number; request_lookups: number; watched: number; describe_polls: number; describe_errors: number; sdk_loaded: boolean } {
    const launch = this.launchWatcher.stats();
    const exit = this.exitWatcher.stats();
    return {
      active: this.active.size,
      booting: launch.waiters,
      request_lookups: this.requestLookup.callCount,
      watched: exit.waiters,
      describe_polls: launch.polls + exit.polls,
      describe_errors: launch.errors + exit.errors,
      sdk_loaded: this.sdkLoaded,
    };
  }

  /** `compute-bridge doctor`: credentials and reachability per region, read-only (one DescribeInstances each). */
  async check(): Promise<CheckResult[]> {
    const out: CheckResult[] = [];
    for (const region of Object.keys(this.cfg.regions).sort()) {
      const what = `credentials and DescribeInstances in ${region}`;
      try {
        const mine = await this.describeFiltered(region, [
          { Name: `tag:${this.bridgeTag}`, Values: [this.providerId] },
          { Name: "instance-state-name", Values: ["pending", "running", "shutting-down", "stopping", "stopped"] },
        ], undefined);
        out.push({ check: what, ok: true, detail: `${mine.length} instance${mine.length === 1 ? "" : "s"} tagged ${this.bridgeTag}=${this.providerId}` });
      } catch (e) {
        out.push({ check: what, ok: false, detail: this.mapError(e, "DescribeInstances", region).message });
      }
    }
    return out;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.launchWatcher.close();
    this.exitWatcher.close();
    const clients = [...this.clients.values()];
    this.clients.clear();
    for (const c of await Promise.allSettled(clients)) if (c.status === "fulfilled") c.value.destroy();
  }

  // ---- provisioning -----------------------------------------------------------------------------

  /** Configured types that fit the grant, smallest first. */
  private fitting(grant: ComputeGrant): { name: string; shape: InstanceShape }[] {
    return this.types.filter((t) => t.shape.vcpus * 1000 >= grant.cpu_millicores && t.shape.memory_mib >= grant.ram_mib);
  }

  /**
   * RunInstances with each fitting type in turn (smallest first, skipping those recently without
   * capacity) until one launches. A capacity or limit error marks that type unavailable and moves
   * on; a type whose token EC2 holds bound to other parameters is skipped. When none launches, a
   * CapacityError naming every attempt lets the Fleet fail over.
   */
  private async launchFitting(grant: ComputeGrant, userData: string, signal: AbortSignal): Promise<Ec2Status> {
    const region = grant.region;
    const fitting = this.fitting(grant);
    if (fitting.length === 0) throw new InvalidRequestError(`no configured instance type fits ${grant.cpu_millicores}m CPU / ${grant.ram_mib} MiB`, this.name);
    const reasons: string[] = [];
    let last: CapacityError | undefined;
    for (const { name: type } of fitting) {
      if (this.unavailable.isUnavailable(this.name, region, type)) {
        reasons.push(`${type}: no capacity reported recently`);
        continue;
      }
      try {
        return await this.runInstance(grant, type, userData, signal);
      } catch (e) {
        if (e instanceof CapacityError) {
          if (e.offering) this.unavailable.markUnavailable(this.name, e.offering.region, e.offering.shape);
          last = e;
        } else if (!(e instanceof TokenBoundError)) throw e;
        reasons.push(`${type}: ${e.message}`);
        this.log.warn({ request_id: grant.request_id, region, instance_type: type, err: { kind: e.kind, message: e.message } }, "EC2 could not launch this instance type; trying the next fitting one");
      }
    }
    const err = new CapacityError(`no fitting instance type could be launched in ${region} (${reasons.join("; ")})`, this.name, last ? { cause: last } : undefined);
    // The offering was marked above; the Fleet marks it again (same key), harmless.
    return Promise.reject(last?.offering ? err.withOffering(last.offering.region, last.offering.shape) : err);
  }

  /** The cloud-init user data, base64; gzip-compressed (cloud-init inflates it) when it would not fit. */
  private userData(grant: ComputeGrant, envelope: Envelope): string {
    let script: string;
    try {
      script = renderBootScript({
        requestId: grant.request_id,
        envelope,
        sshUser: this.cfg.ssh_user,
        deadlineEpochSeconds: Math.floor(this.almanac.toWallMs(grant.valid_to) / 1000),
        ...(this.opts.maxImageBytes !== undefined ? { maxImageBytes: this.opts.maxImageBytes } : {}),
      });
    } catch (e) {
      if (e instanceof BootScriptError) throw new InvalidRequestError(e.message, this.name);
      throw e;
    }
    let bytes = Buffer.from(script, "utf8");
    if (bytes.length > USER_DATA_LIMIT) bytes = gzipSync(bytes, { level: 9 });
    if (bytes.length > USER_DATA_LIMIT)
      throw new InvalidRequestError(`the envelope's command and env make ${bytes.length} bytes of EC2 user data even compressed; EC2 accepts at most ${USER_DATA_LIMIT}`, this.name);
    return bytes.toString("base64");
  }

  /**
   * ClientToken: at most 64 ASCII characters, stable per (provider id, request_id, instance type).
   * EC2 keeps a token bound to the parameters of the call that used it, also when that call failed
   * (another type with the same token answers IdempotentParameterMismatch), so each shape has its own.
   */
  clientToken(requestId: string, instanceType: string): string {
    return createHash("sha256").update(`compute-bridge\u0000${this.providerId}\u0000${requestId}\u0000${instanceType}`).digest("hex");
  }

  private async runInstance(grant: ComputeGrant, type: string, userData: string, signal: AbortSignal): Promise<Ec2Status> {
    const region = grant.region;
    const rcfg = this.cfg.regions[region]!;
    const token = this.clientToken(grant.request_id, type);
    const tags = [
      { Key: this.bridgeTag, Value: this.providerId },
      { Key: this.requestTag, Value: grant.request_id },
      { Key: "Name", Value: `compute-bridge ${grant.request_id}` },
    ];
    const input: RunInstancesCommandInput = {
      ImageId: rcfg.image_id,
      InstanceType: type as RunInstancesCommandInput["InstanceType"],
      MinCount: 1,
      MaxCount: 1,
      ClientToken: token,
      SubnetId: rcfg.subnet_id,
      SecurityGroupIds: rcfg.security_group_ids,
      ...(rcfg.key_name !== undefined ? { KeyName: rcfg.key_name } : {}),
      UserData: userData,
      InstanceInitiatedShutdownBehavior: "terminate",
      MetadataOptions: { HttpTokens: "required", HttpEndpoint: "enabled" },
      // Instance tags only: the documented least-privilege policy allows CreateTags on instances at
      // launch (docs/operations.md); the root volume is deleted with the instance.
      TagSpecifications: [{ ResourceType: "instance", Tags: tags }],
    };
    const { ec2: sdk } = await this.loadSdk();
    try {
      const out = await this.send(region, "mutate", signal, (c, o) => c.send(new sdk.RunInstancesCommand(input), o));
      const inst = out.Instances?.[0];
      if (!inst?.InstanceId) throw new BackendError(`RunInstances in ${region} returned no instance`, this.name);
      if (out.$metadata.attempts !== undefined && out.$metadata.attempts > 1)
        this.log.info({ request_id: grant.request_id, attempts: out.$metadata.attempts }, "RunInstances succeeded after retries (same ClientToken)");
      this.log.info({ request_id: grant.request_id, instance_id: inst.InstanceId, region, instance_type: type }, "EC2 instance launched");
      return this.toStatus(inst);
    } catch (e) {
      if (isAbort(e, signal)) throw e;
      const code = errorCode(e);
      if (code === "IdempotentParameterMismatch" || code === "IdempotentInstanceTerminated") {
        // The token was used before: by a launch with other parameters (a config change across a
        // restart), or by an instance since terminated. Adopt that launch if EC2 still lists it;
        // a terminated one ends in waitReady with its state reason, never with a second launch.
        const prior = await this.describeFiltered(region, [{ Name: "client-token", Values: [token] }], signal);
        const pick = prior.find((s) => s.state !== "terminated") ?? prior[0];
        if (pick) {
          this.log.info({ request_id: grant.request_id, instance_id: pick.id, region, state: pick.state, code }, "adopting the instance launched earlier with this request's ClientToken");
          return pick;
        }
        if (code === "IdempotentInstanceTerminated")
          throw new BackendError(`EC2 RunInstances in ${region}: the instance launched earlier for this request as ${type} was terminated and is no longer listed (IdempotentInstanceTerminated); not launching a second one`, this.name, { cause: e });
        // A failed launch with other parameters holds the token: this type cannot be launched for the request.
        throw new TokenBoundError(`EC2 RunInstances in ${region}: this request's ClientToken for ${type} is bound to an earlier call with other parameters that launched nothing (IdempotentParameterMismatch)`, this.name, { cause: e });
      }
      throw this.mapError(e, "RunInstances", region, type);
    }
  }

  private async waitReady(grant: ComputeGrant, launched: Ec2Status, signal: AbortSignal): Promise<ProvisionedInstance> {
    const ready = await this.waitSsh(grant, launched, signal);
    if ("ended" in ready) return ready.ended;
    // The launch poller has let go of the instance by now: reading the console costs no DescribeInstances.
    const hostKey = await this.hostKey(grant, ready.st.id, signal);
    return this.provisioned(grant, ready.st, ready.host, hostKey);
  }

  /** Until `running` and an SSH banner, or until the guest ended on its own first (`ended`, nothing more to wait for). */
  private async waitSsh(grant: ComputeGrant, launched: Ec2Status, signal: AbortSignal): Promise<{ st: Ec2Status; host: string } | { ended: ProvisionedInstance }> {
    const region = grant.region;
    const id = launched.id;
    let st = launched;
    const ctl = new AbortController();
    const onAbort = () => ctl.abort(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      if (st.state === "pending") {
        const timeout = this.clock.sleep(this.cfg.launch_timeout_seconds * 1000, ctl.signal).then(() => null);
        const r = await Promise.race([this.launchWatcher.waitFor(region, id, { until: (s) => s.state !== "pending", signal: ctl.signal }), timeout]);
        if (r === null) {
          const last = this.launchWatcher.lastStatus(region, id)?.state ?? "unknown";
          const err = this.launchWatcher.lastError(region);
          throw new BackendError(
            `instance ${id} in ${region} did not reach "running" within ${this.cfg.launch_timeout_seconds} s (last state: ${last}${err ? `; last DescribeInstances error: ${clean(String((err as Error).message ?? err))}` : ""})`,
            this.name,
          );
        }
        if (r.kind === "missing") throw new BackendError(`instance ${id} vanished from EC2 in ${region} while it was starting`, this.name);
        st = r.status;
      }
      if (st.state !== "running") return { ended: this.endedBeforeReady(grant, st) };

      const host = st.publicIp ?? st.privateIp;
      if (!host) throw new BackendError(`instance ${id} in ${region} is running without an IP address`, this.name);
      const port = this.cfg.ssh_port;
      const ssh = waitForSsh(host, port, { timeoutMs: this.cfg.ready_timeout_seconds * 1000, intervalMs: this.sshProbeMs, signal: ctl.signal, clock: this.clock }).then((r) => ({ t: "ssh" as const, r }));
      // The guest may finish (or fail its image check) and power off before sshd ever answers.
      const ended = this.launchWatcher.waitFor(region, id, { until: isFinal, signal: ctl.signal }).then((r) => ({ t: "ended" as const, r }));
      let winner;
      try {
        winner = await Promise.race([ssh, ended]);
      } catch (e) {
        if (e instanceof SshNotReadyError) throw new BackendError(`instance ${id} in ${region}: ${e.message}`, this.name);
        throw e;
      }
      if (winner.t === "ended") {
        if (winner.r.kind === "missing") throw new BackendError(`instance ${id} vanished from EC2 in ${region} before SSH was ready`, this.name);
        return { ended: this.endedBeforeReady(grant, winner.r.status) };
      }
      this.log.info({ request_id: grant.request_id, instance_id: id, region, host, ssh_attempts: winner.r.attempts }, "instance ready (SSH answers)");
      return { st, host };
    } finally {
      signal.removeEventListener("abort", onAbort);
      ctl.abort();
    }
  }

  /**
   * The guest's SSH host key fingerprint, as its boot script reported it on the live serial console
   * (read through the per-region console limiter every poll interval, up to
   * host_key_timeout_seconds). Never fails the grant: null, with the reason in a warning, when the
   * guest has no ed25519 key, the report does not come in time, or the type keeps no live console.
   */
  private async hostKey(grant: ComputeGrant, id: string, signal: AbortSignal): Promise<string | null> {
    const read = async () => {
      const text = await this.consoleOutput(grant.region, id, signal, { latest: true });
      // EC2 keeps the last 64 KB only: a full console without the report has scrolled past it.
      if (Buffer.byteLength(text) >= CONSOLE_WINDOW_BYTES && parseHostKey(text, grant.request_id) === null)
        throw new ConsoleUnavailableError(`the host key report has scrolled out of the last ${CONSOLE_WINDOW_BYTES / 1024} KB of console output EC2 keeps`);
      return text;
    };
    const found = await waitForHostKey(read, grant.request_id, {
      timeoutMs: this.cfg.host_key_timeout_seconds * 1000,
      intervalMs: this.pollMs,
      signal,
      clock: this.clock,
    });
    if (found.fingerprint === null)
      this.log.warn({ request_id: grant.request_id, instance_id: id, region: grant.region, reason: found.missing }, "no SSH host key fingerprint from the guest; host_key_sha256 stays null");
    else this.log.info({ request_id: grant.request_id, instance_id: id, host_key_sha256: found.fingerprint }, "the guest reported its SSH host key");
    return found.fingerprint;
  }

  /**
   * The instance stopped before SSH was ready: a guest that ran and powered off is handed on to the
   * watch, without a host key (nobody can connect to it any more).
   */
  private endedBeforeReady(grant: ComputeGrant, st: Ec2Status): ProvisionedInstance {
    if (st.reasonCode === SELF_SHUTDOWN) {
      this.log.info({ request_id: grant.request_id, instance_id: st.id, state: st.state }, "the instance powered itself off before SSH was ready; its console tells the outcome");
      return this.provisioned(grant, st, st.publicIp ?? st.privateIp ?? null, null);
    }
    const reason = st.reasonMessage ?? st.transition ?? "no reason given";
    if (st.reasonCode?.includes("InsufficientInstanceCapacity") && st.instanceType)
      throw new CapacityError(`instance ${st.id} in ${grant.region} ended at launch: ${reason}`, this.name).withOffering(grant.region, st.instanceType);
    throw new BackendError(`instance ${st.id} in ${grant.region} is ${st.state} before it became ready: ${reason}`, this.name);
  }

  private provisioned(grant: ComputeGrant, st: Ec2Status, host: string | null, hostKeySha256: string | null): ProvisionedInstance {
    return {
      request_id: grant.request_id,
      backend: this.name,
      instance_id: st.id,
      region: grant.region,
      host,
      ssh_port: host ? this.cfg.ssh_port : null,
      ssh_user: host ? this.cfg.ssh_user : null,
      host_key_sha256: hostKeySha256,
      started_at: (st.launchTime ?? new Date(this.clock.now())).toISOString(),
      cpu_millicores: grant.cpu_millicores,
      ram_mib: grant.ram_mib,
      details: {
        ...(st.instanceType ? { instance_type: st.instanceType } : {}),
        ...(st.availabilityZone ? { availability_zone: st.availabilityZone } : {}),
        ...(st.instanceType ? { client_token: this.clientToken(grant.request_id, st.instanceType) } : {}),
      },
    };
  }

  // ---- exit -----------------------------------------------------------------------------------

  private async exitObservation(instance: ProvisionedInstance, st: Ec2Status, signal: AbortSignal): Promise<ExitObservation> {
    const id = st.id;
    const self = st.reasonCode === SELF_SHUTDOWN;
    // EC2 posts console output shortly after a shutdown: keep looking a while when the guest powered off itself.
    const lookUntil = this.clock.now() + (self ? this.consoleGraceMs : 0);
    const endedAt = transitionTime(st.transition) ?? new Date(this.clock.now()).toISOString();
    let errors = 0;
    for (;;) {
      let text: string | null = null;
      try {
        text = await this.consoleOutput(instance.region, id, signal);
      } catch (e) {
        if (isAbort(e, signal)) throw e;
        if (e instanceof NotFoundError) break;
        if (++errors >= 5) throw e;
      }
      if (text !== null) {
        const m = parseMarker(text, instance.request_id);
        if (m) return this.fromMarker(instance, m, endedAt);
        if (this.clock.now() >= lookUntil) break;
      }
      await this.clock.sleep(this.pollMs, signal);
    }
    if (self) {
      this.log.warn({ request_id: instance.request_id, instance_id: id }, "the instance powered off without an exit marker on its console");
      return { kind: "exited", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: endedAt, failure: { kind: "no_exit_marker", message: `instance ${id} powered itself off without reporting an exit code on its serial console` } };
    }
    const reason = st.reasonMessage ?? st.transition ?? "no reason given";
    this.log.warn({ request_id: instance.request_id, instance_id: id, state: st.state, reason }, "the instance ended without reporting an exit code");
    return { kind: "lost", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: endedAt, failure: { kind: "lost", message: `instance ${id} is ${st.state} (${clean(reason)}) and reported no exit code` } };
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

  /**
   * GetConsoleOutput, base64-decoded, at most `consoleConcurrency` at a time per region. `latest`:
   * the live console (Nitro types only) rather than the buffered copy EC2 posts after state
   * transitions, which would not show a running guest's output; a type without it throws
   * ConsoleUnavailableError.
   */
  private async consoleOutput(region: string, id: string, signal: AbortSignal, opts: { latest?: boolean } = {}): Promise<string> {
    let limit = this.consoleLimits.get(region);
    if (!limit) this.consoleLimits.set(region, (limit = new Semaphore(this.opts.consoleConcurrency ?? 8)));
    const { ec2: sdk } = await this.loadSdk();
    return limit.run(async () => {
      try {
        const out = await this.send(region, "console", signal, (c, o) => c.send(new sdk.GetConsoleOutputCommand({ InstanceId: id, ...(opts.latest ? { Latest: true } : {}) }), o));
        return out.Output ? Buffer.from(out.Output, "base64").toString("utf8") : "";
      } catch (e) {
        if (isAbort(e, signal)) throw e;
        if (opts.latest && LATEST_UNSUPPORTED_CODES.has(errorCode(e)))
          throw new ConsoleUnavailableError(`EC2 keeps no live console for ${id} in ${region} (${errorCode(e)}: ${clean((e as SdkErrorLike)?.message ?? "")}); only Nitro instance types have one`);
        throw this.mapError(e, "GetConsoleOutput", region);
      }
    }, signal);
  }

  // ---- terminate / reconcile ------------------------------------------------------------------

  /**
   * TerminateInstances, then make sure EC2 reports every id shutting-down or terminated.
   * `launchedAtMs` (one id): NotFound within CONSISTENCY_WINDOW_MS of it may be eventual
   * consistency (the instance exists and bills), so it is asked again with backoff and, if still
   * not listed, reported as a retryable error rather than as terminated.
   */
  private async terminateIds(region: string, ids: string[], launchedAtMs?: number): Promise<void> {
    const { ec2: sdk } = await this.loadSdk();
    let unconfirmed: string[] = ids;
    for (let tries = 1; ; tries++) {
      try {
        const out = await this.send(region, "mutate", undefined, (c) => c.send(new sdk.TerminateInstancesCommand({ InstanceIds: ids })));
        const ok = new Set((out.TerminatingInstances ?? []).filter((t) => t.CurrentState?.Name === "shutting-down" || t.CurrentState?.Name === "terminated").map((t) => t.InstanceId));
        unconfirmed = ids.filter((id) => !ok.has(id));
        break;
      } catch (e) {
        const code = errorCode(e);
        if (code === "InvalidInstanceID.Malformed" && ids.length === 1) return; // never existed
        if (code !== "InvalidInstanceID.NotFound") throw this.mapError(e, "TerminateInstances", region);
        if (ids.length > 1) {
          for (const id of ids) await this.terminateIds(region, [id], launchedAtMs);
          return;
        }
        const age = launchedAtMs === undefined ? Number.POSITIVE_INFINITY : this.clock.now() - launchedAtMs;
        if (age >= CONSISTENCY_WINDOW_MS) return; // gone: terminated over an hour ago, or never existed
        if (tries >= NOT_FOUND_TRIES)
          throw new TransientError(`EC2 does not list instance ${ids[0]} in ${region} yet (launched ${Math.round(age / 1000)} s ago; eventual consistency): its termination is retried`, this.name);
        this.log.info({ region, instance_id: ids[0], tries, age_s: Math.round(age / 1000) }, "TerminateInstances: instance not visible yet (eventual consistency); asking again");
        await this.clock.sleep(Math.min(1000 * 2 ** (tries - 1), 10_000));
      }
    }
    // Not confirmed in the reply: look again a few times before reporting failure (the manager retries).
    for (let i = 0; unconfirmed.length > 0 && i < 5; i++) {
      await this.clock.sleep(this.readyPollMs);
      const seen = new Map((await this.describeFiltered(region, [{ Name: "instance-id", Values: unconfirmed }], undefined)).map((s) => [s.id, s.state]));
      unconfirmed = unconfirmed.filter((id) => seen.has(id) && !["shutting-down", "terminated"].includes(seen.get(id)!));
    }
    if (unconfirmed.length > 0) throw new TransientError(`EC2 has not confirmed termination of ${unconfirmed.join(", ")} in ${region} yet`, this.name);
  }

  private async reconcileRegion(region: string, live: ReadonlySet<string>, now: number): Promise<void> {
    const mine = await this.describeFiltered(region, [
      { Name: `tag:${this.bridgeTag}`, Values: [this.providerId] },
      { Name: "instance-state-name", Values: ["pending", "running", "stopping", "stopped"] },
    ], undefined);
    const graceMs = this.cfg.orphan_grace_seconds * 1000;
    const orphans: Ec2Status[] = [];
    for (const s of mine) {
      // Live in the store, or held by this backend right now (a grant accepted after the store's
      // snapshot may be launching): never an orphan, whatever orphan_grace_seconds says.
      if (s.requestId !== undefined && (live.has(s.requestId) || this.active.has(s.requestId))) {
        this.active.add(s.requestId);
        continue;
      }
      const age = s.launchTime ? now - s.launchTime.getTime() : Number.POSITIVE_INFINITY;
      if (age < graceMs) {
        this.log.debug({ region, instance_id: s.id, request_id: s.requestId, age_s: Math.round(age / 1000) }, "untracked instance is within orphan_grace_seconds; left for now");
        continue;
      }
      orphans.push(s);
    }
    for (const s of orphans)
      this.log.warn(
        { region, instance_id: s.id, request_id: s.requestId ?? null, state: s.state, launched_at: s.launchTime?.toISOString() ?? null, instance_type: s.instanceType },
        "terminating orphaned EC2 instance (tagged by this bridge, no live grant)",
      );
    for (let i = 0; i < orphans.length; i += TERMINATE_BATCH) {
      const batch = orphans.slice(i, i + TERMINATE_BATCH);
      await this.terminateIds(region, batch.map((s) => s.id));
      for (const _ of batch) this.metrics?.orphanSwept(this.name, "instance");
    }
  }

  // ---- describe -------------------------------------------------------------------------------

  /**
   * The request's instance to adopt: a live one first, else one that already ran and powered off.
   * The ClientToken makes a second live instance impossible; should one exist anyway (a launch
   * by hand with copied tags), it is terminated at once rather than left running.
   */
  private async findRequestInstance(region: string, requestId: string, signal: AbortSignal): Promise<Ec2Status | undefined> {
    const all = await this.findRequestInstances(region, requestId, signal);
    const byAge = (a: Ec2Status, b: Ec2Status) => (a.launchTime?.getTime() ?? 0) - (b.launchTime?.getTime() ?? 0);
    const live = all.filter((s) => !FINAL_STATES.has(s.state)).sort(byAge);
    if (live.length > 1) {
      const extra = live.slice(1).map((s) => s.id);
      this.log.error({ request_id: requestId, region, adopted: live[0]!.id, instance_ids: extra }, "several live instances carry this request's tag; adopting the oldest and terminating the others");
      await this.terminateIds(region, extra);
    }
    return live[0] ?? all.filter((s) => s.reasonCode === SELF_SHUTDOWN).sort(byAge).pop();
  }

  private findRequestInstances(region: string, requestId: string, signal: AbortSignal | undefined): Promise<Ec2Status[]> {
    return this.requestLookup.get(region, requestId, signal);
  }

  /** One DescribeInstances for many request ids (tag filter with several values), grouped by request. */
  private async describeRequests(region: string, requestIds: readonly string[]): Promise<Map<string, Ec2Status[]>> {
    const found = await this.describeFiltered(region, [
      { Name: `tag:${this.requestTag}`, Values: [...requestIds] },
      { Name: `tag:${this.bridgeTag}`, Values: [this.providerId] },
    ], undefined);
    const out = new Map<string, Ec2Status[]>();
    for (const s of found) if (s.requestId !== undefined) out.set(s.requestId, [...(out.get(s.requestId) ?? []), s]);
    return out;
  }

  private async describeOne(region: string, id: string, signal: AbortSignal): Promise<Ec2Status | undefined> {
    return (await this.describeFiltered(region, [{ Name: "instance-id", Values: [id] }], signal))[0];
  }

  /** Launch poller: the booting ids, by instance-id filter (no NotFound for a not-yet-visible id). */
  private async describeByIds(region: string, ids: readonly string[], signal: AbortSignal): Promise<Map<string, Ec2Status>> {
    const out = new Map<string, Ec2Status>();
    for (let i = 0; i < ids.length; i += FILTER_VALUES_MAX)
      for (const s of await this.describeFiltered(region, [{ Name: "instance-id", Values: ids.slice(i, i + FILTER_VALUES_MAX) }], signal)) out.set(s.id, s);
    return out;
  }

  /**
   * Exit poller: every instance of this bridge in the region that is not terminated, by tag, in
   * pages of 1000 — one call per interval for up to 1000 instances. Watched ids it does not list
   * (terminated since the last poll, or untagged by hand) are looked up by id in the same tick.
   */
  private async describeWatched(region: string, ids: readonly string[], signal: AbortSignal): Promise<Map<string, Ec2Status>> {
    const wanted = new Set(ids);
    const out = new Map<string, Ec2Status>();
    const tagged = await this.describeFiltered(region, [
      { Name: `tag:${this.bridgeTag}`, Values: [this.providerId] },
      { Name: "instance-state-name", Values: ["pending", "running", "shutting-down", "stopping", "stopped"] },
    ], signal);
    for (const s of tagged) if (wanted.has(s.id)) out.set(s.id, s);
    const rest = ids.filter((id) => !out.has(id));
    if (rest.length > 0) for (const [id, s] of await this.describeByIds(region, rest, signal)) out.set(id, s);
    return out;
  }

  /** DescribeInstances with filters, paged (AWS advises against unpaginated calls). */
  private async describeFiltered(region: string, filters: { Name: string; Values: string[] }[], signal: AbortSignal | undefined, pageSize = 1000): Promise<Ec2Status[]> {
    const { ec2: sdk } = await this.loadSdk();
    const out: Ec2Status[] = [];
    let token: string | undefined;
    for (let page = 0; page < MAX_PAGES; page++) {
      let res;
      try {
        res = await this.send(region, "describe", signal, (c, o) => c.send(new sdk.DescribeInstancesCommand({ Filters: filters, MaxResults: pageSize, ...(token ? { NextToken: token } : {}) }), o));
      } catch (e) {
        if (isAbort(e, signal)) throw e;
        throw this.mapError(e, "DescribeInstances", region);
      }
      for (const r of res.Reservations ?? []) for (const i of r.Instances ?? []) if (i.InstanceId) out.push(this.toStatus(i));
      token = res.NextToken || undefined;
      if (!token) break;
    }
    return out;
  }

  private toStatus(i: Instance): Ec2Status {
    return {
      id: i.InstanceId ?? "",
      state: i.State?.Name ?? "unknown",
      publicIp: i.PublicIpAddress || undefined,
      privateIp: i.PrivateIpAddress || undefined,
      reasonCode: i.StateReason?.Code || undefined,
      reasonMessage: i.StateReason?.Message || undefined,
      transition: i.StateTransitionReason || undefined,
      launchTime: i.LaunchTime,
      instanceType: i.InstanceType,
      availabilityZone: i.Placement?.AvailabilityZone,
      requestId: i.Tags?.find((t) => t.Key === this.requestTag)?.Value,
    };
  }

  private onPoll(poller: "launch" | "exit", e: PollEvent): void {
    if (!e.ok && (e.consecutiveErrors === 1 || e.consecutiveErrors % 10 === 0)) {
      const err = e.error instanceof BackendError ? e.error : this.mapError(e.error, "DescribeInstances", e.scope);
      this.log.warn({ region: e.scope, poller, watched: e.ids, consecutive_errors: e.consecutiveErrors, err: { kind: err.kind, message: err.message } }, "batched DescribeInstances failed; retrying at the next interval");
    }
    this.opts.onPoll?.(poller, e);
  }

  // ---- SDK ------------------------------------------------------------------------------------

  /**
   * One SDK call, paced: a token of the (region, API class) bucket first (waiting in order, or
   * until `signal` aborts). SDK retries take theirs in the client's pacing middleware.
   */
  private async send<T>(region: string, cls: ApiClass, signal: AbortSignal | undefined, call: (c: EC2Client, opts: { abortSignal?: AbortSignal }) => Promise<T>): Promise<T> {
    const client = await this.client(region);
    await this.pacer.take(region, cls, signal);
    return call(client, signal ? { abortSignal: signal } : {});
  }

  private loadSdk(): Promise<{ ec2: Ec2Sdk; retry: RetrySdk }> {
    this.sdk ??= Promise.all([import("@aws-sdk/client-ec2"), import("@smithy/core/retry")]).then(([ec2, retry]) => {
      this.sdkLoaded = true;
      return { ec2, retry };
    });
    return this.sdk;
  }

  private client(region: string): Promise<EC2Client> {
    if (this.closed) return Promise.reject(new BackendError("the aws backend is closed", this.name));
    let c = this.clients.get(region);
    if (!c) {
      c = this.createClient(region);
      this.clients.set(region, c);
      c.catch(() => this.clients.delete(region));
    }
    return c;
  }

  private async createClient(region: string): Promise<EC2Client> {
    const { ec2: sdk, retry } = await this.loadSdk();
    let credentials;
    if (this.usesKeys) {
      const keys = this.readKeys();
      credentials = { accessKeyId: keys.accessKeyId, secretAccessKey: keys.secretAccessKey };
    } else {
      const { fromIni } = await import("@aws-sdk/credential-provider-ini");
      credentials = fromIni({ profile: this.cfg.profile! });
    }
    const inner = this.opts.retryStrategy?.() ?? new retry.AdaptiveRetryStrategy(this.maxAttempts);
    const client = new sdk.EC2Client({
      region,
      ...(this.cfg.endpoint !== undefined ? { endpoint: this.cfg.endpoint } : {}),
      credentials,
      maxAttempts: this.maxAttempts,
      retryStrategy: new FailFastRetry(inner, NO_SDK_RETRY),
      requestHandler: { connectionTimeout: 10_000, requestTimeout: 60_000 },
    });
    // Pacing of the SDK's own retries (the first attempt took its token in send()), and the
    // cloud's word that we went too fast: that bucket is emptied for a refill interval.
    client.middlewareStack.add(
      (next, context) => async (args) => {
        const cls = apiClass(context.commandName);
        const header = (args.request as { headers?: Record<string, string> } | undefined)?.headers?.["amz-sdk-request"] ?? "";
        const attempt = Number(/attempt=(\d+)/.exec(header)?.[1] ?? "1");
        if (attempt > 1) await this.pacer.take(region, cls);
        try {
          return await next(args);
        } catch (e) {
          if (THROTTLE_CODES.has(errorCode(e))) this.pacer.throttled(region, cls);
          throw e;
        }
      },
      { step: "deserialize", priority: "high", name: "computeBridgePacing" },
    );
    const metrics = this.metrics;
    if (metrics) {
      // Every attempt (inside the retry loop), with the parsed error code: API calls, retries, throttles.
      client.middlewareStack.add(
        (next, context) => async (args) => {
          const op = (context.commandName ?? "unknown").replace(/Command$/, "");
          const header = (args.request as { headers?: Record<string, string> } | undefined)?.headers?.["amz-sdk-request"] ?? "";
          if (/attempt=(\d+)/.exec(header)?.[1] !== "1" && header !== "") metrics.retry(this.name, op);
          try {
            const r = await next(args);
            metrics.apiCall(this.name, op, "ok");
            return r;
          } catch (e) {
            const code = errorCode(e);
            metrics.apiCall(this.name, op, code);
            if (THROTTLE_CODES.has(code)) metrics.throttled(this.name, op);
            throw e;
          }
        },
        { step: "deserialize", priority: "high", name: "computeBridgeMetrics" },
      );
    }
    return client;
  }

  /** The static keys, read once (readSecret registers them for log redaction). */
  private readKeys(): { accessKeyId: string; secretAccessKey: string } {
    if (this.keys) return this.keys;
    try {
      this.keys = {
        accessKeyId: readSecret(this.configDir, "backends.aws.access_key_id", { file: this.cfg.access_key_id_file, env: this.cfg.access_key_id_env }),
        secretAccessKey: readSecret(this.configDir, "backends.aws.secret_access_key", { file: this.cfg.secret_access_key_file, env: this.cfg.secret_access_key_env }),
      };
    } catch (e) {
      throw new CredentialError(e instanceof Error ? e.message : String(e), this.name, { cause: e });
    }
    return this.keys;
  }

  /** SDK exception -> typed BackendError; the message names the call and region, never a secret. */
  mapError(e: unknown, op: string, region: string, instanceType?: string): BackendError {
    if (e instanceof BackendError) return e;
    const code = errorCode(e);
    const msg = clean((e as SdkErrorLike)?.message ?? String(e));
    const status = (e as SdkErrorLike)?.$metadata?.httpStatusCode;
    const attempts = (e as SdkErrorLike)?.$metadata?.attempts;
    const where = `EC2 ${op} in ${region}`;
    if (CAPACITY_CODES.has(code) && instanceType) {
      const what = LIMIT_CODES.has(code) ? "an account limit was reached" : "no capacity";
      return new CapacityError(`${where}: ${what} for ${instanceType} (${code}: ${msg})`, this.name, { cause: e }).withOffering(region, instanceType);
    }
    if (CREDENTIAL_CODES.has(code))
      return new CredentialError(
        `${where} was refused (${code}): ${msg} — check backends.aws ${this.usesKeys ? "access_key_id_file/secret_access_key_file" : `profile "${this.cfg.profile}"`} and the IAM policy (ec2:RunInstances, DescribeInstances, TerminateInstances, GetConsoleOutput, CreateTags; see docs/operations.md)`,
        this.name,
        { cause: e },
      );
    if (code === "InvalidInstanceID.NotFound" || code === "InvalidInstanceID.Malformed") return new NotFoundError(`${where}: ${msg}`, this.name, { cause: e });
    if (THROTTLE_CODES.has(code) || NETWORK_CODES.has(code) || (status !== undefined && status >= 500) || (e as SdkErrorLike)?.$fault === "server" || (status === undefined && !(e as SdkErrorLike)?.$fault))
      return new TransientError(`${where} failed${attempts ? ` after ${attempts} attempt${attempts === 1 ? "" : "s"}` : ""} (${code}): ${msg}`, this.name, { cause: e });
    if (/^Invalid(AMIID|SubnetID|Group|KeyPair|Parameter)/.test(code))
      return new BackendError(`${where} was rejected (${code}): ${msg} — check backends.aws.regions.${region}`, this.name, { cause: e });
    return new BackendError(`${where} failed (${code}): ${msg}`, this.name, { cause: e });
  }
}

/** "User initiated (2024-01-01 00:00:00 GMT)" -> ISO time, if present. */
function transitionTime(reason: string | undefined): string | null {
  const m = reason ? /\((\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2}) GMT\)/.exec(reason) : null;
  if (!m) return null;
  const t = Date.parse(`${m[1]}T${m[2]}Z`);
  return Number.isFinite(t) ? new Date(t).toISOString() : null;
}
