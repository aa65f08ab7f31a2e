import {
  BackendError,
  CapacityError,
  CredentialError,
  NotFoundError,
  QuotaError,
  TransientError,
} from "../backend.js";
import { UnfitError } from "../cloud/adapter.js";
import { redactCredentials } from "../../util/redact.js";

/**
 * GCE refused the insert for where it was placed, not for what it asks (HTTP 400): the machine
 * type is not offered in this zone, or the zone does not offer Intel TDX. Another zone may take
 * it; when none does, the grant fails over (a CapacityError, so the Fleet moves on).
 */
export class PlacementError extends CapacityError {}

/**
 * The image cannot run the grant anywhere (a TDX grant on an image without the TDX_CAPABLE guest
 * OS feature): no zone or machine type helps; the grant fails over with the reason.
 */
export class ImageUnfitError extends UnfitError {}

const ZONE_PLACEMENT = /does not exist in zone|(?:is )?not (?:available|supported|offered) in (?:the )?zone|zone [^ ]+ does not (?:support|offer)/i;
const IMAGE_UNFIT = /TDX_CAPABLE|guest ?os ?features?/i;

/**
 * A 400 from instances.insert that is about placement (zone offers neither the machine type nor
 * TDX) or about the image's guest OS features, as PlacementError / ImageUnfitError; anything
 * else unchanged. GCE's exact wording is not documented: matched loosely, on the safe side (an
 * unrecognised 400 stays a plain BackendError and ends the grant with GCE's message).
 */
