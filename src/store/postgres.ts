import { randomBytes } from "node:crypto";
import { appendFileSync, closeSync, fsyncSync, mkdirSync, openSync } from "node:fs";
import path from "node:path";
import pg from "pg";
import { grantRequestDigest } from "../domain/grant.js";
import { canTransition, isTerminal } from "../domain/grant-record.js";
import type { ComputeLog, GrantState } from "../domain/index.js";
import { isoFormatter, type Clock } from "../util/clock.js";
import { pgStoreFault } from "./errors.js";
import { pgMigrate, pgSchemaVersion } from "./pg-schema.js";
import { acceptedRecord, columns, countKey, historyOf, toRecord, type AcceptResult, type GrantRecord, type NewGrant, type OutboxItem, type Row } from "./schema.js";
import { defaultReplicaId, LeaseLostError } from "./lease.js";
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
  /** This replica's name on its leases (default: hostname-pid). */
  replicaId?: string;
  /** Lease length (default 15 s). */
  leaseTtlMs?: number;
}

/** Connections of the leases' own pool (renewal and takeover; the leader role), beside pool_size. */
const LEASE_POOL_SIZE = 2;
/** Default lease length: renewed every 5 s (a third), as SkyPilot's lease elector renews. */
export const DEFAULT_LEASE_TTL_MS = 15_000;
/** The database's clock in ms: lease expiries are compared on one clock, whatever the replicas' clocks say. */
const NOW_MS = "(extract(epoch from clock_timestamp()) * 1000)::bigint";
const OPEN = "('accepted','provisioning','running','terminating')";
/**
 * Any constant: the advisory lock that orders changes to the capacity and spend ledgers. An
 * admission holds it exclusively (it reads the changes since its last one, then writes); a write
 * that changes a ledger without reading it (an end, a plain accept) holds it shared. So while an
 * admission reads, no ledger change is between its sequence number and its commit, and reading
 * `ledger_seq > cursor` misses nothing.
 */
