import type { Almanac, Capabilities, ComputeGrant, DeclineCode, Envelope, ExitObservation, ProvisionedInstance } from "../domain/index.js";
import type { Logger } from "../util/logger.js";
import type { Clock } from "../util/clock.js";
import type { OfferingCache } from "./offering-cache.js";
import type { ImagePolicy } from "../util/image-policy.js";

/**
 * `placement`: where inside the backend the grant's capacity is reserved, when the backend has
 * more than one pool of it (a bare-metal machine's name). The Fleet records it with the
 * reservation and hands it back to provision(). `shape`: the instance type / machine type / VM
 * size a cloud would launch first, which prices the grant (fleet/pricing.ts).
 */
export type Satisfaction = { ok: true; placement?: string; shape?: string } | { ok: false; code: DeclineCode; message: string };

/** Totals of a set of reservations. */
export interface Usage {
  readonly count: number;
  readonly cpu_millicores: number;
  readonly ram_mib: number;
}

/**
 * What a backend has already promised: one reservation per grant accepted for it and not yet
 * ended (queued, provisioning, running or terminating alike), kept by the Fleet's ledger.
 */
export interface Held extends Usage {
  /** The reservations with this placement (e.g. on one bare-metal machine). */
  at(placement: string): Usage;
}

/** Nothing held: canSatisfy's answer for an empty backend. */
export const NOTHING_HELD: Held = { count: 0, cpu_millicores: 0, ram_mib: 0, at: () => NOTHING_HELD };

/**
 * The at_capacity decline of a backend whose capacity is a number of grants (instances for a
 * cloud, workloads for local), or null while it has room. Every such backend checks it after
 * region, TDX and size, and before offering availability.
 */
export function countDecline(backend: string, held: Held, max: number, setting: string, unit = "instances"): Satisfaction | null {
  return held.count >= max ? { ok: false, code: "at_capacity", message: `${backend} holds ${held.count} of ${max} ${unit} (${setting})` } : null;
}

/**
 * The whole contract between the Fleet and a place that runs workloads. Six members; a new
 * backend is one file implementing them, a config section, and one line in registry.ts.
 *
 * Every method must be idempotent per request_id so a restarted daemon can simply call it again:
 * provision() adopts an instance its earlier call created (client token / deterministic name),
 * watchUntilExit() re-attaches, terminate() on something already gone returns normally.
 *
 * Capacity is promised at accept, not at provision (issue #15): a 202 is a promise to the market.
 * The Fleet keeps a ledger of reservations (fleet/reservations.ts), one per grant from its accept
 * until it ends, written in the grant's own durable accept commit and rebuilt from the store's
 * non-terminal grants before a restarted listener accepts anything. canSatisfy() is handed what
 * the backend already holds and decides against its declared capacity minus that, so admission
 * never exceeds it however many grants wait to be provisioned. That is why canSatisfy takes
 * `held` (and the envelope, because a bare-metal machine's mode depends on the image format) and
 * may answer a placement, and why provision() takes the placement back: the decision stays the
 * backend's, the bookkeeping is written once. Backends keep no capacity counters of their own and
 * never refuse for capacity they declared: a CapacityError from provision() means the cloud or host
 * had none (failover), never "the bridge is full".
 */
/*
 * The same answers from every backend (issue #17); the cloud backends get them from the one
 * shared VM backend (cloud/vm-backend.ts), bare metal and local follow the same rules:
 * - canSatisfy declines in this order: region_not_served, tdx_not_supported (then a backend's own
 *   kind of refusal, e.g. bare metal's image_format_not_supported), too_large, at_capacity,
 *   backend_unavailable, offering_unavailable.
 * - An account limit is a QuotaError (fail over at once); no capacity for a shape is a
 *   CapacityError (the next shape or placement, then fail over).
 * - watchUntilExit enforces valid_to itself (the manager's own deadline is the backstop) and
 *   reports an instance that is gone as `kind: "lost"`; it never throws NotFoundError for it.
 * - A sweep that costs cloud API calls runs at most every reconcile_interval_seconds after a
 *   success, and again at the next call after a failure (local's is a directory scan, every call).
 * - Nothing outside the contract and BackendHooks is public API: counters a test or bench reads come
 *   from stats() (BackendHooks), idempotency tokens from the adapters' functions.
 */
export interface Backend {
  readonly name: string;
  /** Declared capacity, from config: no cloud calls. */
  capabilities(): Capabilities;
  /**
   * Fast, local decision (no I/O): can this backend take the grant, given what it already holds
   * (`held`, every reservation but this grant's)? Pure: it reserves nothing itself.
   */
  canSatisfy(grant: ComputeGrant, held?: Held, envelope?: Envelope): Satisfaction;
  /**
   * Create (or adopt) the instance, fetch + verify the image, and wait until it is reachable.
   * `placement` is what canSatisfy answered when the grant was admitted (absent: choose now).
   */
  provision(grant: ComputeGrant, envelope: Envelope, signal: AbortSignal, placement?: string): Promise<ProvisionedInstance>;
  /** Resolve when the workload ends or `validTo` passes; reject with an AbortError on `signal`. */
  watchUntilExit(instance: ProvisionedInstance, validTo: Date, signal: AbortSignal): Promise<ExitObservation>;
  /** Stop and delete everything billable; resolves only once the backend confirms. */
  terminate(instance: ProvisionedInstance): Promise<void>;
}

