import { closeSync, fdatasyncSync, openSync, writeSync } from "node:fs";
import path from "node:path";
import type { Logger } from "../../util/logger.js";

/** The file in state_dir where every workload stopped without a grant is recorded. */
export const ORPHAN_LOG = "orphans.jsonl";

export interface OrphanRecord {
  backend: string;
  /** The request_id the workload ran for (the bridge has no live grant for it). */
  request_id: string;
  /** Why it counts as an orphan. */
  reason: string;
  /** What is stopped: processes, units, instances, as the backend knows them. */
  stopped: Record<string, unknown>;
}

/**
 * Append one `{"type":"orphan",...}` line to state_dir/orphans.jsonl and fsync it, before the
 * orphan is stopped: a workload the bridge cannot account for is never stopped without a record
 * of what it was. Throws when the record cannot be written; the caller then leaves the workload
 * alone (and tries again at the next reconcile).
 */
export function recordOrphan(stateDir: string, nowMs: number, r: OrphanRecord): void {
  const line = `${JSON.stringify({ type: "orphan", at: new Date(nowMs).toISOString(), ...r })}\n`;
  const fd = openSync(path.join(stateDir, ORPHAN_LOG), "a", 0o600);
  try {
    const buf = Buffer.from(line);
    for (let off = 0; off < buf.length; ) off += writeSync(fd, buf, off);
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * recordOrphan for a reconcile: true once the record is on disk (go ahead and stop the orphan);
 * false, with an error logged, when it could not be written (leave the orphan running for now).
 */
export function tryRecordOrphan(stateDir: string, nowMs: number, r: OrphanRecord, log: Logger): boolean {
  try {
    recordOrphan(stateDir, nowMs, r);
    return true;
  } catch (e) {
    log.error({ request_id: r.request_id, err: e }, `orphaned ${r.backend} workload NOT stopped: its record could not be written to ${ORPHAN_LOG}; trying again at the next reconcile`);
    return false;
  }
}
