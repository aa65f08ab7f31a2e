import { existsSync, readdirSync, rmSync, statSync } from "node:fs";
import path from "node:path";

/** The file an operator creates in state_dir to start on a new, empty database deliberately. */
export const ALLOW_NEW_DATABASE = "allow-new-database";

export class LostDatabaseError extends Error {
  override name = "LostDatabaseError";
}

function size(file: string): number | null {
  try {
    return statSync(file).size;
  } catch {
    return null;
  }
}

/**
 * What in `stateDir`, and in the local backend's run directories (`localRunsDir`: its runs_dir,
 * maybe outside state_dir), shows that a bridge ran there before (empty when nothing does).
 */
export function previousUse(stateDir: string, localRunsDir: string, o: { identity?: boolean } = {}): string[] {
  const found: string[] = [];
  if ((o.identity ?? true) && existsSync(path.join(stateDir, "identity.key"))) found.push("identity.key");
  if ((size(path.join(stateDir, "compute-log.jsonl")) ?? 0) > 0) found.push("compute-log.jsonl");
  if (existsSync(path.join(stateDir, "bridge.db-wal"))) found.push("bridge.db-wal");
  let runs = 0;
  try {
    runs = readdirSync(localRunsDir).length;
  } catch {
    /* none */
  }
  if (runs > 0) found.push(`${runs} local run director${runs === 1 ? "y" : "ies"} (${localRunsDir})`);
  return found;
}

/**
 * Refuse to start on a state_dir that was used before but whose database is missing or empty (a
 * bad restore, the wrong volume): a new empty database would forget every grant, and reconcile would
 * take the workloads still running for them for orphans. Throws LostDatabaseError with what was
 * found and the way out (docs/operations.md, "Lost database").
 *
 * Returns a function to call once the new database exists: with the operator's ALLOW_NEW_DATABASE
 * file present the start goes ahead, and that call removes the file (it allows one start only).
 */
export function assertDatabaseNotLost(stateDir: string, localRunsDir: string): () => void {
  const db = path.join(stateDir, "bridge.db");
  const dbSize = size(db);
  // A SQLite database starts with a 100-byte header: anything shorter is no database.
  if (dbSize !== null && dbSize >= 100) return () => {};
  const used = previousUse(stateDir, localRunsDir);
  if (used.length === 0) return () => {};
  const ack = path.join(stateDir, ALLOW_NEW_DATABASE);
  if (existsSync(ack)) return () => rmSync(ack, { force: true });
  throw new LostDatabaseError(
    `state_dir ${stateDir} was used before (${used.join(", ")}) but its database bridge.db is ${dbSize === null ? "missing" : dbSize === 0 ? "empty (0 bytes)" : `only ${dbSize} bytes (no SQLite database)`}. ` +
      `Not starting: a new database would forget every grant, and workloads still running for them would be taken for orphans. ` +
      `Restore bridge.db (with bridge.db-wal if the backup has one) from a backup into ${stateDir} while the bridge is stopped, then start it again; ` +
      `or, to start over on this state_dir deliberately (keeping its identity key), stop or account for the workloads its run directories name and create the file ${ack} (it allows one start). ` +
      `See docs/operations.md, "Lost database".`,
  );
}

/**
 * The same guard for a PostgreSQL store (called by PostgresStore.open when the database has no
 * compute-bridge schema yet, before creating it): a state_dir that shows earlier use next to an
 * empty database means the URL names the wrong database, a restore that did not happen, or a
 * switch from SQLite whose grants stay behind in bridge.db. Returns the function to call once the
 * schema exists (it consumes ALLOW_NEW_DATABASE).
 */
export function assertPgDatabaseNotLost(stateDir: string, localRunsDir: string): () => void {
  // identity.key alone shows no grants here: the provider's key is copied into every replica's
  // state_dir before its first start, the first replica on a new database included.
  const used = previousUse(stateDir, localRunsDir, { identity: false });
  if (existsSync(path.join(stateDir, "bridge.db"))) used.push("bridge.db (a SQLite state database)");
  if (used.length === 0) return () => {};
  const ack = path.join(stateDir, ALLOW_NEW_DATABASE);
  if (existsSync(ack)) return () => rmSync(ack, { force: true });
  throw new LostDatabaseError(
    `state_dir ${stateDir} was used before (${used.join(", ")}) but the PostgreSQL database of [store] has no compute-bridge schema (a new, empty database). ` +
      `Not starting: it would forget every grant, and workloads still running for them would be taken for orphans. ` +
      `Check that store.url names the right database, or restore it; moving from SQLite to PostgreSQL does not carry bridge.db's grants over (let them finish first). ` +
      `To start on the empty database deliberately, create the file ${ack} (it allows one start). See docs/operations.md, "Lost database".`,
  );
}