export const LEDGER_LOCK = 0x6362_1901;

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

  readonly shared = true;
  readonly replicaId: string;
  readonly leaseTtlMs: number;
  /** The fencing token of every grant lease this replica holds, by request_id. */
  private readonly held = new Map<string, number>();
  /** The token of every role this replica holds. */
  private readonly roles = new Map<string, number>();
  /** The last ledger change this replica has seen (admit). */
  private ledgerCursor = 0;

  private constructor(
    private readonly pool: pg.Pool,
    /**
     * The leases' and roles' own connections: a renewal never waits for a connection behind this
     * replica's grant writes (a takeover of a hundred grants at once fills the main pool's queue
     * for seconds), which would let its leases lapse although it is healthy.
     */
    private readonly leasePool: pg.Pool,
    private readonly clock: Clock,
    stateDir: string,
    o: { replicaId?: string; leaseTtlMs?: number },
  ) {
    this.jsonlPath = path.join(stateDir, "compute-log.jsonl");
    this.replicaId = o.replicaId ?? defaultReplicaId();
    this.leaseTtlMs = o.leaseTtlMs ?? DEFAULT_LEASE_TTL_MS;
  }

  /** Connect, migrate (or refuse a newer schema), count, and append logs a crash kept out of the jsonl. */
  static async open(o: PostgresStoreOptions): Promise<PostgresStore> {
    mkdirSync(o.stateDir, { recursive: true, mode: 0o700 });
    const ttl = o.leaseTtlMs ?? DEFAULT_LEASE_TTL_MS;
    const connectMs = o.connectTimeoutMs ?? 10_000;
    const pool = newPool(o.url, o.poolSize ?? 8, connectMs, ttl);
    const leasePool = newPool(o.url, LEASE_POOL_SIZE, connectMs, ttl);
    const s = new PostgresStore(pool, leasePool, o.clock, o.stateDir, o);
    try {
      await pgMigrate(pool, o.onNewDatabase);
      const r = await pool.query<{ state: string; backend: string | null; n: number }>("SELECT state, backend, COUNT(*) AS n FROM grants GROUP BY state, backend");
      for (const row of r.rows) s.counts.set(countKey(row.state, row.backend), row.n);
      await s.flushJsonl();
    } catch (e) {
      await Promise.all([pool.end().catch(() => undefined), leasePool.end().catch(() => undefined)]);
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

  /** A plain accept (no admission decision to make): it changes the ledgers, so it holds their lock shared. */
  accept(g: NewGrant): Promise<AcceptResult> {
    return this.write("accept", () =>
      this.tx(async (c) => {
        await c.query("SELECT pg_advisory_xact_lock_shared($1)", [LEDGER_LOCK]);
        return this.insert(c, g);
      }),
    ).then((r) => this.accepted(r));
  }

  /**
   * Insert a new grant, leased to this replica (token 1) and sequenced in the ledger feed; a
   * request_id seen before inserts nothing and is answered from its row.
   */
  private async insert(c: pg.ClientBase, g: NewGrant): Promise<AcceptResult> {
    const now = this.nowIso();
    const attestation_nonce = g.envelope.attestation_nonce ?? (g.grant.tdx_required ? randomBytes(32).toString("hex") : null);
    const body_digest = grantRequestDigest({ grant: g.grant, envelope: g.envelope });
    // Accepted and routed in one statement (see Writer.accept).
    const ins = await c.query<{ seq: number }>(
      `INSERT INTO grants (request_id, body_digest, grant_json, envelope_json, state, backend, routed_backend, placement, price_per_hour, private_key, public_key, created_at, updated_at, attestation_nonce,
                           lease_owner, lease_token, lease_expires_at, ledger_seq)
       VALUES ($1, $2, $3, $4, 'provisioning', $5, $5, $6, $7, $8, $9, $10, $10, $11, $12, 1, ${NOW_MS} + $13, nextval('grants_ledger_seq'))
       ON CONFLICT (request_id) DO NOTHING RETURNING seq`,
      [g.request_id, body_digest, JSON.stringify(g.grant), JSON.stringify(g.envelope), g.backend, g.placement ?? null, g.price_per_hour ?? null, g.private_key, g.public_key, now, attestation_nonce, this.replicaId, this.leaseTtlMs],
    );
    const seq = ins.rows[0]?.seq;
    if (seq === undefined) {
      const row = (await c.query<Row>("SELECT * FROM grants WHERE request_id = $1", [g.request_id])).rows[0]!;
      return { status: row.body_digest === body_digest ? "duplicate" : "conflict", record: toRecord(row) };
    }
    return { status: "created", record: { ...acceptedRecord(g, { seq, body_digest, now, attestation_nonce }), lease_owner: this.replicaId } };
  }

  /** After the commit: a created grant is counted, and its lease (token 1) is this replica's. */
  private accepted(r: AcceptResult): AcceptResult {
    if (r.status === "created") {
      this.count("provisioning", r.record.backend, 1);
      this.held.set(r.record.request_id, 1);
    }
    return r;
  }

  /**
   * Lock the grant's row, check that this replica's lease still fences it and that the state
   * machine allows the move, then update it and write its audit entry. The update is guarded by
   * the lease token: a replica whose lease was taken over changes nothing (LeaseLostError).
   */
  private async move(c: pg.ClientBase, id: string, to: GrantState, changes: ColumnChanges, note: string | null, now: string): Promise<{ row: Row; from: Row }> {
    // A move that changes a ledger (an end, another backend or placement) is sequenced in its feed.
    const ledger = isTerminal(to) || changes.backend !== undefined || changes.placement !== undefined;
    if (ledger) await c.query("SELECT pg_advisory_xact_lock_shared($1)", [LEDGER_LOCK]);
    const from = (await c.query<Row>("SELECT * FROM grants WHERE request_id = $1 FOR UPDATE", [id])).rows[0];
    if (!from) throw new Error(`unknown grant ${id}`);
    const token = this.held.get(id);
    if (token === undefined || from.lease_owner !== this.replicaId || from.lease_token !== token) throw this.lost(id);
    if (!canTransition(from.state, to)) throw new Error(`grant ${id}: ${from.state} -> ${to} is not an allowed transition`);
    const cols = CHANGEABLE.filter((k) => changes[k] !== undefined);
    const params: unknown[] = [id, to, now, this.replicaId, token, ...cols.map((k) => changes[k])];
    const extra = (ledger ? ", ledger_seq = nextval('grants_ledger_seq')" : "") + (isTerminal(to) ? ", lease_owner = NULL, lease_expires_at = 0" : "");
    const row = (
      await c.query<Row>(
        `UPDATE grants SET state = $2, updated_at = $3${cols.map((k, i) => `, ${k} = $${i + 6}`).join("")}${extra}
         WHERE request_id = $1 AND lease_owner = $4 AND lease_token = $5 RETURNING *`,
        params,
      )
    ).rows[0];
    if (!row) throw this.lost(id);
    await c.query("INSERT INTO transitions (request_id, from_state, to_state, backend, note, at) VALUES ($1, $2, $3, $4, $5, $6)", [id, from.state, to, changes.backend ?? from.backend, note, now]);
    return { row, from };
  }

  /** This replica no longer holds `id`: it stops renewing it, and the caller drops the grant. */
  private lost(id: string): LeaseLostError {
    this.held.delete(id);
    return new LeaseLostError(id);
  }

  private moved(t: { row: Row; from: Row }): GrantRecord {
    if (isTerminal(t.row.state)) this.held.delete(t.row.request_id);
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

  // ---- leases, roles and admission (several replicas, issue #19) -------------------------------

  async claim(limit: number, exclude: readonly string[] = []): Promise<{ record: GrantRecord; previous: string | null }[]> {
    // Open grants whose lease lapsed (or was never taken, or was released), oldest first, but not
    // those this replica still drives; rows another replica is claiming at this moment are
    // skipped, not waited for.
    const rows = await this.write("claim", async () =>
      (
        await this.leasePool.query<Row & { previous: string | null }>(
          `UPDATE grants g SET lease_owner = $1, lease_token = g.lease_token + 1, lease_expires_at = ${NOW_MS} + $2
           FROM (SELECT seq, lease_owner AS previous FROM grants WHERE state IN ${OPEN} AND lease_expires_at < ${NOW_MS} AND NOT (request_id = ANY($4::text[]))
                 ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED) p
           WHERE g.seq = p.seq RETURNING g.*, p.previous`,
          [this.replicaId, this.leaseTtlMs, limit, exclude],
        )
      ).rows,
    );
    rows.sort((a, b) => a.seq - b.seq);
    for (const r of rows) this.held.set(r.request_id, r.lease_token!);
    return rows.map((r) => ({ record: toRecord(r), previous: r.previous }));
  }

  async renew(): Promise<{ renewed: number; lost: string[]; cancelled: string[] }> {
    const ids = [...this.held.keys()];
    if (ids.length === 0) return { renewed: 0, lost: [], cancelled: [] };
    const tokens = ids.map((id) => this.held.get(id)!);
    const rows = await this.write("renew", async () =>
      (
        await this.leasePool.query<{ id: string; renewed: boolean; cancel_requested: number | null; state: string | null }>(
          `WITH h AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS h(id, token)),
                r AS (UPDATE grants g SET lease_expires_at = ${NOW_MS} + $4 FROM h
                      WHERE g.request_id = h.id AND g.lease_owner = $3 AND g.lease_token = h.token AND g.state IN ${OPEN}
                      RETURNING g.request_id, g.cancel_requested)
           SELECT h.id, r.request_id IS NOT NULL AS renewed, r.cancel_requested, g.state
           FROM h LEFT JOIN r ON r.request_id = h.id LEFT JOIN grants g ON g.request_id = h.id`,
          [ids, tokens, this.replicaId, this.leaseTtlMs],
        )
      ).rows,
    );
    const out = { renewed: 0, lost: [] as string[], cancelled: [] as string[] };
    const sent = new Map(ids.map((id, i) => [id, tokens[i]!]));
    for (const r of rows) {
      if (r.renewed) {
        out.renewed++;
        if (r.cancel_requested === 1) out.cancelled.push(r.id);
        continue;
      }
      // Not renewed: ended meanwhile (its finish removes it), or taken by another replica. A token
      // that changed during the query is a newer claim by this replica: still held.
      if (this.held.get(r.id) !== sent.get(r.id)) continue;
      this.held.delete(r.id);
      if (r.state !== null && !isTerminal(r.state as GrantState)) out.lost.push(r.id);
    }
    return out;
  }

  async holds(id: string): Promise<boolean> {
    const token = this.held.get(id);
    if (token === undefined) return false;
    const r = await this.read<{ one: number }>(`SELECT 1 AS one FROM grants WHERE request_id = $1 AND lease_owner = $2 AND lease_token = $3 AND lease_expires_at > ${NOW_MS}`, [id, this.replicaId, token]);
    if (r.length === 0) this.held.delete(id);
    return r.length > 0;
  }

  forget(id: string): void {
    const token = this.held.get(id);
    if (token === undefined) return;
    this.held.delete(id);
    // Released at once, so a replica (perhaps this one) takes it at its next claim; should this
    // fail, the lease lapses by itself.
    this.leasePool.query("UPDATE grants SET lease_expires_at = 0 WHERE request_id = $1 AND lease_owner = $2 AND lease_token = $3", [id, this.replicaId, token]).catch(() => undefined);
  }

  async releaseAll(): Promise<void> {
    this.held.clear();
    this.roles.clear();
    await this.leasePool.query(`UPDATE grants SET lease_expires_at = 0 WHERE lease_owner = $1 AND state IN ${OPEN}`, [this.replicaId]);
    await this.leasePool.query("UPDATE roles SET expires_at = 0 WHERE owner = $1", [this.replicaId]);
  }

  async role(name: string, opts: { fenced?: boolean } = {}): Promise<boolean> {
    const token = this.roles.get(name);
    if (opts.fenced) {
      if (token === undefined) return false;
      const r = await this.read<{ one: number }>(`SELECT 1 AS one FROM roles WHERE name = $1 AND owner = $2 AND token = $3 AND expires_at > ${NOW_MS}`, [name, this.replicaId, token]);
      if (r.length === 0) this.roles.delete(name);
      return r.length > 0;
    }
    // Renewed by its holder (same token), or taken once lapsed (a new token fences the old holder).
    const r = await this.write("role", async () =>
      (
        await this.leasePool.query<{ token: number }>(
          `INSERT INTO roles (name, owner, token, expires_at) VALUES ($1, $2, 1, ${NOW_MS} + $3)
           ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at,
             token = CASE WHEN roles.owner = excluded.owner AND roles.token = $4 THEN roles.token ELSE roles.token + 1 END
           WHERE (roles.owner = excluded.owner AND roles.token = $4) OR roles.expires_at < ${NOW_MS}
           RETURNING token`,
          [name, this.replicaId, this.leaseTtlMs, token ?? -1],
        )
      ).rows,
    );
    if (r[0]) this.roles.set(name, r[0].token);
    else this.roles.delete(name);
    return r[0] !== undefined;
  }

  /** Under the ledgers' lock held exclusively: the changes since this replica's last look. */
  private async ledgerChanges(c: pg.ClientBase): Promise<GrantRecord[]> {
    await c.query("SELECT pg_advisory_xact_lock($1)", [LEDGER_LOCK]);
    const rows = (await c.query<Row & { ledger_seq: number }>("SELECT * FROM grants WHERE ledger_seq > $1 ORDER BY ledger_seq", [this.ledgerCursor])).rows;
    if (rows.length > 0) this.ledgerCursor = rows[rows.length - 1]!.ledger_seq;
    return rows.map(toRecord);
  }

  async admit(decide: (changes: GrantRecord[]) => NewGrant | null): Promise<AcceptResult | null> {
    const r = await this.write("accept", () =>
      this.tx(async (c) => {
        const g = decide(await this.ledgerChanges(c));
        return g ? this.insert(c, g) : null;
      }),
    );
    return r && this.accepted(r);
  }

  async admitMove(id: string, decide: (changes: GrantRecord[]) => GrantChanges | null): Promise<GrantRecord | null> {
    const now = this.nowIso();
    const t = await this.write("transition", () =>
      this.tx(async (c) => {
        const changes = decide(await this.ledgerChanges(c));
        return changes ? this.move(c, id, "provisioning", columns(changes), changes.note ?? null, now) : null;
      }),
    );
    return t && this.moved(t);
  }

  async pinIdentity(publicKey: string): Promise<string> {
    return this.write("identity", async () => {
      await this.pool.query("INSERT INTO provider_identity (one, public_key) VALUES (1, $1) ON CONFLICT (one) DO NOTHING", [publicKey]);
      return (await this.pool.query<{ public_key: string }>("SELECT public_key FROM provider_identity")).rows[0]!.public_key;
    });
  }

  async ledgerStart(): Promise<void> {
    await this.write("ledger", () =>
      this.tx(async (c) => {
        await c.query("SELECT pg_advisory_xact_lock($1)", [LEDGER_LOCK]);
        this.ledgerCursor = (await c.query<{ n: number }>("SELECT COALESCE(MAX(ledger_seq), 0)::bigint AS n FROM grants")).rows[0]!.n;
      }),
    );
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
      await Promise.all([this.pool.end(), this.leasePool.end()]);
    })());
  }
}

/**
 * A pool whose idle-connection errors (the server restarting) are absorbed: the next query
 * reconnects. Idle connections do not keep the process alive (as an idle SQLite store does not).
 */
export function newPool(url: string, max: number, connectTimeoutMs: number, idleInTransactionMs?: number): pg.Pool {
  const pool = new pg.Pool({
    connectionString: url,
    max,
    connectionTimeoutMillis: connectTimeoutMs,
    idleTimeoutMillis: 30_000,
    allowExitOnIdle: true,
    keepAlive: true,
    types,
    application_name: "compute-bridge",
    // A replica stalled inside a transaction (SIGSTOP, a long pause) would hold its locks (the
    // admission lock, grant rows) and stall the other replicas until it woke: the server ends such
    // a session after this long, rolling it back. A replica stalled that long has lost its leases
    // anyway (it is the lease TTL).
    ...(idleInTransactionMs !== undefined ? { idle_in_transaction_session_timeout: idleInTransactionMs } : {}),
  });
  pool.on("error", () => undefined);
  return pool;
}
