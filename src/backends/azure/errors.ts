import {
  BackendError,
  CapacityError,
  CredentialError,
  NotFoundError,
  QuotaError,
  TransientError,
} from "../backend.js";
import { redactCredentials } from "../../util/redact.js";
import { UnfitError } from "../cloud/adapter.js";

/**
 * Azure errors -> the backend's typed errors. What the SDKs throw (measured against the ARM fake
 * with @azure/arm-compute 24.1.0 / @azure/arm-network 36.0.0, see test/fakes/arm.ts):
 *  - a non-2xx ARM reply: a RestError with `statusCode` and ARM's `code` (`{error:{code,message}}`);
 *  - a long-running operation that ends `Failed`: a plain Error whose message is
 *    "The long-running operation has failed. <code>. <message>" (no `code` property);
 *  - a dropped connection: a RestError with a `code` such as ECONNREFUSED / REQUEST_SEND_ERROR and
 *    no `statusCode`;
 *  - token acquisition (@azure/identity): AuthenticationError / CredentialUnavailableError.
 * Nothing here ever reads the request (it carries the bearer token); the original error is not
 * attached as `cause` for the same reason.
 */

/** No capacity for this size here now: fail over and remember the offering as unavailable. */
const CAPACITY_CODES = new Set([
  "allocationfailed",
  "zonalallocationfailed",
  "overconstrainedallocationrequest",
  "overconstrainedzonalallocationrequest",
  "skunotavailable",
  "allocationfailedvmsizenotavailable",
]);

/** Worth retrying: ARM says so, or it is an operation that collided with another one. */
const TRANSIENT_CODES = new Set([
  "subscriptionrequeststhrottled",
  "toomanyrequests",
  "retryableerror",
  "internalexecutionerror",
  "internaloperationerror",
  "internalservererror",
  "serviceunavailable",
  "gatewaytimeout",
  "anotheroperationinprogress",
  "conflictingoperation",
  "operationpreempted",
  "retryableresourceinuse",
  "nicreservedforanothervm",
  "nicinuse",
  "inuseipaddress",
  "publicipaddresscannotbedeleted",
]);

const NETWORK_CODES = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "ETIMEDOUT",
  "EPIPE",
  "EAI_AGAIN",
  "ENOTFOUND",
  "ENETUNREACH",
  "EHOSTUNREACH",
  "ECONNABORTED",
  "REQUEST_SEND_ERROR",
  "PARSE_ERROR",
]);

/** Bound and scrub text that came back over HTTP before it goes into a message or a log line. */
export function redact(text: string, max = 500): string {
  return redactCredentials(text, max);
}

export interface ArmFailure {
  /** HTTP status, when the failure was an HTTP reply. */
  status: number | undefined;
  /** ARM error code (e.g. AllocationFailed), or a Node network code. */
  code: string | undefined;
  message: string;
  /** A failed long-running operation rather than a rejected request. */
  lro: boolean;
}

const LRO_FAILED = /^The long-running operation has failed\.\s*([A-Za-z][A-Za-z0-9_.]*)\.\s*([\s\S]*)$/;

/** What an SDK error says, without looking at anything that may hold a credential. */
export function describeArmError(e: unknown): ArmFailure {
  const o = (typeof e === "object" && e !== null ? e : {}) as { statusCode?: unknown; code?: unknown; message?: unknown; name?: unknown };
  const raw = typeof o.message === "string" ? o.message : String(e);
  const status = typeof o.statusCode === "number" ? o.statusCode : undefined;
  let code = typeof o.code === "string" && o.code ? o.code : undefined;
  let message = raw;
  let lro = false;
  const m = LRO_FAILED.exec(raw.trim());
  if (m) {
    lro = true;
    code ??= m[1];
    message = m[2]?.trim() || m[1]!;
  }
  return { status, code, message: redact(message), lro };
}

export function isAzureAuthError(e: unknown): boolean {
  const name = (e as { name?: unknown } | null)?.name;
  return name === "AuthenticationError" || name === "CredentialUnavailableError" || name === "AggregateAuthenticationError" || name === "AuthenticationRequiredError";
}

export interface MapContext {
  /** What was being done, e.g. `creating VM cb-... (Standard_D2s_v5 in westeurope)`. */
  what: string;
  backend: string;
  /** The offering (region, VM size) to attach to capacity and quota errors. */
  offering?: { region: string; size: string };
  /** Creating a confidential VM from this configured image ("publisher:offer:sku:version"). */
  confidentialImage?: string;
}

