import { createHash } from "node:crypto";

/**
 * Deterministic GCE names for compute-bridge resources. Everything here is a pure function of the
 * provider id and the grant's request_id, so a restarted daemon finds (and never duplicates) what
 * an earlier call created.
 */

/** GCE resource names: `[a-z]([-a-z0-9]{0,61}[a-z0-9])?`. */
export const GCE_NAME = /^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$/;
/** GCE label values: `[a-z0-9_-]{0,63}`. */
export const GCE_LABEL_VALUE = /^[a-z0-9_-]{0,63}$/;

/** Metadata keys (exact values; labels only hold hashes). */
export const META_REQUEST_ID = "compute-bridge-request-id";
export const META_PROVIDER_ID = "compute-bridge-provider-id";

function sha256(...parts: string[]): Buffer {
  const h = createHash("sha256");
  for (const p of parts) h.update(`${p.length}:${p}\n`);
  return h.digest();
}

/** `us-central1-a` -> `us-central1`. */
export function regionOfZone(zone: string): string {
  return zone.replace(/-[a-z]$/, "");
}

/** The last path segment of a GCE URL or partial URL (`.../zones/us-central1-a` -> `us-central1-a`). */
export function lastSegment(s: string | null | undefined): string {
  if (!s) return "";
  const i = s.lastIndexOf("/");
  return i >= 0 ? s.slice(i + 1) : s;
}

/**
 * A version-5-style UUID from sha256 of the parts: valid for GCE's `requestId` (a UUID that is
 * never the zero UUID: the version and variant bits guarantee that).
 */
export function deterministicUuid(...parts: string[]): string {
  const b = sha256("compute-bridge/gce-request-id", ...parts).subarray(0, 16);
  b[6] = (b[6]! & 0x0f) | 0x50;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = b.toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

export interface GceNaming {
  /** Label key holding the bridge's (hashed) provider id. */
  bridgeKey: string;
  /** Label value for this bridge. */
  bridgeValue: string;
  /** Label key holding the (hashed) request id. */
  requestKey: string;
  /** Label value for a request id (lowercase hex: label-safe whatever the request id is). */
  requestValue(requestId: string): string;
  /** Deterministic instance name for a request id. */
  instanceName(requestId: string): string;
  /** Filter expression selecting every instance of this bridge (optionally one request). */
  filter(requestId?: string): string;
}

/**
 * Names derived from `label_prefix` and the provider id. Request ids may contain upper case, `.`
 * and `_`, none of which GCE names or label values allow: both use a 96-bit hash of
 * (provider id, request id); the exact request id travels in instance metadata.
 */
export function gceNaming(labelPrefix: string, providerId: string): GceNaming {
  const namePrefix = labelPrefix.replace(/_/g, "-").replace(/-+$/, "") || "cb";
  const bridgeValue = sha256("bridge", providerId).toString("hex").slice(0, 24);
  const requestValue = (requestId: string) => sha256("request", providerId, requestId).toString("hex").slice(0, 24);
  const bridgeKey = `${labelPrefix}-bridge`;
  const requestKey = `${labelPrefix}-rid`;
  return {
    bridgeKey,
    bridgeValue,
    requestKey,
    requestValue,
    // prefix (<= 31) + "-" + 24 hex = at most 56 characters, ends in [a-z0-9]
    instanceName: (requestId) => `${namePrefix}-${requestValue(requestId)}`,
    filter: (requestId) =>
      requestId === undefined
        ? `labels.${bridgeKey} = "${bridgeValue}"`
        : `(labels.${bridgeKey} = "${bridgeValue}") AND (labels.${requestKey} = "${requestValue(requestId)}")`,
  };
}