export function classifyInsertRefusal(err: BackendError, backend: string): BackendError {
  if (err.constructor !== BackendError || !/\(HTTP 400\b/.test(err.message)) return err;
  if (IMAGE_UNFIT.test(err.message)) return new ImageUnfitError(err.message, backend);
  if (ZONE_PLACEMENT.test(err.message)) return new PlacementError(err.message, backend);
  return err;
}

/** GCE answered 409 alreadyExists: the deterministic name is taken (by an earlier call of ours). */
export class AlreadyExistsError extends BackendError {}

/**
 * GCE answered 403 without a rate or quota reason ("Required 'compute.instances.getSerialPortOutput'
 * permission for ..."): the credentials work but lack this one IAM permission, so the same call
 * fails the same way until an operator changes the role. Still a CredentialError for every caller
 * that only cares about the kind; callers that can do without the call tell it apart.
 */
export class PermissionDeniedError extends CredentialError {}

const NETWORK_CODES = new Set(["ECONNRESET", "ECONNREFUSED", "ETIMEDOUT", "EPIPE", "EAI_AGAIN", "ENETUNREACH", "EHOSTUNREACH", "ECONNABORTED", "UND_ERR_SOCKET", "UND_ERR_CONNECT_TIMEOUT"]);
const RATE_REASONS = new Set(["rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED"]);
const QUOTA_REASONS = new Set(["quotaExceeded", "QUOTA_EXCEEDED"]);

/**
 * Strip anything token-like from text that came back from an HTTP exchange before it reaches an
 * error message or a log line, and bound its length.
 */
export function redact(text: string, max = 400): string {
  return redactCredentials(text, max);
}

interface ParsedHttpError {
  status: number | undefined;
  reason: string | undefined;
  infoReason: string | undefined;
  message: string;
}

/**
 * What the 6.x client throws for a non-2xx answer: a GaxiosError whose `status` is the HTTP status
 * and whose `message` is the raw response body (JSON from GCE). Never look at `config` (it holds
 * the Authorization header).
 */
function parseHttpError(e: unknown): ParsedHttpError {
  const o = (typeof e === "object" && e !== null ? e : {}) as { status?: unknown; code?: unknown; message?: unknown; response?: { status?: unknown } };
  const num = (v: unknown) => (typeof v === "number" && v >= 100 && v < 600 ? v : undefined);
  const status = num(o.status) ?? num(o.response?.status) ?? num(o.code);
  const raw = typeof o.message === "string" ? o.message : String(e);
  let reason: string | undefined;
  let infoReason: string | undefined;
  let message = raw;
  try {
    const body = JSON.parse(raw) as {
      error?: string | { message?: string; errors?: { reason?: string; message?: string }[]; details?: { "@type"?: string; reason?: string }[] };
      error_description?: string;
    };
    if (typeof body.error === "string") {
      // OAuth token endpoint: {"error": "invalid_grant", "error_description": "..."}
      reason = body.error;
      message = body.error_description ?? body.error;
    } else if (body.error) {
      reason = body.error.errors?.[0]?.reason;
      infoReason = body.error.details?.find((d) => d["@type"]?.endsWith("google.rpc.ErrorInfo"))?.reason;
      message = body.error.message ?? body.error.errors?.[0]?.message ?? raw;
    }
  } catch {
    /* not JSON: keep the text */
  }
  return { status, reason, infoReason, message: redact(message) };
}

function isTokenEndpointError(e: unknown): boolean {
  const o = e as { config?: { url?: unknown } } | null;
  const url = o && typeof o === "object" ? o.config?.url : undefined;
  const s = url instanceof URL ? url.href : typeof url === "string" ? url : "";
  return /oauth2\.googleapis\.com|\/token(\?|$)|accounts\.google\.com|metadata\.google\.internal|iamcredentials\.googleapis\.com/.test(s);
}

/**
 * Map anything a Compute call threw to one of the backend's typed errors, with a message that
 * names the call and GCE's reason and carries no credential. The original error is deliberately
 * not attached as `cause`: a GaxiosError holds the request config with the bearer token.
 */
export function mapGcpError(e: unknown, what: string, backend: string): BackendError {
  if (e instanceof BackendError) return e;
  const code = (e as { code?: unknown } | null)?.code;
  if (typeof code === "string" && NETWORK_CODES.has(code))
    return new TransientError(`GCP ${what}: network error ${code}`, backend);
  const { status, reason, infoReason, message } = parseHttpError(e);
  const why = [status !== undefined ? `HTTP ${status}` : null, reason].filter(Boolean).join(" ");
  const text = `GCP ${what} failed${why ? ` (${why})` : ""}: ${message}`;
  const tokenProblem = /^(invalid_grant|invalid_client|unauthorized_client|access_denied|invalid_scope)\b/.exec(message)?.[1];
  if (isTokenEndpointError(e) || tokenProblem || (reason && /^(invalid_grant|invalid_client|unauthorized_client|access_denied)$/.test(reason))) {
    if (status !== undefined && (status === 429 || status >= 500))
      return new TransientError(`GCP token endpoint unavailable (HTTP ${status}) while authorising ${what}`, backend);
    return new CredentialError(`GCP rejected the service account when fetching an access token (${reason ?? tokenProblem ?? `HTTP ${status ?? "?"}`}): ${message}; check backends.gcp.credentials_file (the key may be disabled or deleted)`, backend);
  }
  if (status === undefined) {
    if (/DECODER routines|asymmetric key|PEM|private key|No key or keyFile set|Could not load the default credentials|Could not refresh access token/i.test(message))
      return new CredentialError(`GCP credentials could not be used for ${what}: ${message}; check backends.gcp.credentials_file`, backend);
    if (/socket hang up|network|fetch failed|timed? ?out/i.test(message)) return new TransientError(text, backend);
    return new BackendError(text, backend);
  }
  if (status === 401)
    return new CredentialError(`GCP refused the credentials for ${what} (HTTP 401 ${reason ?? "unauthenticated"}); check backends.gcp.credentials_file`, backend);
  if (status === 403 || status === 429) {
    if ((reason && RATE_REASONS.has(reason)) || (infoReason && RATE_REASONS.has(infoReason)) || status === 429) return new TransientError(text, backend);
    if ((reason && QUOTA_REASONS.has(reason)) || (infoReason && QUOTA_REASONS.has(infoReason))) return new QuotaError(text, backend);
    return new PermissionDeniedError(`GCP denied ${what} (HTTP 403 ${reason ?? "forbidden"}): ${message}; grant the service account in backends.gcp.credentials_file the Compute Instance Admin role on the project`, backend);
  }
  if (status === 404) return new NotFoundError(text, backend);
  if (status === 409 && reason === "alreadyExists") return new AlreadyExistsError(text, backend);
  if (status === 408 || status === 500 || status === 502 || status === 503 || status === 504) return new TransientError(text, backend);
  if (status === 400 && reason === "resourceNotReady") return new TransientError(text, backend);
  return new BackendError(text, backend);
}

export interface OperationErrorLike {
  errors?: { code?: string | null; message?: string | null; errorDetails?: { errorInfo?: { reason?: string | null } | null }[] | null }[] | null;
}

const CAPACITY_CODES = /RESOURCE_POOL_EXHAUSTED|ZONE_RESOURCE_POOL_EXHAUSTED|STOCKOUT|RESOURCE_NOT_AVAILABLE|UNSUPPORTED_OPERATION_ZONE_UNAVAILABLE/;

/**
 * A DONE operation that carries `error`: GCE reports stock-outs and quota this way (the insert
 * call itself succeeded). Capacity and quota become CapacityError / QuotaError (failover).
 */
export function operationError(err: OperationErrorLike, what: string, backend: string): BackendError {
  const list = err.errors ?? [];
  const codes = list.map((x) => x.code ?? "UNKNOWN");
  const text = `GCP ${what} failed: ${list.map((x) => `${x.code ?? "UNKNOWN"}: ${redact(x.message ?? "", 300)}`).join("; ") || "unknown operation error"}`;
  const capacity = list.some((x) => CAPACITY_CODES.test(x.code ?? "") || (x.errorDetails ?? []).some((d) => d.errorInfo?.reason === "RESOURCE_AVAILABILITY"));
  if (capacity) return new CapacityError(text, backend);
  if (codes.some((c) => /QUOTA_EXCEEDED/.test(c))) return new QuotaError(text, backend);
  return new BackendError(text, backend);
}
