import type Database from "better-sqlite3";
import { grantRequestDigest } from "../domain/grant.js";
import { canTransition } from "../domain/grant-record.js";
import { flushJsonl, type NewGrant, type Row } from "./schema.js";

// The single writer of the state database. It runs on its own thread (writer-thread.ts): the
// main thread sends batches of write operations and reads through its own connection. All values
// arrive as plain data; timestamps come from the main thread's clock, so tests that inject a clock
// see it in the database too.

/** Grant columns a transition may change, already serialized; nothing else reaches the SQL. */
export interface ColumnChanges {
  backend?: string | null;
  placement?: string | null;
  price_per_hour?: number | null;
  cost?: number | null;
  instance_json?: string | null;
  error_kind?: string | null;
  error_message?: string | null;
  attempts_json?: string;
  outcome_json?: string | null;
}
export const CHANGEABLE: readonly (keyof ColumnChanges)[] = ["backend", "placement", "price_per_hour", "cost", "instance_json", "error_kind", "error_message", "attempts_json", "outcome_json"];

export type WriteOp =
  | { op: "accept"; row: NewGrant; now: string }
  | { op: "transition"; id: string; to: string; changes: ColumnChanges; note: string | null; now: string }
  | { op: "finish"; id: string; to: string; changes: ColumnChanges; note: string; log_json: string; publish_at: number | null; now: string }
  | { op: "cancel"; id: string; now: string }
  | { op: "enqueue"; kind: "card" | "log"; key: string; payload: string; next_attempt_at: number }
  | { op: "ack"; id: number; payload: string }
  | { op: "retry"; id: number; next_attempt_at: number; error: string };

export type AcceptOutcome = { status: "created"; seq: number; body_digest: string } | { status: "duplicate" | "conflict"; row: Row };

/** A grant after a transition, and the state and backend it left (the store keeps counts of both). */
export interface Transitioned {
  row: Row;
  from_state: string;
  from_backend: string | null;
}

export type WriteResult = { ok: true; value: unknown } | { ok: false; error: { name: string; message: string; code?: string } };

/** Messages between the Store (main thread) and writer-thread.ts. */
export type ToWriter = { type: "batch"; id: number; ops: WriteOp[] } | { type: "close" };
/** One answer per commit, for every batch it took (`ms`: the commit with its fsync). */
export type FromWriter = { type: "done"; batches: { id: number; results: WriteResult[] }[]; ms: number };

export interface BatchResult {
  results: WriteResult[];
  /** Time spent in the transaction. */
  ms: number;
  /** A ComputeLog was written: once the commit is on disk, appendLogs() adds it to the jsonl file. */
  finished: boolean;
}

export class Writer {
  private readonly tx: <T>(fn: () => T) => T;
  private readonly st;
  private readonly updates = new Map<string, Database.Statement>();

  constructor(
    private readonly db: Database.Database,
    private readonly jsonlPath: string,
  ) {
    this.tx = db.transaction((fn: () => unknown) => fn()) as <T>(fn: () => T) => T;
    this.st = {
      get: db.prepare("SELECT * FROM grants WHERE request_id = ?"),
      // A request_id seen before inserts nothing (changes = 0): one statement for the common case.
      insert: db.prepare(
        `INSERT INTO grants (request_id, body_digest, grant_json, envelope_json, state, backend, routed_backend, placement, price_per_hour, private_key, public_key, created_at, updated_at, attestation_nonce)
         VALUES (?, ?, ?, ?, 'provisioning', ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (request_id) DO NOTHING`,
      ),
      transition: db.prepare("INSERT INTO transitions (request_id, from_state, to_state, backend, note, at) VALUES (?, ?, ?, ?, ?, ?)"),
      computeLog: db.prepare("INSERT OR REPLACE INTO compute_logs (request_id, log_json, jsonl_pending, created_at) VALUES (?, ?, 1, ?)"),
      cancel: db.prepare("UPDATE grants SET cancel_requested = 1, updated_at = ? WHERE request_id = ?"),
      enqueue: db.prepare(
        `INSERT INTO outbox (kind, key, payload, attempts, next_attempt_at) VALUES (?, ?, ?, 0, ?)
         ON CONFLICT (kind, key) DO UPDATE SET payload = excluded.payload, attempts = 0, next_attempt_at = excluded.next_attempt_at, last_error = NULL`,
      ),
      // Only delete the version that was sent: a newer card enqueued meanwhile stays.
      ack: db.prepare("DELETE FROM outbox WHERE id = ? AND payload = ?"),
      retry: db.prepare("UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE id = ?"),
    };
  }

