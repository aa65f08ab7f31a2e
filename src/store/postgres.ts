import { randomBytes } from "node:crypto";
import { appendFileSync, closeSync, fsyncSync, mkdirSync, openSync } from "node:fs";
import path from "node:path";
import pg from "pg";
import { grantRequestDigest } from "../domain/grant.js";
import { canTransition } from "../domain/grant-record.js";
import type { ComputeLog, GrantState } from "../domain/index.js";
import { isoFormatter, type Clock } from "../util/clock.js";
import { pgStoreFault } from "./errors.js";
import { pgMigrate, pgSchemaVersion } from "./pg-schema.js";
import { acceptedRecord, columns, countKey, historyOf, toRecord, type AcceptResult, type GrantRecord, type NewGrant, type OutboxItem, type Row } from "./schema.js";
import type { GrantChanges, Store, Transition } from "./store.js";
import { CHANGEABLE, type ColumnChanges } from "./writer.js";

const INT8 = 20;
/** bigint columns (seq, outbox ids, times in ms, counts) as numbers: they stay far below 2^53. */
const types = {
  getTypeParser: ((oid: number, format?: "text" | "binary") =>
    oid === INT8 ? (v: string) => Number(v) : pg.types.getTypeParser(oid, format ?? "text")) as typeof pg.types.getTypeParser,
};

export interface PostgresStoreOptions {
  /** postgres://USER:PASSWORD@HOST:PORT/DATABASE (a secret: never logged). */
  url: string;
  /** Where compute-log.jsonl is appended (this replica's copy). */
  stateDir: string;
  clock: Clock;
  /** Connections at most. */
  poolSize?: number;
  /** How long to wait for a connection before a write fails as unavailable. */
  connectTimeoutMs?: number;
  /** Called before the schema is created in an empty database; throw to refuse it (state-check.ts). */
  onNewDatabase?: () => void;
}

/**
 * The PostgreSQL engine: the grant state of every replica of one provider in one database
 * (issue #19).
 *
 * Every write is one transaction (a single autocommit statement where one suffices) and resolves
 * after its COMMIT, which PostgreSQL makes durable (synchronous_commit) before answering; commits
 * arriving together share WAL flushes inside the server, the group commit the SQLite engine does
 * in its writer thread. A transition locks its grant row (SELECT ... FOR UPDATE), checks the
 * state machine (canTransition) and writes the row and its audit entry together.
 *
 * ComputeLogs: each finish commits the log with `jsonl_pending = 1`; then this process appends
 * the pending logs to its state_dir's compute-log.jsonl, fsyncs it and only then marks them written,
 * claiming them with FOR UPDATE SKIP LOCKED so that with several replicas each log lands in one
 * replica's file (at least once: a crash between the append and the mark repeats the line). A log
 * whose append failed stays pending and is appended by the next finish or the next start.
 *
 * A connection that fails (the database restarting, a network cut) fails the writes in flight
 * with errors that errors.ts classifies as unavailable; the pool reconnects for the next ones.
 */
export class PostgresStore implements Store {
  readonly engine = "postgres" as const;
  /** Never resolves: a failed connection is retried by the next write, not fatal. */
  readonly failed: Promise<Error> = new Promise(() => {});
  onWrite?: (op: string, ms: number) => void;

  private readonly counts = new Map<string, number>();
  private readonly jsonlPath: string;
  private closing: Promise<void> | null = null;
  private inFlight = 0;
  private idleWaiters: (() => void)[] = [];
  private flushing: Promise<void> = Promise.resolve();

  private constructor(
    private readonly pool: pg.Pool,
    private readonly clock: Clock,
    stateDir: string,
  ) {
    this.jsonlPath = path.join(stateDir, "compute-log.jsonl");
  }

