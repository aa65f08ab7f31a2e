import { grantEvidenceDigest, logsEvidence } from "../attestation/record.js";
import type { ComputeLog, ExitReason, UnsignedComputeLog } from "../domain/index.js";
import { BILLING, costOf, type BillingRule } from "../fleet/pricing.js";
import type { GrantRecord, Outcome } from "../store/store.js";
import type { Identity } from "../util/identity.js";

const REASON: Record<Outcome["state"], ExitReason> = {
  completed: "exited",
  failed: "failed",
  expired: "expired",
  cancelled: "cancelled",
};

/**
 * The signed usage record of one grant. CPU and RAM are billed as allocated (millicores x wall
 * seconds); cpu_seconds is what the backend measured, where it can. Anything but a workload that
 * ran to its own end is `partial`. Its cost is the price it was admitted at times the running time
 * billed by the backend's rule (fleet/pricing.ts), null without a price.
 */
export function buildComputeLog(
  providerId: string,
  rec: GrantRecord,
  outcome: Outcome,
  nowMs: number,
  identity: Identity,
  billing: { rule: BillingRule; currency: string } = { rule: BILLING.local, currency: "USD" },
): ComputeLog {
  const inst = rec.instance;
  const startedMs = inst ? Date.parse(inst.started_at) : null;
  // The end comes from the backend's clock, the start from the bridge's: a workload that exits at
  // once can read as ending a millisecond before it started. A log never says so.
  const endedMs = Math.max(startedMs ?? Number.NEGATIVE_INFINITY, outcome.ended_at ? Date.parse(outcome.ended_at) : nowMs);
  const wall = startedMs !== null ? (endedMs - startedMs) / 1000 : 0;
  const round = (n: number) => Math.round(n * 1000) / 1000;
  const unsigned: UnsignedComputeLog = {
    request_id: rec.request_id,
    provider_id: providerId,
    backend: rec.backend,
    instance_id: inst?.instance_id ?? null,
    started_at: inst?.started_at ?? null,
    ended_at: new Date(endedMs).toISOString(),
    exit_reason: REASON[outcome.state],
    exit_code: outcome.exit_code,
    partial: outcome.state !== "completed",
    error_kind: outcome.error_kind,
    usage: {
      wall_seconds: round(wall),
      cpu_seconds: outcome.cpu_seconds === null ? null : round(outcome.cpu_seconds),
      cpu_millicore_seconds: round((inst?.cpu_millicores ?? 0) * wall),
      ram_mib_seconds: round((inst?.ram_mib ?? 0) * wall),
      // An instance that existed is billed at least one increment (or the backend's minimum).
      cost: rec.price_per_hour === null ? null : inst ? costOf(rec.price_per_hour, Math.max(wall, 1e-3), billing.rule) : 0,
      currency: billing.currency,
    },
    ...(logsEvidence(rec) ? { attestation_sha256: grantEvidenceDigest(rec) } : {}),
  };
  return { ...unsigned, signature: identity.signDoc(unsigned) };
}
