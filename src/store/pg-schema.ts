import type pg from "pg";
import { SCHEMA_VERSION } from "./schema.js";

// The PostgreSQL engine's schema: the same tables, columns and indexes as SQLite's (schema.ts),
// migration for migration, so that a schema version means the same thing on both engines
// (test/store/store.test.ts checks both lists are as long). SQLite records its version in
// PRAGMA user_version, PostgreSQL in the one-row table cb_schema.
//
// Types follow what the shared row mapping (schema.ts toRecord) expects: timestamps stay ISO-8601
// text (compared as text, as on SQLite), flags stay integers 0/1, and bigint columns (seq, outbox
// ids and times in ms) are read as JavaScript numbers (postgres.ts sets the type parser).

export const PG_MIGRATIONS: string[] = [
  `CREATE TABLE grants (
     seq BIGSERIAL PRIMARY KEY,
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
     id BIGSERIAL PRIMARY KEY,
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
     created_at TEXT NOT NULL,
     seq BIGSERIAL
   );
   CREATE TABLE outbox (
     id BIGSERIAL PRIMARY KEY,
     kind TEXT NOT NULL,
     key TEXT NOT NULL,
     payload TEXT NOT NULL,
     attempts INTEGER NOT NULL DEFAULT 0,
     next_attempt_at BIGINT NOT NULL,
     last_error TEXT,
     UNIQUE (kind, key)
   );`,
  `CREATE INDEX compute_logs_jsonl_pending ON compute_logs(jsonl_pending) WHERE jsonl_pending = 1;`,
  `ALTER TABLE grants ADD COLUMN routed_backend TEXT;`,
  `ALTER TABLE grants ADD COLUMN placement TEXT;`,
  `ALTER TABLE grants ADD COLUMN price_per_hour DOUBLE PRECISION;
   ALTER TABLE grants ADD COLUMN cost DOUBLE PRECISION;
   CREATE INDEX grants_created ON grants(created_at);`,
  `ALTER TABLE grants ADD COLUMN attestation_nonce TEXT;`,
  `ALTER TABLE grants ADD COLUMN lease_owner TEXT;
   ALTER TABLE grants ADD COLUMN lease_token BIGINT NOT NULL DEFAULT 0;
   ALTER TABLE grants ADD COLUMN lease_expires_at BIGINT NOT NULL DEFAULT 0;
   ALTER TABLE grants ADD COLUMN ledger_seq BIGINT NOT NULL DEFAULT 0;
   CREATE SEQUENCE grants_ledger_seq;
   CREATE INDEX grants_ledger ON grants(ledger_seq);
   CREATE INDEX grants_open_leases ON grants(lease_expires_at, seq) WHERE state IN ('accepted','provisioning','running','terminating');
   CREATE TABLE roles (name TEXT PRIMARY KEY, owner TEXT NOT NULL, token BIGINT NOT NULL, expires_at BIGINT NOT NULL);
   CREATE TABLE provider_identity (one INTEGER PRIMARY KEY CHECK (one = 1), public_key TEXT NOT NULL);`,
];

/** Any constant: the advisory lock that serializes migrations between replicas starting together. */
const MIGRATION_LOCK = 0x6362_0019;

/** The schema version the database is at (0: no compute-bridge schema yet). */
export async function pgSchemaVersion(q: pg.ClientBase | pg.Pool): Promise<number> {
  const t = await q.query<{ t: string | null }>("SELECT to_regclass('cb_schema')::text AS t");
  if (t.rows[0]?.t == null) return 0;
  const r = await q.query<{ version: number }>("SELECT version FROM cb_schema");
  return r.rows[0]?.version ?? 0;
}

/**
 * Bring the database to SCHEMA_VERSION, in one transaction under an advisory lock (replicas that
 * start together migrate once); refuse a database newer than this build. `onNewDatabase` is called
 * before the schema is first created.
 */
export async function pgMigrate(pool: pg.Pool, onNewDatabase?: () => void): Promise<void> {
  if (PG_MIGRATIONS.length !== SCHEMA_VERSION) throw new Error(`internal: ${PG_MIGRATIONS.length} PostgreSQL migrations for schema version ${SCHEMA_VERSION}`);
  const c = await pool.connect();
  const ignore = () => undefined; // a broken connection's "error" event: the failing query reports it
  c.on("error", ignore);
  try {
    await c.query("BEGIN");
    await c.query("SELECT pg_advisory_xact_lock($1)", [MIGRATION_LOCK]);
    const current = await pgSchemaVersion(c);
    if (current > SCHEMA_VERSION) throw new Error(`state database schema version ${current} is newer than this build understands (${SCHEMA_VERSION}); refusing to downgrade`);
    // Up to date: no DDL at all (the bridge's role then needs no CREATE privilege).
    if (current < SCHEMA_VERSION) {
      // A database without the schema: the caller may refuse it (it throws, and nothing is created).
      if (current === 0) onNewDatabase?.();
      await c.query("CREATE TABLE IF NOT EXISTS cb_schema (one INTEGER PRIMARY KEY DEFAULT 1 CHECK (one = 1), version INTEGER NOT NULL)");
      await c.query("INSERT INTO cb_schema (one, version) VALUES (1, 0) ON CONFLICT (one) DO NOTHING");
      for (let v = current; v < SCHEMA_VERSION; v++) await c.query(PG_MIGRATIONS[v]!);
      await c.query("UPDATE cb_schema SET version = $1", [SCHEMA_VERSION]);
    }
    await c.query("COMMIT");
  } catch (e) {
    await c.query("ROLLBACK").catch(() => undefined);
    throw e;
  } finally {
    c.release();
  }
}