  /** Connect, migrate (or refuse a newer schema), count, and append logs a crash kept out of the jsonl. */
  static async open(o: PostgresStoreOptions): Promise<PostgresStore> {
    mkdirSync(o.stateDir, { recursive: true, mode: 0o700 });
    const pool = newPool(o.url, o.poolSize ?? 8, o.connectTimeoutMs ?? 10_000);
    const s = new PostgresStore(pool, o.clock, o.stateDir);
    try {
      await pgMigrate(pool, o.onNewDatabase);
      const r = await pool.query<{ state: string; backend: string | null; n: number }>("SELECT state, backend, COUNT(*) AS n FROM grants GROUP BY state, backend");
      for (const row of r.rows) s.counts.set(countKey(row.state, row.backend), row.n);
      await s.flushJsonl();
    } catch (e) {
      await pool.end().catch(() => undefined);
      throw e;
    }
    return s;
  }

  private readonly iso = isoFormatter();
  /** The clock as an ISO timestamp (formatted once per millisecond: every write carries one). */
  private nowIso(): string {
    return this.iso(this.clock.now());
  }

  // ---- plumbing -------------------------------------------------------------------------------

  private fault: string | null = null;

  unavailable(): string | null {
    return this.fault;
  }

  /** Remember whether the database answered (see unavailable()). */
  private async observed<T>(p: Promise<T>): Promise<T> {
    try {
      const v = await p;
      this.fault = null;
      return v;
    } catch (e) {
      // A full disk is answered per write (507), as with SQLite; the bridge stays ready for reads.
      if (pgStoreFault(e) === "unavailable") this.fault = "the state database cannot be reached";
      throw e;
    }
  }

  /** Run one write, counted for close() and timed for metrics. */
  private async write<T>(op: string, fn: () => Promise<T>): Promise<T> {
    if (this.closing) throw new Error("state database is closed");
    this.inFlight++;
    const t0 = performance.now();
    try {
      return await this.observed(fn());
    } finally {
      this.onWrite?.(op, performance.now() - t0);
      if (--this.inFlight === 0) for (const w of this.idleWaiters.splice(0)) w();
    }
  }