  /**
   * Apply a batch in one transaction. Should an operation fail, the batch runs again with each
   * operation in its own savepoint, so that only the failing one fails (the first pass skips the
   * savepoints: operations almost never fail). A failure of the transaction itself fails every
   * operation. The caller makes the commit durable (fsync of the WAL) before answering anyone.
   */
  apply(ops: WriteOp[]): BatchResult {
    const t0 = performance.now();
    try {
      const results = this.tx(() => ops.map((op): WriteResult => ({ ok: true, value: this.one(op) })));
      return { results, ms: performance.now() - t0, finished: ops.some((op) => op.op === "finish") };
    } catch {
      // Rolled back whole; isolate the failure below.
    }
    const results: WriteResult[] = [];
    let finished = false;
    try {
      this.tx(() => {
        for (const op of ops) {
          try {
            results.push({ ok: true, value: this.tx(() => this.one(op)) });
            if (op.op === "finish") finished = true;
          } catch (e) {
            results.push({ ok: false, error: errorData(e) });
          }
        }
      });
    } catch (e) {
      const error = errorData(e);
      return { results: ops.map(() => ({ ok: false, error })), ms: performance.now() - t0, finished: false };
    }
    return { results, ms: performance.now() - t0, finished };
  }

  /**
   * Append committed ComputeLogs not yet in compute-log.jsonl. Called only after the commits that
   * wrote them are on disk, so the file never holds a log the database could lose.
   */
  appendLogs(): void {
    flushJsonl(this.db, this.jsonlPath);
  }

  private one(op: WriteOp): unknown {
    switch (op.op) {
      case "accept":
        return this.accept(op.row, op.now);
      case "transition":
        return this.transition(op.id, op.to, op.changes, op.note, op.now);
      case "finish": {
        const done = this.transition(op.id, op.to, op.changes, op.note, op.now);
        this.st.computeLog.run(op.id, op.log_json, op.now);
        if (op.publish_at !== null) this.st.enqueue.run("log", op.id, op.log_json, op.publish_at);
        return done;
      }
      case "cancel":
        this.st.cancel.run(op.now, op.id);
        return (this.st.get.get(op.id) as Row | undefined) ?? null;
      case "enqueue":
        this.st.enqueue.run(op.kind, op.key, op.payload, op.next_attempt_at);
        return null;
      case "ack":
        this.st.ack.run(op.id, op.payload);
        return null;
      case "retry":
        this.st.retry.run(op.next_attempt_at, op.error.slice(0, 500), op.id);
        return null;
    }
  }

  /** The grant and envelope arrive as plain JSON data: digested and serialized here, off the event loop. */
  private accept(g: NewGrant, now: string): AcceptOutcome {
    // Accepted and routed in one commit: the first durable state already names the backend, and
    // the backend's idempotency key derives from request_id, so provisioning may start at once.
    // The grants row is the record of this first transition: the audit table (transitions) starts
    // with the next one, which saves every accept a row and an index entry (a fifth of the
    // writer's work per accept); Store.transitions() shows the accept from the grants row.
    const body_digest = grantRequestDigest({ grant: g.grant, envelope: g.envelope });
    const info = this.st.insert.run(g.request_id, body_digest, JSON.stringify(g.grant), JSON.stringify(g.envelope), g.backend, g.backend, g.placement ?? null, g.price_per_hour ?? null, g.private_key, g.public_key, now, now, g.attestation_nonce ?? null);
    if (info.changes === 0) {
      const row = this.st.get.get(g.request_id) as Row;
      return { status: row.body_digest === body_digest ? "duplicate" : "conflict", row };
    }
    return { status: "created", seq: Number(info.lastInsertRowid), body_digest };
  }

  private transition(id: string, to: string, changes: ColumnChanges, note: string | null, now: string): Transitioned {
    const row = this.st.get.get(id) as Row | undefined;
    if (!row) throw new Error(`unknown grant ${id}`);
    if (!canTransition(row.state, to)) throw new Error(`grant ${id}: ${row.state} -> ${to} is not an allowed transition`);
    const cols = CHANGEABLE.filter((c) => changes[c] !== undefined);
    const sql = `UPDATE grants SET state = @state, updated_at = @now${cols.map((c) => `, ${c} = @${c}`).join("")} WHERE request_id = @request_id`;
    let update = this.updates.get(sql);
    if (!update) this.updates.set(sql, (update = this.db.prepare(sql)));
    const params: Record<string, unknown> = { request_id: id, state: to, now };
    for (const c of cols) params[c] = changes[c];
    update.run(params);
    this.st.transition.run(id, row.state, to, changes.backend ?? row.backend, note, now);
    return { row: this.st.get.get(id) as Row, from_state: row.state, from_backend: row.backend };
  }
}

function errorData(e: unknown): { name: string; message: string; code?: string } {
  if (!(e instanceof Error)) return { name: "Error", message: String(e) };
  const code = (e as { code?: unknown }).code;
  return typeof code === "string" ? { name: e.name, message: e.message, code } : { name: e.name, message: e.message };
}
