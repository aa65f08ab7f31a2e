/**
 * How a failed store write is recognised, for whoever maps it (the listener's 503/507, the
 * manager's retry with backoff). Works on errors from better-sqlite3 (SqliteError: `code` such as
 * "SQLITE_FULL", "SQLITE_IOERR_WRITE"), from node:fs (`code` "ENOSPC", "EIO", ...) and on the errors
 * the SQLite store hands back from its writer thread (name, message and code carried over),
 * including "state database writer failed: ..." once the writer died; and on the PostgreSQL
 * engine's (pg): a SQLSTATE in `code` (53100 disk full; classes 08 connection, 53 resources,
 * 57P0x shutdown, 58 system I/O; 25006 a read-only standby after a failover; 40001/40P01
 * serialization and deadlock, which a retry resolves), a socket error, or pg's own messages for a
 * connection that ended or could not be made.
 */

const FULL_CODES = new Set(["SQLITE_FULL", "ENOSPC", "EDQUOT", "53100"]);
const FULL_MESSAGE = /database or disk is full|no space left on device|disk quota exceeded|ENOSPC|SQLITE_FULL/i;
const UNAVAILABLE_MESSAGE = /disk I\/O error|SQLITE_IOERR|EIO\b|database is locked|SQLITE_BUSY|unable to open database file|readonly database|read-only file system|EROFS|state database (?:is closed|writer failed)/i;
/** PostgreSQL SQLSTATEs of a database that cannot take the write now (see above). */
const PG_UNAVAILABLE = /^(08[0-9A-Z]{3}|53[0-9A-Z]{3}|57P0[1-4]|58[0-9A-Z]{3}|25006|40001|40P01)$/;
const NET_CODES = new Set(["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "EHOSTUNREACH", "ENETUNREACH", "EAI_AGAIN", "ENOTFOUND"]);
/** pg's messages for a connection that ended or could not be made (they carry no code). */
const PG_CONNECTION_MESSAGE = /^(Connection terminated|timeout exceeded when trying to connect|Client has encountered a connection error|Cannot use a pool after calling end|Client was closed and is not queryable|Query read timeout)/;

function codeOf(e: unknown): string {
  const c = (e as { code?: unknown } | null)?.code;
  return typeof c === "string" ? c : "";
}

function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : typeof e === "string" ? e : "";
}

/** The disk (or quota) holding the state directory is full: HTTP 507, retry after space is freed. */
export function isStorageFull(e: unknown): boolean {
  for (let x: unknown = e, depth = 0; x && depth < 4; x = (x as { cause?: unknown }).cause, depth++) {
    if (FULL_CODES.has(codeOf(x)) || FULL_MESSAGE.test(messageOf(x))) return true;
  }
  return false;
}

/**
 * The store cannot take writes right now, for any storage reason (full, I/O error, locked,
 * read-only, writer gone): HTTP 503 with Retry-After unless isStorageFull. Not for constraint
 * violations or bugs (those are not the storage's fault and retrying does not help).
 */
export function isStoreUnavailable(e: unknown): boolean {
  if (isStorageFull(e)) return true;
  for (let x: unknown = e, depth = 0; x && depth < 4; x = (x as { cause?: unknown }).cause, depth++) {
    const code = codeOf(x);
    if (/^SQLITE_(IOERR|BUSY|LOCKED|CANTOPEN|READONLY|PROTOCOL)/.test(code) || ["EIO", "EROFS", "EMFILE", "ENFILE"].includes(code) || UNAVAILABLE_MESSAGE.test(messageOf(x))) return true;
    if (PG_UNAVAILABLE.test(code) || NET_CODES.has(code) || PG_CONNECTION_MESSAGE.test(messageOf(x))) return true;
  }
  return false;
}

/** The PostgreSQL engine's storage faults alone (listener/store-errors.ts adds them to its own). */
export function pgStoreFault(e: unknown): "full" | "unavailable" | null {
  for (let x: unknown = e, depth = 0; x && depth < 4; x = (x as { cause?: unknown }).cause, depth++) {
    const code = codeOf(x);
    if (code === "53100") return "full";
    if (PG_UNAVAILABLE.test(code) || NET_CODES.has(code) || PG_CONNECTION_MESSAGE.test(messageOf(x))) return "unavailable";
  }
  return null;
}
