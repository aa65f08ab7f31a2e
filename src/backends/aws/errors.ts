/**
 * EC2 error codes and how they map to the typed BackendErrors that drive failover and retries.
 * Messages name the call and region, never a secret.
 */
import type { RetryErrorInfo, RetryStrategyV2, RetryToken, StandardRetryToken } from "@smithy/types";
import { scrubSecrets } from "../../util/logger.js";
import { BackendError, CapacityError, CredentialError, NotFoundError, QuotaError, TransientError } from "../backend.js";

/** No capacity for the shape here: try the next shape, then fail over; remember the offering. */
const CAPACITY_CODES = new Set([
  "InsufficientInstanceCapacity",
  "InsufficientHostCapacity",
  "InsufficientCapacity",
  "InsufficientAddressCapacity",
  "InsufficientFreeAddressesInSubnet",
  "Unsupported",
]);
/** An account limit: no other shape of this account helps; fail over at once (QuotaError). */
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
 * sibling for requests that cannot be served there). Neither heals while the instance lives.
 */
export const LATEST_UNSUPPORTED_CODES = new Set(["UnsupportedOperation", "Unsupported"]);
export const THROTTLE_CODES = new Set(["RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException"]);
const NETWORK_CODES = new Set(["ECONNREFUSED", "ECONNRESET", "EPIPE", "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH", "EAI_AGAIN", "ENOTFOUND", "TimeoutError", "RequestTimeout"]);
/** Codes the SDK would retry (HTTP 500) that only waste time: another try finds no capacity either. */
const NO_SDK_RETRY = new Set([...CAPACITY_CODES, ...LIMIT_CODES]);

interface SdkErrorLike {
  name?: string;
  code?: string;
  message?: string;
  $fault?: string;
  $metadata?: { httpStatusCode?: number; attempts?: number };
}

export function errorCode(e: unknown): string {
  const x = e as SdkErrorLike;
  return x?.name && x.name !== "Error" ? x.name : (x?.code ?? "Error");
}

export function isCredentialCode(code: string): boolean {
  return CREDENTIAL_CODES.has(code);
}

export function clean(s: string): string {
  return scrubSecrets(s).replace(/\s+/g, " ").slice(0, 600);
}

export function errorMessage(e: unknown): string {
  return clean((e as SdkErrorLike)?.message ?? String(e));
}

/**
 * SDK exception -> typed BackendError. `where` names the call ("EC2 RunInstances in us-east-1"),
 * `credentialHint` the config keys to check, `offering` the (region, instance type) a capacity or
 * limit error is about.
 */
export function mapEc2Error(e: unknown, where: string, backend: string, credentialHint: string, offering?: { region: string; type: string }): BackendError {
  if (e instanceof BackendError) return e;
  const code = errorCode(e);
  const msg = errorMessage(e);
  const x = e as SdkErrorLike;
  const status = x?.$metadata?.httpStatusCode;
  const attempts = x?.$metadata?.attempts;
  if (offering && CAPACITY_CODES.has(code))
    return new CapacityError(`${where}: no capacity for ${offering.type} (${code}: ${msg})`, backend, { cause: e }).withOffering(offering.region, offering.type);
  if (LIMIT_CODES.has(code)) {
    const err = new QuotaError(`${where}: an account limit was reached (${code}: ${msg}); raise it in the Service Quotas console`, backend, { cause: e });
    return offering ? err.withOffering(offering.region, offering.type) : err;
  }
  if (CREDENTIAL_CODES.has(code))
    return new CredentialError(
      `${where} was refused (${code}): ${msg} — check ${credentialHint} and the IAM policy (ec2:RunInstances, DescribeInstances, TerminateInstances, GetConsoleOutput, CreateTags; see docs/operations.md)`,
      backend,
      { cause: e },
    );
  if (code === "InvalidInstanceID.NotFound" || code === "InvalidInstanceID.Malformed") return new NotFoundError(`${where}: ${msg}`, backend, { cause: e });
  if (THROTTLE_CODES.has(code) || NETWORK_CODES.has(code) || (status !== undefined && status >= 500) || x?.$fault === "server" || (status === undefined && !x?.$fault))
    return new TransientError(`${where} failed${attempts ? ` after ${attempts} attempt${attempts === 1 ? "" : "s"}` : ""} (${code}): ${msg}`, backend, { cause: e });
  if (/^Invalid(AMIID|SubnetID|Group|KeyPair|Parameter)/.test(code)) return new BackendError(`${where} was rejected (${code}): ${msg} — check the region's section of backends.aws`, backend, { cause: e });
  return new BackendError(`${where} failed (${code}): ${msg}`, backend, { cause: e });
}

/**
 * Refuses the SDK's retries for codes where another attempt is pointless (capacity errors come
 * back as HTTP 500, which the SDK would otherwise retry); everything else goes to `inner`.
 */
export class FailFastRetry implements RetryStrategyV2 {
  constructor(private readonly inner: RetryStrategyV2) {}
  acquireInitialRetryToken(scope: string): Promise<RetryToken> {
    return this.inner.acquireInitialRetryToken(scope);
  }
  refreshRetryTokenForRetry(token: RetryToken, info: RetryErrorInfo): Promise<RetryToken> {
    const name = (info.error as { name?: string } | undefined)?.name;
    if (name !== undefined && NO_SDK_RETRY.has(name)) return Promise.reject(info.error);
    return this.inner.refreshRetryTokenForRetry(token, info);
  }
  recordSuccess(token: RetryToken): void {
    this.inner.recordSuccess(token as StandardRetryToken);
  }
}
