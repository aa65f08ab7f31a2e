import { createHash } from "node:crypto";

/**
 * Deterministic Azure resource names for compute-bridge. Everything is a pure function of the
 * provider id and the grant's request_id, so a retried or restarted provision() finds (and never
 * duplicates) the public IP, NIC, VM and OS disk an earlier call created.
 *
 *   cb-<p6>-<slug>-<h16>[-nic|-pip|-osdisk]
 *
 * p6   6 hex of sha256(provider id): which bridge owns the resource (disks created implicitly by
 *      a VM carry no tags, so the sweep recognises them by name);
 * slug up to 24 characters of the request id, lowercased, [a-z0-9-] only (for operators);
 * h16  16 hex (64 bits) of sha256(provider id, request id): the identity of the request. Request
 *      ids may contain `.`, `_` and upper case, and differ only there: the hash keeps them apart.
 *
 * The longest VM name is 3 + 6 + 1 + 24 + 1 + 16 = 51 characters (Linux VM and computer names:
 * at most 64), the longest other name 58 (NICs, public IPs and disks: at most 80).
 */

/** Tag holding the exact provider id (bridge id) that owns a resource. */
export const TAG_PROVIDER = "compute-bridge-provider";
/** Tag holding the exact request id. */
export const TAG_REQUEST = "compute-bridge-request-id";
/** Tag holding the creation time (ISO 8601), for the orphan sweep's grace period. */
export const TAG_CREATED = "compute-bridge-created";

const SLUG_MAX = 24;

function sha256Hex(...parts: string[]): string {
  const h = createHash("sha256");
  for (const p of parts) h.update(`${p.length}:${p}\n`);
  return h.digest("hex");
}

export interface AzureNames {
  /** Name shared by every resource of the request; also the VM name and its computer name. */
  base: string;
  vm: string;
  nic: string;
  pip: string;
  osDisk: string;
  /** h16: the request's hash. */
  hash: string;
}

export type ResourceRole = "vm" | "nic" | "pip" | "osdisk";

export interface AzureNaming {
  providerHash: string;
  requestHash(requestId: string): string;
  names(requestId: string): AzureNames;
  /** For a name of this bridge's scheme: the request hash and the resource's role; else null. */
  parse(name: string): { hash: string; role: ResourceRole } | null;
}

export function slugOf(requestId: string): string {
  return requestId
    .toLowerCase()
    .replace(/[^a-z0-9-]+/g, "-")
    .replace(/-{2,}/g, "-")
    .slice(0, SLUG_MAX)
    .replace(/^-+|-+$/g, "");
}

export function azureNaming(providerId: string): AzureNaming {
  const providerHash = sha256Hex("compute-bridge/azure/provider", providerId).slice(0, 6);
  const requestHash = (requestId: string) => sha256Hex("compute-bridge/azure/request", providerId, requestId).slice(0, 16);
  const pattern = new RegExp(`^cb-${providerHash}-(?:[a-z0-9-]*-)?([0-9a-f]{16})(?:-(nic|pip|osdisk))?$`, "i");
  return {
    providerHash,
    requestHash,
    names(requestId) {
      const hash = requestHash(requestId);
      const slug = slugOf(requestId);
      const base = `cb-${providerHash}-${slug ? `${slug}-` : ""}${hash}`;
      return { base, vm: base, nic: `${base}-nic`, pip: `${base}-pip`, osDisk: `${base}-osdisk`, hash };
    },
    parse(name) {
      const m = pattern.exec(name);
      if (!m) return null;
      return { hash: m[1]!.toLowerCase(), role: (m[2]?.toLowerCase() as ResourceRole | undefined) ?? "vm" };
    },
  };
}

/** The resource group and name in an ARM resource id, or null. */
export function parseResourceId(id: string | undefined | null): { resourceGroup: string; type: string; name: string } | null {
  if (!id) return null;
  const m = /^\/subscriptions\/[^/]+\/resourceGroups\/([^/]+)\/providers\/[^/]+\/([^/]+)\/([^/]+)/i.exec(id);
  return m ? { resourceGroup: m[1]!, type: m[2]!, name: m[3]! } : null;
}
