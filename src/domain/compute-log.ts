import { z } from "zod";
import { RequestId } from "./grant.js";

export const UsageMetrics = z.strictObject({
  wall_seconds: z.number().nonnegative(),
  cpu_seconds: z.number().nonnegative().nullable(),
  cpu_millicore_seconds: z.number().nonnegative(),
  ram_mib_seconds: z.number().nonnegative(),
  /** Price x billed time, by the backend's billing rule (null: no price configured). */
  cost: z.number().nonnegative().nullable(),
  currency: z.string(),
});
export type UsageMetrics = z.infer<typeof UsageMetrics>;

export const ExitReason = z.enum(["exited", "expired", "cancelled", "failed"]);
export type ExitReason = z.infer<typeof ExitReason>;

export const UnsignedComputeLog = z.strictObject({
  request_id: RequestId,
  provider_id: z.string(),
  backend: z.string().nullable(),
  instance_id: z.string().nullable(),
  started_at: z.string().nullable(),
  ended_at: z.string(),
  exit_reason: ExitReason,
  exit_code: z.number().int().nullable(),
  partial: z.boolean(),
  error_kind: z.string().nullable(),
  usage: UsageMetrics,
  /** TDX grants: SHA-256 (hex) of the attestation evidence exactly as GET /v1/grants/{id}/attestation serves it. */
  attestation_sha256: z.string().regex(/^[0-9a-f]{64}$/).optional(),
});
export type UnsignedComputeLog = z.infer<typeof UnsignedComputeLog>;

export const ComputeLog = UnsignedComputeLog.extend({
  /** base64 ed25519 signature over the canonical JSON of every other field. */
  signature: z.string(),
});
export type ComputeLog = z.infer<typeof ComputeLog>;
