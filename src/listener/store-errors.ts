import { pgStoreFault } from "../store/errors.js";

/**
 * What a failed store write means for the caller. The listener answers 507 when the disk (or
 * SQLite's database, or PostgreSQL's disk) is full, 503 with Retry-After for any other store I/O failure (an I/O error,
 * a read-only or locked database, a writer that stopped), and never 500 for either: nothing was
 * acknowledged, and the market may retry.
 */
export interface StoreFault {
  status: 503 | 507;
  error: "insufficient_storage" | "unavailable";
  message: string;
}

const FULL_CODES = new Set(["SQLITE_FULL", "ENOSPC", "EDQUOT"]);
const UNAVAILABLE_CODES = /^(SQLITE_(IOERR|READONLY|BUSY|LOCKED|CANTOPEN|PROTOCOL|NOLFS)(_[A-Z_]+)?|EIO|EROFS|EMFILE|ENFILE)$/;

// better-sqlite3's SqliteError carries `code`; an error that crossed from the writer thread
// carries only its name and SQLite's own message (sqlite3_errstr), so those are recognized too.
const FULL_MESSAGES = ["database or disk is full"];
const UNAVAILABLE_MESSAGES = ["disk I/O error", "attempt to write a readonly database", "database is locked", "database table is locked", "unable to open database file"];
/** The store's own messages once its writer thread has stopped (src/store/store.ts). */
const WRITER_GONE = /^(state database writer failed|state database is closed|the writer thread exited)/;

/** Classify an error from a store write, or null if it is not one (a bug: 500). */
export function classifyStoreError(e: unknown): StoreFault | null {
  if (!(e instanceof Error)) return null;
  const code = (e as { code?: unknown }).code;
  const msg = e.message;
  const pg = pgStoreFault(e);
  const full = (typeof code === "string" && FULL_CODES.has(code)) || (e.name === "SqliteError" && FULL_MESSAGES.some((m) => msg.includes(m))) || pg === "full";
  if (full) return { status: 507, error: "insufficient_storage", message: "the bridge's state database cannot be written: no space left; nothing was stored" };
  const unavailable =
    (typeof code === "string" && UNAVAILABLE_CODES.test(code)) || (e.name === "SqliteError" && UNAVAILABLE_MESSAGES.some((m) => msg.includes(m))) || WRITER_GONE.test(msg) || pg === "unavailable";
  if (unavailable) return { status: 503, error: "unavailable", message: "the bridge's state database cannot be written right now; nothing was stored, retry later" };
  return null;
}

/** Seconds a client should wait before retrying after a 503 for a store fault. */
export const STORE_RETRY_AFTER_SECONDS = 5;
