/**
 * A grant's attestation evidence as served (GET /v1/grants/{id}/attestation) and digested into its
 * ComputeLog: what the backend collected from the guest, or why there is none. One function for
 * both, so the log's attestation_sha256 is the SHA-256 of exactly the bytes the API serves.
 */
import type { FastifyInstance } from "fastify";
import { evidenceDigest, evidenceJson, type AttestationEvidence, type CollectedEvidence } from "../domain/attestation.js";
import { RequestId } from "../domain/grant.js";
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

/**
 * GET /v1/grants/{id}/attestation: the evidence as canonical JSON (its SHA-256 is the ComputeLog's
 * attestation_sha256); 400 for a malformed id, 404 for an unknown grant.
 */
export function registerAttestationRoute(app: FastifyInstance, store: { get(id: string): GrantRecord | null }): void {
  app.get("/v1/grants/:id/attestation", async (req, reply) => {
    const id = RequestId.safeParse((req.params as { id?: unknown }).id);
    if (!id.success) {
      const message = id.error.issues[0]?.message ?? "invalid";
      return reply.code(400).send({ error: "invalid_request", message: `request_id: ${message}`, issues: [{ path: "request_id", message }] });
    }
    const rec = store.get(id.data);
    if (!rec) return reply.code(404).send({ error: "not_found", message: `no grant ${id.data}` });
    return reply.type("application/json; charset=utf-8").send(evidenceJson(grantEvidence(rec)));
  });
}