  /**
   * `fn` inside BEGIN ... COMMIT on one connection (ROLLBACK on any error). A connection cut before
   * COMMIT was sent leaves nothing behind (the server rolls the transaction back), so the whole
   * transaction runs again on another connection: an idle connection the server closed (a restart,
   * a failover) is only noticed when used. A connection lost during COMMIT is not retried: the
   * commit may have happened, and the caller continues from what the store holds.
   */
  private async tx<T>(fn: (c: pg.PoolClient) => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      let c: pg.PoolClient;
      try {
        c = await this.pool.connect();
      } catch (e) {
        // A new connection cut while it was being set up; a refused one (the server down) fails now.
        if (attempt > this.pool.options.max || !/^Connection terminated/.test((e as Error).message)) throw e;
        continue;
      }
      // A checked-out connection that breaks also emits "error": the failing query reports it.
      const ignore = () => undefined;
      c.on("error", ignore);
      let committing = false;
      try {
        await c.query("BEGIN");
        const out = await fn(c);
        committing = true;
        await c.query("COMMIT");
        c.off("error", ignore);
        c.release();
        return out;
      } catch (e) {
        // A connection whose ROLLBACK fails is not given back to the pool.
        const broken = await c.query("ROLLBACK").then(
          () => false,
          () => true,
        );
        // A broken connection keeps the listener: it may still report its end after this.
        if (!broken) c.off("error", ignore);
        c.release(broken);
        // Every idle connection may have been cut: one more try than the pool holds.
        if (committing || !broken || attempt > this.pool.options.max || pgStoreFault(e) !== "unavailable") throw e;
      }
    }
  }

  private count(state: string, backend: string | null, delta: number): void {
    const k = countKey(state, backend);
    const n = (this.counts.get(k) ?? 0) + delta;
    if (n > 0) this.counts.set(k, n);
    else this.counts.delete(k);
  }

  // ---- writes ---------------------------------------------------------------------------------

  async accept(g: NewGrant): Promise<AcceptResult> {
    const now = this.nowIso();
    const attestation_nonce = g.envelope.attestation_nonce ?? (g.grant.tdx_required ? randomBytes(32).toString("hex") : null);
    const body_digest = grantRequestDigest({ grant: g.grant, envelope: g.envelope });
    return this.write("accept", async () => {
      // Accepted and routed in one statement (see Writer.accept): a request_id seen before inserts nothing.
      const ins = await this.pool.query<{ seq: number }>(
        `INSERT INTO grants (request_id, body_digest, grant_json, envelope_json, state, backend, routed_backend, placement, price_per_hour, private_key, public_key, created_at, updated_at, attestation_nonce)
         VALUES ($1, $2, $3, $4, 'provisioning', $5, $5, $6, $7, $8, $9, $10, $10, $11)
         ON CONFLICT (request_id) DO NOTHING RETURNING seq`,
        [g.request_id, body_digest, JSON.stringify(g.grant), JSON.stringify(g.envelope), g.backend, g.placement ?? null, g.price_per_hour ?? null, g.private_key, g.public_key, now, attestation_nonce],
      );
      const seq = ins.rows[0]?.seq;
      if (seq === undefined) {
        const row = (await this.pool.query<Row>("SELECT * FROM grants WHERE request_id = $1", [g.request_id])).rows[0]!;
        return { status: row.body_digest === body_digest ? "duplicate" : "conflict", record: toRecord(row) };
      }
      this.count("provisioning", g.backend, 1);
      return { status: "created", record: acceptedRecord(g, { seq, body_digest, now, attestation_nonce }) };
    });
  }

  /** Lock the grant's row, check the state machine, update it and write its audit entry. */
  private async move(c: pg.ClientBase, id: string, to: string, changes: ColumnChanges, note: string | null, now: string): Promise<{ row: Row; from: Row }> {
    const from = (await c.query<Row>("SELECT * FROM grants WHERE request_id = $1 FOR UPDATE", [id])).rows[0];
    if (!from) throw new Error(`unknown grant ${id}`);
    if (!canTransition(from.state, to)) throw new Error(`grant ${id}: ${from.state} -> ${to} is not an allowed transition`);
    const cols = CHANGEABLE.filter((k) => changes[k] !== undefined);
    const params: unknown[] = [id, to, now, ...cols.map((k) => changes[k])];
    const row = (await c.query<Row>(`UPDATE grants SET state = $2, updated_at = $3${cols.map((k, i) => `, ${k} = $${i + 4}`).join("")} WHERE request_id = $1 RETURNING *`, params)).rows[0]!;
    await c.query("INSERT INTO transitions (request_id, from_state, to_state, backend, note, at) VALUES ($1, $2, $3, $4, $5, $6)", [id, from.state, to, changes.backend ?? from.backend, note, now]);
    return { row, from };
  }

  private moved(t: { row: Row; from: Row }): GrantRecord {
    this.count(t.from.state, t.from.backend, -1);
    this.count(t.row.state, t.row.backend, 1);
    return toRecord(t.row);
  }

  async transition(id: string, to: GrantState, changes: GrantChanges = {}): Promise<GrantRecord> {
    const now = this.nowIso();
    return this.moved(await this.write("transition", () => this.tx((c) => this.move(c, id, to, columns(changes), changes.note ?? null, now))));
  }

  async finish(id: string, to: GrantState, log: ComputeLog, changes: { error_kind?: string | null; error_message?: string | null } = {}, publish = false): Promise<GrantRecord> {
    const now = this.nowIso();
    const logJson = JSON.stringify(log);
    const publishAt = publish ? this.clock.now() : null;
    const done = await this.write("finish", async () => {
      const t = await this.tx(async (c) => {
        const t = await this.move(c, id, to, { ...columns(changes), cost: log.usage?.cost ?? null }, `exit_reason=${log.exit_reason}`, now);
        await c.query(
          `INSERT INTO compute_logs (request_id, log_json, jsonl_pending, created_at) VALUES ($1, $2, 1, $3)
           ON CONFLICT (request_id) DO UPDATE SET log_json = excluded.log_json, jsonl_pending = 1, created_at = excluded.created_at`,
          [id, logJson, now],
        );
        if (publishAt !== null) await this.enqueueOn(c, "log", id, logJson, publishAt);
        return t;
      });
      // Committed: now the jsonl line (a failed append stays pending, see the class comment).
      await this.flushJsonl().catch(() => undefined);
      return t;
    });
    return this.moved(done);
  }

  async requestCancel(id: string): Promise<GrantRecord | null> {
    const now = this.nowIso();
    return this.write("cancel", async () => {
      const r = await this.pool.query<Row>("UPDATE grants SET cancel_requested = 1, updated_at = $1 WHERE request_id = $2 RETURNING *", [now, id]);
      return r.rows[0] ? toRecord(r.rows[0]) : null;
    });
  }

  private async enqueueOn(q: pg.ClientBase | pg.Pool, kind: "card" | "log", key: string, payload: string, at: number): Promise<void> {
    await q.query(
      `INSERT INTO outbox (kind, key, payload, attempts, next_attempt_at) VALUES ($1, $2, $3, 0, $4)
       ON CONFLICT (kind, key) DO UPDATE SET payload = excluded.payload, attempts = 0, next_attempt_at = excluded.next_attempt_at, last_error = NULL`,
      [kind, key, payload, at],
    );
  }

  enqueue(kind: "card" | "log", key: string, payload: string): Promise<void> {
    const at = this.clock.now();
    return this.write("enqueue", () => this.enqueueOn(this.pool, kind, key, payload, at));
  }

  ackOutbox(id: number, payload: string): Promise<void> {
    // Only the version that was sent: a newer card enqueued meanwhile stays.
    return this.write("ack", async () => void (await this.pool.query("DELETE FROM outbox WHERE id = $1 AND payload = $2", [id, payload])));
  }

  retryOutbox(id: number, nextAt: number, error: string): Promise<void> {
    return this.write("retry", async () => void (await this.pool.query("UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2 WHERE id = $3", [nextAt, error.slice(0, 500), id])));
  }

  /**
   * Append committed logs not yet in this replica's compute-log.jsonl, fsync it, then mark them
   * written, in one transaction holding their rows (one flush at a time in this process).
   */
  private flushJsonl(): Promise<void> {
    const run = this.flushing.then(() =>
      this.tx(async (c) => {
        const rows = (await c.query<{ request_id: string; log_json: string }>("SELECT request_id, log_json FROM compute_logs WHERE jsonl_pending = 1 ORDER BY seq FOR UPDATE SKIP LOCKED")).rows;
        if (rows.length === 0) return;
        appendFileSync(this.jsonlPath, rows.map((r) => r.log_json + "\n").join(""), { mode: 0o600 });
        const fd = openSync(this.jsonlPath, "r");
        try {
          fsyncSync(fd);
        } finally {
          closeSync(fd);
        }
        await c.query("UPDATE compute_logs SET jsonl_pending = 0 WHERE request_id = ANY($1)", [rows.map((r) => r.request_id)]);
      }),
    );
    this.flushing = run.catch(() => undefined);
    return run;
  }

  // ---- reads ----------------------------------------------------------------------------------

  /**
   * A read, tried again on another connection when the one it got had been cut (an idle connection
   * the server closed in a restart or failover is noticed only when used). Reads only: a write
   * whose connection broke may have committed, so it fails to its caller instead.
   */
  private async read<R extends pg.QueryResultRow>(sql: string, params: unknown[] = []): Promise<R[]> {
    return this.observed(
      (async () => {
        for (let attempt = 1; ; attempt++) {
          try {
            return (await this.pool.query<R>(sql, params)).rows;
          } catch (e) {
            if (attempt > this.pool.options.max || pgStoreFault(e) !== "unavailable") throw e;
          }
        }
      })(),
    );
  }

  private rows(sql: string, params: unknown[] = []): Promise<Row[]> {
    return this.read<Row>(sql, params);
  }

  async get(id: string): Promise<GrantRecord | null> {
    const r = await this.rows("SELECT * FROM grants WHERE request_id = $1", [id]);
    return r[0] ? toRecord(r[0]) : null;
  }

  async list(opts: { state?: GrantState; after?: number; limit: number }): Promise<GrantRecord[]> {
    const rows = opts.state
      ? await this.rows("SELECT * FROM grants WHERE state = $1 AND seq > $2 ORDER BY seq LIMIT $3", [opts.state, opts.after ?? 0, opts.limit])
      : await this.rows("SELECT * FROM grants WHERE seq > $1 ORDER BY seq LIMIT $2", [opts.after ?? 0, opts.limit]);
    return rows.map(toRecord);
  }

  async acceptedSince(sinceIso: string): Promise<GrantRecord[]> {
    return (await this.rows("SELECT * FROM grants WHERE created_at >= $1 ORDER BY seq", [sinceIso])).map(toRecord);
  }

  async nonTerminal(): Promise<GrantRecord[]> {
    return (await this.rows("SELECT * FROM grants WHERE state IN ('accepted','provisioning','running','terminating') ORDER BY seq")).map(toRecord);
  }

  countByState(): Record<string, number> {
    return Object.fromEntries(this.counts);
  }

  async transitions(id: string): Promise<Transition[]> {
    const row = (await this.rows("SELECT * FROM grants WHERE request_id = $1", [id]))[0];
    if (!row) return [];
    const audit = await this.read<Transition & pg.QueryResultRow>("SELECT from_state, to_state, backend, note, at FROM transitions WHERE request_id = $1 ORDER BY id", [id]);
    return historyOf(row, audit);
  }

  async computeLog(id: string): Promise<ComputeLog | null> {
    const r = (await this.read<{ log_json: string }>("SELECT log_json FROM compute_logs WHERE request_id = $1", [id]))[0];
    return r ? (JSON.parse(r.log_json) as ComputeLog) : null;
  }

  async dueOutbox(limit: number): Promise<OutboxItem[]> {
    return this.read<OutboxItem & pg.QueryResultRow>("SELECT id, kind, key, payload, attempts, next_attempt_at FROM outbox WHERE next_attempt_at <= $1 ORDER BY id LIMIT $2", [this.clock.now(), limit]);
  }

  async nextOutboxAt(): Promise<number | null> {
    return (await this.read<{ t: number | null }>("SELECT MIN(next_attempt_at) AS t FROM outbox"))[0]?.t ?? null;
  }

  async outboxSize(): Promise<number> {
    return (await this.read<{ n: number }>("SELECT COUNT(*) AS n FROM outbox"))[0]!.n;
  }

  /** The schema version the database is at (doctor). */
  schemaVersion(): Promise<number> {
    return pgSchemaVersion(this.pool);
  }

  close(): Promise<void> {
    return (this.closing ??= (async () => {
      if (this.inFlight > 0) await new Promise<void>((r) => this.idleWaiters.push(r));
      await this.flushing;
      await this.pool.end();
    })());
  }
}

/**
 * A pool whose idle-connection errors (the server restarting) are absorbed: the next query
 * reconnects. Idle connections do not keep the process alive (as an idle SQLite store does not).
 */
export function newPool(url: string, max: number, connectTimeoutMs: number): pg.Pool {
  const pool = new pg.Pool({ connectionString: url, max, connectionTimeoutMillis: connectTimeoutMs, idleTimeoutMillis: 30_000, allowExitOnIdle: true, keepAlive: true, types, application_name: "compute-bridge" });
  pool.on("error", () => undefined);
  return pool;
}
