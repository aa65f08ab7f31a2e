import { z } from "zod";
import { AttestationEvidence } from "../domain/attestation.js";
import { ComputeLog, Decline, GrantState, ProviderCard, RequestId } from "../domain/index.js";

// The wire shapes of the listener's answers, as zod schemas: the routes declare them beside their
// handlers, and /openapi.json is generated from them (z.toJSONSchema).

export const IdParams = z.strictObject({ id: RequestId });

export const ListQuery = z.strictObject({
  state: GrantState.optional(),
  limit: z.coerce.number().int().min(1).max(1000).default(100),
  after: z.coerce.number().int().min(0).default(0),
});

export const ErrorBody = z
  .object({
    error: z.string().describe("machine-readable code: invalid_request, unauthorized, not_found, conflict, no_backend, not_terminal, body_too_large, unsupported_media_type, insufficient_storage, unavailable, shutting_down, internal"),
    message: z.string().describe("what was wrong, for people"),
  })
  .meta({ id: "Error" });

export const ValidationErrorBody = ErrorBody.extend({
  issues: z.array(z.object({ path: z.string().describe("the field, e.g. grant.cpu_millicores"), message: z.string() })),
}).meta({ id: "ValidationError" });

export const GrantInstance = z.object({
  instance_id: z.string(),
  host: z.string().nullable(),
  ssh_port: z.number().int().nullable(),
  ssh_user: z.string().nullable(),
  host_key_sha256: z.string().nullable().describe("the SSH host key fingerprint the machine reported (SHA256:...), null where unknown"),
  attestation: z.enum(["present", "absent"]).optional().describe("whether the guest's attestation evidence was collected (TDX grants); the evidence is at GET /v1/grants/{id}/attestation"),
});

export const GrantView = z
  .object({
    request_id: RequestId,
    state: GrantState,
    backend: z.string().nullable(),
    instance: GrantInstance.nullable(),
    private_key: z
      .string()
      .optional()
      .describe("OpenSSH private key the bridge generated for this grant (no ssh_public_key in the envelope); only in GET /v1/grants/{id}, and only once the instance has an SSH host"),
    error: z.object({ kind: z.string(), message: z.string() }).nullable(),
    attempts: z.array(z.unknown()),
    cancel_requested: z.boolean(),
    queue: z
      .object({ queued_at: z.string(), position: z.number().int().positive() })
      .optional()
      .describe("only in GET /v1/grants/{id}, while the accepted grant waits for a provisioning slot of its backend (state provisioning)"),
    cost: z
      .object({ amount: z.number().nonnegative(), currency: z.string(), final: z.boolean() })
      .optional()
      .describe("only in GET /v1/grants/{id}, when the grant has a price: price x billed time so far (final false), or what it cost once ended"),
    created_at: z.string(),
    updated_at: z.string(),
  })
  .meta({ id: "Grant" });

export const Accepted = z.object({ request_id: RequestId, state: GrantState, backend: z.string().nullable() }).meta({ id: "Accepted" });
export const GrantList = z.object({ grants: z.array(GrantView), next_after: z.number().int().nullable().describe("pass as `after` for the next page; null on the last") });
export const Declined = ErrorBody.extend({ declines: z.array(Decline) }).meta({ id: "Declined" });
export const Conflict = ErrorBody.extend({ request_id: RequestId });
export const NotTerminal = ErrorBody.extend({ state: GrantState });
export const Health = z.object({ status: z.literal("ok") });
export const Readiness = z.object({ status: z.enum(["ready", "not_ready"]), reason: z.string().optional() });
export const Card = ProviderCard.meta({ id: "ProviderCard" });
export const Log = ComputeLog.meta({ id: "ComputeLog" });
export const Evidence = AttestationEvidence.meta({ id: "AttestationEvidence" });
