import { z } from "zod";
import { canonicalJson, sha256Hex } from "../util/canonical-json.js";
import { NonceHex, RequestId } from "./grant.js";

/**
 * The attestation evidence of a grant, as the bridge stores and serves it
 * (`GET /v1/grants/{id}/attestation`). The bridge relays what the hardware produced inside the
 * guest and never a verdict of its own: a requester checks it offline
 * (`compute-bridge verify-evidence`, docs/operations.md), against the nonce they chose.
 */

const Base64 = z.string().max(512 * 1024).regex(/^[A-Za-z0-9+/]*={0,2}$/, "must be base64");

export const EvidencePlatform = z.enum(["gcp", "azure", "baremetal"]);
export type EvidencePlatform = z.infer<typeof EvidencePlatform>;

/**
 * tdx-quote-v4: blobs.td_quote is a TDX quote v4 whose REPORTDATA is the binding (GCP C3, bare-metal TDs).
 * azure-tdx-vtpm: the paravisor owns REPORTDATA; blobs hcl_report (vTPM NV index 0x01400001, its
 *   user data the binding), td_quote (a TDX quote v4 over the HCL report's TD report), tpm_quote
 *   (TPMS_ATTEST whose qualifying data is the binding's first 32 bytes) and tpm_signature (the raw
 *   RSA signature over it by the attestation key the HCL report carries). src/attestation/azure.ts.
 */
export const EvidenceFormat = z.enum(["tdx-quote-v4", "azure-tdx-vtpm"]);
export type EvidenceFormat = z.infer<typeof EvidenceFormat>;

export const EvidenceBinding = z.strictObject({
  scheme: z.literal("compute-bridge/attestation/v1"),
  request_id: RequestId,
  /** The host key fingerprint the guest reported and bound, or null when it had none. */
  host_key_sha256: z.string().nullable(),
  /** SHA-512 of the binding's encoding, hex (128 digits): REPORTDATA / TPM qualifying data. */
  digest: z.string().regex(/^[0-9a-f]{128}$/),
});
export type EvidenceBinding = z.infer<typeof EvidenceBinding>;

const Present = z.strictObject({
  status: z.literal("present"),
  platform: EvidencePlatform,
  format: EvidenceFormat,
  nonce: NonceHex,
  binding: EvidenceBinding,
  blobs: z.partialRecord(z.enum(["td_quote", "hcl_report", "tpm_quote", "tpm_signature"]), Base64),
});
const Absent = z.strictObject({
  status: z.literal("absent"),
  /** null when no instance was provisioned. */
  platform: EvidencePlatform.nullable(),
  /** null for a grant that asked for no TDX and sent no nonce. */
  nonce: NonceHex.nullable(),
  /** Why there is none (e.g. the guest kernel has no configfs-tsm). */
  reason: z.string().max(500),
});

/** What a backend collected from the guest (stored on the instance, ProvisionedInstance.attestation). */
export const CollectedEvidence = z.discriminatedUnion("status", [Present, Absent]);
export type CollectedEvidence = z.infer<typeof CollectedEvidence>;

/** requester: the envelope's attestation_nonce; bridge: a random one the bridge chose and recorded. */
const NonceSource = z.enum(["requester", "bridge"]).nullable();

/** The evidence as served and digested into the ComputeLog. */
export const AttestationEvidence = z.discriminatedUnion("status", [Present.extend({ nonce_source: NonceSource }), Absent.extend({ nonce_source: NonceSource })]);
export type AttestationEvidence = z.infer<typeof AttestationEvidence>;
/**
 * The evidence's bytes as served: canonical JSON (keys sorted, no whitespace). The ComputeLog
 * carries their SHA-256 (evidenceDigest), so the signed log pins the exact evidence.
 */
export function evidenceJson(e: AttestationEvidence): string {
  return canonicalJson(e);
}
export function evidenceDigest(e: AttestationEvidence): string {
  return sha256Hex(evidenceJson(e));
}
