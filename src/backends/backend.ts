import type { Almanac, Capabilities, ComputeGrant, DeclineCode, Envelope, ExitObservation, ProvisionedInstance } from "../domain/index.js";
import type { Logger } from "../util/logger.js";
import type { Clock } from "../util/clock.js";
import type { OfferingCache } from "./offering-cache.js";
import type { ImagePolicy } from "../util/image-policy.js";

export type Satisfaction = { ok: true } | { ok: false; code: DeclineCode; message: string };

/**
 * The whole contract between the Fleet and a place that runs workloads. Six members; a new
 * backend is one file implementing them, a config section, and one line in registry.ts.
 *
 * Every method must be idempotent per request_id so a restarted daemon can simply call it again:
 * provision() adopts an instance its earlier call created (client token / deterministic name),
 * watchUntilExit() re-attaches, terminate() on something already gone returns normally.
 */
export interface Backend {
  readonly name: string;
  /** Declared capacity, from config: no cloud calls. */
  capabilities(): Capabilities;
  /** Fast, local decision (no I/O): can this backend take the grant right now? */
  canSatisfy(grant: ComputeGrant): Satisfaction;
  /** Create (or adopt) the instance, fetch + verify the image, and wait until it is reachable. */
  provision(grant: ComputeGrant, envelope: Envelope, signal: AbortSignal): Promise<ProvisionedInstance>;
  /** Resolve when the workload ends or `validTo` passes; reject with an AbortError on `signal`. */
  watchUntilExit(instance: ProvisionedInstance, validTo: Date, signal: AbortSignal): Promise<ExitObservation>;
  /** Stop and delete everything billable; resolves only once the backend confirms. */
  terminate(instance: ProvisionedInstance): Promise<void>;
}

/** Optional lifecycle hooks a backend may add; the Fleet calls them when present. */
export interface BackendHooks {
  /**
   * Called at start (before grants resume) and then about every minute, with the request_ids of
   * every non-terminal grant: stop what this backend holds for anything else (orphans). A backend
   * may skip calls that come sooner than its own reconcile interval, except the first.
   */
  reconcile?(live: ReadonlySet<string>): Promise<void>;
  /** Extra per-backend status for the card (e.g. machines that are down). */
  status?(): Record<string, unknown>;
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
