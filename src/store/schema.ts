import Database from "better-sqlite3";
import { appendFileSync, closeSync, fsyncSync, openSync } from "node:fs";
import type { ComputeGrant, Envelope, GrantState, ProvisionedInstance } from "../domain/index.js";
import type { GrantChanges, Transition } from "./store.js";
import type { ColumnChanges } from "./writer.js";

// The state database's schema (SQLite) and the row mapping every engine shares: the reading side
// (sqlite.ts, main thread), the single writer (writer.ts, in its own thread) and the PostgreSQL
// engine (postgres.ts, whose own migrations are in pg-schema.ts).

/** What a grant will end as once its instance is terminated: recorded before terminating. */
export interface Outcome {
  state: "completed" | "failed" | "expired" | "cancelled";
  exit_code: number | null;
  cpu_seconds: number | null;
  ended_at: string | null;
  error_kind: string | null;
  error_message: string | null;
}

export interface Attempt {
  backend: string;
  error_kind: string;
  message: string;
  at: string;
}

export interface GrantRecord {
  seq: number;
  request_id: string;
  body_digest: string;
  grant: ComputeGrant;
  envelope: Envelope;
  state: GrantState;
  backend: string | null;
  /** Where inside `backend` the grant's capacity is reserved (a bare-metal machine), if anywhere. */
  placement: string | null;
  /** The hourly price it was admitted at on `backend` (null: no price configured). */
  price_per_hour: number | null;
  /** What it cost, once ended (null while open, or without a price). */
  cost: number | null;
  instance: ProvisionedInstance | null;
  private_key: string | null;
  public_key: string | null;
  error_kind: string | null;
  error_message: string | null;
  attempts: Attempt[];
  cancel_requested: boolean;
  outcome: Outcome | null;
  created_at: string;
  updated_at: string;
  /**
   * The nonce a TDX grant's evidence binds: the envelope's attestation_nonce, or a random one the
   * bridge chose at accept (recorded here, never in the envelope). Null for other grants.
   */
  attestation_nonce?: string | null;
  /** The replica whose lease drives the grant (PostgreSQL, several replicas); null when none does. */
  lease_owner?: string | null;
}

/** A grant to accept; its body digest is computed by the writer (grantRequestDigest). */
export interface NewGrant {
  request_id: string;
  grant: ComputeGrant;
  envelope: Envelope;
  backend: string;
  /** Where inside `backend` its capacity is reserved (absent: the backend has one pool). */
  placement?: string | null;
  price_per_hour?: number | null;
  private_key: string | null;
  public_key: string | null;
  /** Filled by Store.accept (GrantRecord.attestation_nonce). */
  attestation_nonce?: string | null;
}

export type AcceptResult = { status: "created"; record: GrantRecord } | { status: "duplicate"; record: GrantRecord } | { status: "conflict"; record: GrantRecord };

export interface Row {
  seq: number;
  request_id: string;
  body_digest: string;
  grant_json: string;
  envelope_json: string;
  state: GrantState;
  backend: string | null;
  instance_json: string | null;
  private_key: string | null;
  public_key: string | null;
  error_kind: string | null;
  error_message: string | null;
  attempts_json: string;
  cancel_requested: number;
  outcome_json: string | null;
  created_at: string;
  updated_at: string;
  routed_backend: string | null;
  placement: string | null;
  price_per_hour: number | null;
  cost: number | null;
  attestation_nonce?: string | null;
  lease_owner?: string | null;
  lease_token?: number;
}