/** The workload is gone without a result (deleted, destroyed or vanished outside the bridge). */
export function lostObservation(message: string, endedAt: string | null = null): ExitObservation {
  return { kind: "lost", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: endedAt, failure: { kind: "lost", message } };
}

/** valid_to passed with the workload still running (at `atMs`). */
export function expiredObservation(atMs: number): ExitObservation {
  return { kind: "expired", exit_code: null, cpu_seconds: null, peak_memory_mib: null, ended_at: new Date(atMs).toISOString(), failure: null };
}

/** Optional lifecycle hooks a backend may add; the Fleet calls them when present. */
export interface BackendHooks {
  /**
   * Called at start (before grants resume) and then about every minute, with the request_ids of
   * every non-terminal grant: stop what this backend holds for anything else (orphans). A backend
   * may skip calls that come sooner than its own reconcile interval, except the first.
   * `asOfMs`: when `live` was read (taken before the query was sent). With other replicas sharing
   * what a backend holds, something started since may be a grant another replica accepted after
   * that read: it is no orphan by `live`, and is left for the next pass.
   */
  reconcile?(live: ReadonlySet<string>, asOfMs?: number): Promise<void>;
  /** Extra per-backend status for the card (e.g. machines that are down). */
  status?(): Record<string, unknown>;
  /** Counters for metrics, tests and benchmarks (not on the card: they change with every poll). */
  stats?(): Record<string, unknown>;
  /**
   * `compute-bridge doctor`: check credentials and reachability with read-only calls; never
   * provisions anything. One entry per thing checked.
   */
  check?(): Promise<CheckResult[]>;
  close?(): Promise<void>;
}

export type ManagedBackend = Backend & BackendHooks;

export interface CheckResult {
  check: string;
  ok: boolean;
  detail: string;
}

export interface BackendContext {
  providerId: string;
  stateDir: string;
  /** Directory of the config file: relative paths in the backend's section resolve against it. */
  configDir: string;
  log: Logger;
  clock: Clock;
  /** Converts a grant's valid_to tick to wall time. */
  almanac: Almanac;
  /** Offerings that recently reported no capacity; consult it when picking a shape. */
  unavailable: OfferingCache;
  /** Prometheus hooks (API calls, retries, throttles, SSH sessions, orphans); absent in some tests. */
  metrics?: BackendMetrics;
  /**
   * The bridge's image URL policy (file roots, allowed address ranges). A backend that fetches on
   * the bridge's own host enforces it again at fetch time, on every connection and redirect.
   */
  imagePolicy?: ImagePolicy;
}

/** What backends report for /metrics; every method is cheap and safe on a hot path. */
export interface BackendMetrics {
  /** One cloud/host API call: `code` is "ok" or the error code (e.g. InsufficientInstanceCapacity, 429). */
  apiCall(backend: string, operation: string, code: string): void;
  retry(backend: string, operation: string): void;
  throttled(backend: string, operation: string): void;
  sshSession(backend: string, machine: string, up: boolean): void;
  orphanSwept(backend: string, kind: string): void;
}

// ---- typed errors: they drive failover and retries ------------------------------------------

export type ErrorKind =
  | "capacity"
  | "quota"
  | "credential"
  | "not_found"
  | "transient"
  | "image_verification"
  | "invalid_request"
  | "backend";

export class BackendError extends Error {
  readonly kind: ErrorKind = "backend";
  constructor(
    message: string,
    readonly backend?: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = new.target.name;
  }

  /** The shape that failed (e.g. an instance type); the Fleet remembers it as unavailable. */
  offering?: { region: string; shape: string };
  withOffering(region: string, shape: string): this {
    this.offering = { region, shape };
    return this;
  }
}
/** No capacity for this shape here right now: the Fleet fails over to the next backend. */
export class CapacityError extends BackendError {
  override readonly kind = "capacity";
}
/** An account limit; like capacity for failover, but worth an operator's attention. */
export class QuotaError extends BackendError {
  override readonly kind = "quota";
}
/** Credentials missing, expired or refused. */
export class CredentialError extends BackendError {
  override readonly kind = "credential";
}
/** The instance or resource does not exist (terminate treats this as done). */
export class NotFoundError extends BackendError {
  override readonly kind = "not_found";
}
/** Worth retrying (throttling, 5xx, a dropped connection). */
export class TransientError extends BackendError {
  override readonly kind = "transient";
}
/** The image's sha256 did not match: nothing ran. */
export class ImageVerificationError extends BackendError {
  override readonly kind = "image_verification";
}
/** The grant or envelope cannot run on this backend as given (e.g. a disk image on local). */
export class InvalidRequestError extends BackendError {
  override readonly kind = "invalid_request";
}

export function errorKind(e: unknown): ErrorKind {
  return e instanceof BackendError ? e.kind : "backend";
}

/** Errors after which the Fleet may try another backend. */
export function isFailoverable(e: unknown): boolean {
  return e instanceof CapacityError || e instanceof QuotaError;
}
