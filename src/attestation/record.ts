/**
 * A grant's attestation evidence as served (GET /v1/grants/{id}/attestation) and digested into its
 * ComputeLog: what the backend collected from the guest, or why there is none. One function for
 * both, so the log's attestation_sha256 is the SHA-256 of exactly the bytes the API serves.
 */
import { evidenceDigest, type AttestationEvidence, type CollectedEvidence } from "../domain/attestation.js";
import type { GrantRecord } from "../store/schema.js";
import { absentEvidence } from "./guest.js";

export function grantEvidence(rec: GrantRecord): AttestationEvidence {
  const nonce = rec.attestation_nonce ?? rec.envelope.attestation_nonce ?? null;
  const collected = rec.instance?.attestation;
  let e: CollectedEvidence;
  if (collected && typeof collected === "object") e = collected;
  else if (!rec.grant.tdx_required) e = absentEvidence(null, nonce, "the grant did not require TDX: no attestation evidence is collected");
  else if (!rec.instance) e = absentEvidence(null, nonce, "no instance has been provisioned for this grant");
  else e = absentEvidence(null, nonce, `backend ${rec.instance.backend} collected no attestation evidence for this instance`);
  const source = e.nonce === null ? null : e.nonce === rec.envelope.attestation_nonce ? "requester" : "bridge";
  return { ...e, nonce_source: source };
}

/** Whether the grant's ComputeLog carries attestation_sha256: TDX grants and grants that sent a nonce. */
export function logsEvidence(rec: GrantRecord): boolean {
  return rec.grant.tdx_required || rec.envelope.attestation_nonce !== undefined;
}

export function grantEvidenceDigest(rec: GrantRecord): string {
  return evidenceDigest(grantEvidence(rec));
}