/** Forward-only migrations; PRAGMA user_version records how many have run. */
const MIGRATIONS: string[] = [
  `CREATE TABLE grants (
     seq INTEGER PRIMARY KEY AUTOINCREMENT,
     request_id TEXT NOT NULL UNIQUE,
     body_digest TEXT NOT NULL,
     grant_json TEXT NOT NULL,
     envelope_json TEXT NOT NULL,
     state TEXT NOT NULL,
     backend TEXT,
     instance_json TEXT,
     private_key TEXT,
     public_key TEXT,
     error_kind TEXT,
     error_message TEXT,
     attempts_json TEXT NOT NULL DEFAULT '[]',
     cancel_requested INTEGER NOT NULL DEFAULT 0,
     outcome_json TEXT,
     created_at TEXT NOT NULL,
     updated_at TEXT NOT NULL
   );
   CREATE INDEX grants_state ON grants(state, seq);
   CREATE TABLE transitions (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     request_id TEXT NOT NULL,
     from_state TEXT,
     to_state TEXT NOT NULL,
     backend TEXT,
     note TEXT,
     at TEXT NOT NULL
   );
   CREATE INDEX transitions_grant ON transitions(request_id, id);
   CREATE TABLE compute_logs (
     request_id TEXT PRIMARY KEY,
     log_json TEXT NOT NULL,
     jsonl_pending INTEGER NOT NULL DEFAULT 1,
     created_at TEXT NOT NULL
   );
   CREATE TABLE outbox (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     kind TEXT NOT NULL,
     key TEXT NOT NULL,
     payload TEXT NOT NULL,
     attempts INTEGER NOT NULL DEFAULT 0,
     next_attempt_at INTEGER NOT NULL,
     last_error TEXT,
     UNIQUE (kind, key)
   );`,
  // The jsonl flush after every finished grant looks up the few logs not yet appended; without
  // this (partial) index it scanned every ComputeLog ever written.
  `CREATE INDEX compute_logs_jsonl_pending ON compute_logs(jsonl_pending) WHERE jsonl_pending = 1;`,
  // The backend a grant was routed to at accept. `backend` moves on with a failover, or when the
  // routed backend left the config before provisioning; the history's first entry reads this.
  // NULL in rows accepted before it (their history falls back to the first attempt).
  `ALTER TABLE grants ADD COLUMN routed_backend TEXT;`,
  // Capacity is reserved at accept (issue #15): a non-terminal row is its grant's reservation on
  // `backend`, and this is where inside the backend (a bare-metal machine); NULL where the
  // backend has one pool. The ledger is rebuilt from these rows at start.
  `ALTER TABLE grants ADD COLUMN placement TEXT;`,
  // Spend caps (issue #20): the price a grant was admitted at and, once ended, its cost; a budget
  // ledger is rebuilt at start from the grants accepted in the current month.
  `ALTER TABLE grants ADD COLUMN price_per_hour REAL;
   ALTER TABLE grants ADD COLUMN cost REAL;
   CREATE INDEX grants_created ON grants(created_at);`,
  // The nonce a TDX grant's attestation evidence binds: the envelope's attestation_nonce, or the
  // random one the bridge chose at accept.
  `ALTER TABLE grants ADD COLUMN attestation_nonce TEXT;`,
  // Several replicas on one database (issue #19; used by the PostgreSQL engine, kept here so a
  // schema version means the same on both): the replica driving an open grant, its fencing token
  // (raised by every takeover) and when its lease lapses (ms); the order in which changes to the
  // capacity and spend ledgers committed; leased roles (the leader running the singletons); and the
  // provider's public key every replica must sign with.
  `ALTER TABLE grants ADD COLUMN lease_owner TEXT;
   ALTER TABLE grants ADD COLUMN lease_token INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE grants ADD COLUMN lease_expires_at INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE grants ADD COLUMN ledger_seq INTEGER NOT NULL DEFAULT 0;
   CREATE INDEX grants_ledger ON grants(ledger_seq);
   CREATE TABLE roles (name TEXT PRIMARY KEY, owner TEXT NOT NULL, token INTEGER NOT NULL, expires_at INTEGER NOT NULL);
   CREATE TABLE provider_identity (one INTEGER PRIMARY KEY CHECK (one = 1), public_key TEXT NOT NULL);`,
];

export const SCHEMA_VERSION = MIGRATIONS.length;

export interface OutboxItem {
  id: number;
  kind: "card" | "log";
  key: string;
  payload: string;
  attempts: number;
  next_attempt_at: number;
}

/**
 * Open the state database with the pragmas every connection uses. `syncWal: false` is for the
 * writer thread, which fsyncs the WAL itself after each commit (see writer-thread.ts); every other
 * connection has SQLite fsync on each commit (synchronous=FULL).
 */
export function openDatabase(file: string, o: { syncWal?: boolean } = {}): Database.Database {
  const db = new Database(file);
  db.pragma("journal_mode = WAL");
  db.pragma(`synchronous = ${o.syncWal === false ? "NORMAL" : "FULL"}`);
  db.pragma("busy_timeout = 5000");
  return db;
}

export function migrate(db: Database.Database): void {
  const current = db.pragma("user_version", { simple: true }) as number;
  if (current > MIGRATIONS.length)
    throw new Error(`state database schema version ${current} is newer than this build understands (${MIGRATIONS.length}); refusing to downgrade`);
  for (let v = current; v < MIGRATIONS.length; v++) {
    db.transaction(() => {
      db.exec(MIGRATIONS[v]!);
      db.pragma(`user_version = ${v + 1}`);
    })();
  }
}