/** Map anything an Azure SDK call threw to a typed BackendError with a message an operator can act on. */
export function mapArmError(e: unknown, ctx: MapContext): BackendError {
  if (e instanceof BackendError) return e;
  const { what, backend } = ctx;
  if (isAzureAuthError(e)) {
    const d = describeArmError(e);
    return new CredentialError(
      `azure: could not get an access token while ${what}: ${d.message}; check backends.azure tenant_id / client_id / client_secret_file (or the VM's managed identity)`,
      backend,
    );
  }
  const f = describeArmError(e);
  const lc = (f.code ?? "").toLowerCase();
  const label = [f.status !== undefined ? `HTTP ${f.status}` : null, f.code].filter(Boolean).join(" ");
  const text = `azure: ${what} failed${label ? ` (${label})` : ""}: ${f.message}`;
  const withOffering = <T extends BackendError>(err: T): T => (ctx.offering ? err.withOffering(ctx.offering.region, ctx.offering.size) : err);

  if (f.status === undefined && f.code && NETWORK_CODES.has(f.code)) return new TransientError(`azure: ${what} failed: network error ${f.code}`, backend);
  if (lc === "invalidresourcereference" && /subnet|same region|location/i.test(f.message))
    return new BackendError(`${text}; a NIC must be in the region of its subnet: check backends.azure subnet_id against the grant's region`, backend);
  if (CAPACITY_CODES.has(lc)) return withOffering(new CapacityError(text, backend));
  if (ctx.confidentialImage && isConfidentialImageRefusal(e))
    return withOffering(
      new ConfidentialImageError(
        `${text}; backends.azure.confidential_image ${ctx.confidentialImage} must be a confidential-VM image (one that supports the ConfidentialVM security type, e.g. Canonical 0001-com-ubuntu-confidential-vm-jammy 22_04-lts-cvm): fix the image in the config`,
        backend,
      ),
    );
  if (isQuota(lc, f.message)) return withOffering(new QuotaError(text, backend));
  if (f.status === 401)
    return new CredentialError(`azure: ARM refused the credentials while ${what} (HTTP 401 ${f.code ?? "Unauthorized"}); check backends.azure tenant_id / client_id / client_secret_file (or the managed identity)`, backend);
  if (f.status === 403) {
    if (lc === "subscriptionrequeststhrottled") return new TransientError(text, backend);
    return new CredentialError(
      `azure: permission denied while ${what} (HTTP 403 ${f.code ?? "Forbidden"}): ${f.message}; the identity needs Virtual Machine Contributor and Network Contributor on the resource group, and join access to the subnet`,
      backend,
    );
  }
  if (f.status === 404 || lc === "resourcenotfound" || lc === "notfound") return new NotFoundError(text, backend);
  if (f.status === 429 || f.status === 408 || (f.status !== undefined && f.status >= 500)) return new TransientError(text, backend);
  if (TRANSIENT_CODES.has(lc)) return new TransientError(text, backend);
  if (f.status === 409 && /being deleted|retry the operation/i.test(f.message)) return new TransientError(text, backend);
  if (f.status === undefined && !f.lro && /socket hang up|network|timed? ?out|aborted by the server/i.test(f.message)) return new TransientError(text, backend);
  return new BackendError(text, backend);
}

function isQuota(code: string, message: string): boolean {
  if (code === "quotaexceeded" || code === "resourcequotaexceeded" || code === "operationnotallowedquota") return true;
  if (/(countlimitreached|limitexceeded)$/.test(code) && code !== "ratelimitexceeded") return true;
  return code === "operationnotallowed" && /quota/i.test(message);
}

/**
 * True when ARM refuses retrieveBootDiagnosticsData because the VM has boot diagnostics turned
 * off: 409 OperationNotAllowed "Boot diagnostics is not enabled for virtual machine '<name>'."
 * (test/fakes/arm.ts models that reply). Nothing but turning them on changes it, so a caller
 * waiting for the serial console stops instead of retrying.
 */
export function isBootDiagnosticsDisabled(e: unknown): boolean {
  const f = describeArmError(e);
  if (f.lro || (f.code ?? "").toLowerCase() !== "operationnotallowed") return false;
  return /boot ?diagnostics/i.test(f.message) && /\b(not|isn't) (been )?(enabled|configured)\b|\bdisabled\b/i.test(f.message);
}

/** True for a 404 (already gone), whatever shape the SDK gave it. */
export function isNotFound(e: unknown): boolean {
  const f = describeArmError(e);
  return f.status === 404 || (f.code ?? "").toLowerCase() === "resourcenotfound";
}

/**
 * ARM refused a confidential VM because its image is not a confidential-VM image: no size of
 * this backend runs the grant until the config names one, so the grant fails over at once.
 */
export class ConfidentialImageError extends UnfitError {}

/**
 * True when ARM refuses a ConfidentialVM create for its image: 400 InvalidParameter "SecurityType
 * 'ConfidentialVM_...' is not supported by given image." on securityProfile.securityType
 * (Azure/azure-cli#22200; the HTTP status is unverified, see test/fakes/FIDELITY.md), or a
 * message that names the image as not supporting confidential VMs.
 */
export function isConfidentialImageRefusal(e: unknown): boolean {
  const f = describeArmError(e);
  const code = (f.code ?? "").toLowerCase();
  if (code !== "invalidparameter" && code !== "badrequest" && code !== "invalidrequestformat") return false;
  return /not supported by (the )?given image/i.test(f.message) || (/image/i.test(f.message) && /confidential/i.test(f.message) && /not supported|does not support|doesn't support/i.test(f.message));
}
