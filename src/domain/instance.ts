import { z } from "zod";
import { CollectedEvidence } from "./attestation.js";
import { RequestId, Region } from "./grant.js";

/** An SSH host key fingerprint as `ssh-keygen -lf` prints it: "SHA256:" and 43 base64 characters. */
export const HOST_KEY_FINGERPRINT = /^SHA256:[A-Za-z0-9+/]{43}$/;

/**
 * What a backend hands back from provision(). It is persisted verbatim, so a restarted daemon
 * can watch or terminate the same instance: backend-specific handles go in `details`.
 */
export const ProvisionedInstance = z.strictObject({
  request_id: RequestId,
  backend: z.string(),
  instance_id: z.string().min(1).max(256),
  region: Region,
  host: z.string().nullable(),
  ssh_port: z.number().int().min(1).max(65535).nullable(),
  ssh_user: z.string().nullable(),
  host_key_sha256: z.string().nullable(),
  started_at: z.string(),
  /** Allocated shape, used for ComputeLog usage (allocated millicores x seconds). */
  cpu_millicores: z.number().int().positive(),
  ram_mib: z.number().int().positive(),
  details: z.record(z.string(), z.string()),
  /** Attestation evidence the backend collected from the guest (TDX grants), or why there is none. */
  attestation: CollectedEvidence.nullable().optional(),
});
export type ProvisionedInstance = z.infer<typeof ProvisionedInstance>;

/** How a watch ended, as seen by the backend. */
export const ExitObservation = z.strictObject({
  /** exited: the workload ended on its own; expired: valid_to passed; lost: the instance vanished. */
  kind: z.enum(["exited", "expired", "lost"]),
  exit_code: z.number().int().nullable(),
  /** Measured CPU seconds where the backend can read them. */
  cpu_seconds: z.number().nonnegative().nullable(),
  peak_memory_mib: z.number().nonnegative().nullable(),
  /** When the workload ended (ISO), where known. */
  ended_at: z.string().nullable(),
  /** A failure the guest/supervisor reported (e.g. the image hash did not match): the grant fails. */
  failure: z.strictObject({ kind: z.string(), message: z.string() }).nullable(),
});
export type ExitObservation = z.infer<typeof ExitObservation>;