/**
 * Append committed ComputeLogs not yet in compute-log.jsonl, fsync it, then mark them written
 * (at-least-once across crashes: a crash between the append and the mark repeats the line).
 */
export function flushJsonl(db: Database.Database, jsonlPath: string): number {
  const rows = db.prepare("SELECT request_id, log_json FROM compute_logs WHERE jsonl_pending = 1 ORDER BY rowid").all() as { request_id: string; log_json: string }[];
  if (rows.length === 0) return 0;
  appendFileSync(jsonlPath, rows.map((r) => r.log_json + "\n").join(""), { mode: 0o600 });
  const fd = openSync(jsonlPath, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  const mark = db.prepare("UPDATE compute_logs SET jsonl_pending = 0 WHERE request_id = ?");
  db.transaction(() => rows.forEach((r) => mark.run(r.request_id)))();
  return rows.length;
}

export function toRecord(r: Row): GrantRecord {
  return {
    seq: r.seq,
    request_id: r.request_id,
    body_digest: r.body_digest,
    grant: JSON.parse(r.grant_json) as ComputeGrant,
    envelope: JSON.parse(r.envelope_json) as Envelope,
    state: r.state,
    backend: r.backend,
    placement: r.placement,
    price_per_hour: r.price_per_hour,
    cost: r.cost,
    instance: r.instance_json ? (JSON.parse(r.instance_json) as ProvisionedInstance) : null,
    private_key: r.private_key,
    public_key: r.public_key,
    error_kind: r.error_kind,
    error_message: r.error_message,
    attempts: JSON.parse(r.attempts_json) as Attempt[],
    cancel_requested: r.cancel_requested === 1,
    outcome: r.outcome_json ? (JSON.parse(r.outcome_json) as Outcome) : null,
    created_at: r.created_at,
    updated_at: r.updated_at,
    attestation_nonce: r.attestation_nonce ?? null,
    lease_owner: r.lease_owner ?? null,
  };
}

/** The record of a grant just accepted, built from what was written (no read-back on the accept path). */
export function acceptedRecord(g: NewGrant, w: { seq: number; body_digest: string; now: string; attestation_nonce: string | null }): GrantRecord {
  return {
    seq: w.seq,
    request_id: g.request_id,
    body_digest: w.body_digest,
    grant: g.grant,
    envelope: g.envelope,
    state: "provisioning",
    backend: g.backend,
    placement: g.placement ?? null,
    price_per_hour: g.price_per_hour ?? null,
    cost: null,
    instance: null,
    private_key: g.private_key,
    public_key: g.public_key,
    error_kind: null,
    error_message: null,
    attempts: [],
    cancel_requested: false,
    outcome: null,
    created_at: w.now,
    updated_at: w.now,
    attestation_nonce: w.attestation_nonce,
  };
}

/**
 * A grant's history: its accept (from the grants row, see Writer.accept), then the audit rows of
 * every later transition. Databases written before that change hold an audit row for the accept
 * too; it is shown as it is.
 */
export function historyOf(row: Row, audit: Transition[]): Transition[] {
  if (audit[0]?.from_state === null) return audit;
  // The backend it was routed to, wherever it went since (rows from before routed_backend was
  // recorded: the first backend tried, which is the routed one unless it left the config).
  const rec = toRecord(row);
  const routed = row.routed_backend ?? rec.attempts[0]?.backend ?? rec.backend;
  const accept: Transition = { from_state: null, to_state: "provisioning", backend: routed, note: "accepted and routed; idempotency key derived from request_id", at: rec.created_at };
  return [accept, ...audit];
}

/** The key of Store.countByState(). */
export function countKey(state: string, backend: string | null): string {
  return `${state}|${backend ?? ""}`;
}

/** A transition's changes as the grant columns they set, serialized; nothing else reaches the SQL. */
export function columns(c: GrantChanges): ColumnChanges {
  const out: ColumnChanges = {};
  if (c.backend !== undefined) out.backend = c.backend;
  if (c.placement !== undefined) out.placement = c.placement;
  if (c.price_per_hour !== undefined) out.price_per_hour = c.price_per_hour;
  if (c.instance !== undefined) out.instance_json = c.instance ? JSON.stringify(c.instance) : null;
  if (c.error_kind !== undefined) out.error_kind = c.error_kind;
  if (c.error_message !== undefined) out.error_message = c.error_message;
  if (c.attempts !== undefined) out.attempts_json = JSON.stringify(c.attempts);
  if (c.outcome !== undefined) out.outcome_json = c.outcome ? JSON.stringify(c.outcome) : null;
  return out;
}
