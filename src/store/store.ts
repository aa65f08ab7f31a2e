import Database from "better-sqlite3";
import { appendFileSync, closeSync, fsync, fsyncSync, mkdirSync, openSync } from "node:fs";
import path from "node:path";
import type { ComputeGrant, ComputeLog, Envelope, GrantState, ProvisionedInstance } from "../domain/index.js";
import type { Clock } from "../util/clock.js";

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
}

export interface NewGrant {
  request_id: string;
  body_digest: string;
  grant: ComputeGrant;
  envelope: Envelope;
  backend: string;
  private_key: string | null;
  public_key: string | null;
}

export type AcceptResult = { status: "created"; record: GrantRecord } | { status: "duplicate"; record: GrantRecord } | { status: "conflict"; record: GrantRecord };

interface Row {
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
 * Durable grant state in SQLite (WAL). Every transition is committed, and the WAL fsync'd, before
 * the side effect it announces. Accepts use group commit: the inserts that arrive in the same
 * event-loop turn share one fsync'd transaction, and each caller is answered after that commit.
 */
export class Store {
  readonly db: Database.Database;
  private pending: { fn: () => unknown; resolve: (r: unknown) => void; reject: (e: unknown) => void }[] = [];

  private flushScheduled = false;
  private readonly walPath: string;
  private walFd: number | null = null;
  private fsyncsInFlight = 0;
  private readonly jsonlPath: string;
  private readonly stmts: ReturnType<Store["prepareStatements"]>;
  /** Runs fn in a transaction, or in a savepoint when one is open (one wrapper, built once). */
  private readonly tx: <T>(fn: () => T) => T;
  /** Observed write latencies (ms), for metrics. */
  onWrite?: (op: string, ms: number) => void;

  constructor(
    stateDir: string,
    private readonly clock: Clock,
  ) {
    mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    this.db = new Database(path.join(stateDir, "bridge.db"));
    this.db.pragma("journal_mode = WAL");
    // Commits write the WAL without fsync (NORMAL); flush() then fsyncs the WAL on libuv's thread
    // pool and answers callers only after it: as durable as FULL for everything acknowledged or
    // acted on, but the event loop keeps accepting the next batch while the disk syncs the
    // previous one. (Readers may see a commit a few ms before its fsync completes.)
    this.db.pragma("synchronous = NORMAL");
    this.walPath = path.join(stateDir, "bridge.db-wal");
    this.db.pragma("busy_timeout = 5000");
    this.migrate();
    this.stmts = this.prepareStatements();
    this.tx = this.db.transaction((fn: () => unknown) => fn()) as <T>(fn: () => T) => T;
    this.jsonlPath = path.join(stateDir, "compute-log.jsonl");
    this.flushJsonl();
  }

  private migrate(): void {
    const current = this.db.pragma("user_version", { simple: true }) as number;
    if (current > MIGRATIONS.length)
      throw new Error(`state database schema version ${current} is newer than this build understands (${MIGRATIONS.length}); refusing to downgrade`);
    for (let v = current; v < MIGRATIONS.length; v++) {
      this.db.transaction(() => {
        this.db.exec(MIGRATIONS[v]!);
        this.db.pragma(`user_version = ${v + 1}`);
      })();
    }
  }

  private nowIso(): string {
    return new Date(this.clock.now()).toISOString();
  }

  private timed<T>(op: string, fn: () => T): T {
    const t0 = performance.now();
    try {
      return fn();
    } finally {
      this.onWrite?.(op, performance.now() - t0);
    }
  }

  // ---- group commit -------------------------------------------------------------------------

  /**
   * Run `fn` inside the next group transaction: every call made in the same event-loop turn shares
   * one fsync'd commit, and each promise settles after that commit. Each fn runs in its own
   * savepoint, so one failing call rolls back only its own writes.
   */
  commit<T>(fn: () => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.pending.push({ fn, resolve: resolve as (v: unknown) => void, reject });
      if (!this.flushScheduled) {
        this.flushScheduled = true;
        setImmediate(() => this.flush());
      }
    });
  }

  private flush(): void {
    const batch = this.pending;
    this.pending = [];
    this.flushScheduled = false;
    if (batch.length === 0) return;
    const results: ({ ok: true; v: unknown } | { ok: false; e: unknown })[] = [];
    try {
      this.timed("group_commit", () =>
        this.tx(() => {
          for (const { fn } of batch) {
            try {
              results.push({ ok: true, v: this.tx(fn) });
            } catch (e) {
              results.push({ ok: false, e });
            }
          }
        }),
      );
    } catch (e) {
      for (const p of batch) p.reject(e);
      return;
    }
    const settle = () =>
      batch.forEach((p, i) => {
        const r = results[i]!;
        if (r.ok) p.resolve(r.v);
        else p.reject(r.e);
      });
    const t0 = performance.now();
    const fd = this.wal();
    this.fsyncsInFlight++;
    fsync(fd, (err) => {
      this.fsyncsInFlight--;
      if (this.fsyncsInFlight === 0 && this.walFd === null) closeSync(fd); // close() deferred it
      this.onWrite?.("wal_fsync", performance.now() - t0);
      if (err) for (const p of batch) p.reject(new Error(`state database: fsync of the WAL failed: ${err.message}`));
      else settle();
    });
  }

  /** A descriptor on the WAL file (it exists once anything was committed; SQLite keeps its inode). */
  private wal(): number {
    return (this.walFd ??= openSync(this.walPath, "r"));
  }

  /** Durably record a new grant (or report the existing one) in the next group commit. */
  accept(g: NewGrant): Promise<AcceptResult> {
    return this.commit(() => {
      const existing = this.getRow(g.request_id);
      if (existing) {
        const record = toRecord(existing);
        return existing.body_digest === g.body_digest ? { status: "duplicate" as const, record } : { status: "conflict" as const, record };
      }
      const now = this.nowIso();
      // Accepted and routed in one commit: the first durable state already names the backend, and
      // the backend's idempotency key derives from request_id, so provisioning may start at once.
      const info = this.stmts.insert.run({
        request_id: g.request_id,
        body_digest: g.body_digest,
        grant_json: JSON.stringify(g.grant),
        envelope_json: JSON.stringify(g.envelope),
        state: "provisioning",
        backend: g.backend,
        private_key: g.private_key,
        public_key: g.public_key,
        now,
      });
      this.stmts.transition.run({ request_id: g.request_id, from_state: null, to_state: "provisioning", backend: g.backend, note: "accepted and routed; idempotency key derived from request_id", at: now });
      // The new record, built from what was just written (no read-back on the accept path).
      const record: GrantRecord = {
        seq: Number(info.lastInsertRowid),
        request_id: g.request_id,
        body_digest: g.body_digest,
        grant: g.grant,
        envelope: g.envelope,
        state: "provisioning",
        backend: g.backend,
        instance: null,
        private_key: g.private_key,
        public_key: g.public_key,
        error_kind: null,
        error_message: null,
        attempts: [],
        cancel_requested: false,
        outcome: null,
        created_at: now,
        updated_at: now,
      };
      return { status: "created" as const, record };
    });
  }

  // ---- reads ----------------------------------------------------------------------------------

  private getRow(id: string): Row | undefined {
    return this.stmts.get.get(id) as Row | undefined;
  }

  get(id: string): GrantRecord | null {
    const r = this.getRow(id);
    return r ? toRecord(r) : null;
  }

  list(opts: { state?: GrantState; after?: number; limit: number }): GrantRecord[] {
    const rows = (
      opts.state
        ? this.stmts.listByState.all({ state: opts.state, after: opts.after ?? 0, limit: opts.limit })
        : this.stmts.listAll.all({ after: opts.after ?? 0, limit: opts.limit })
    ) as Row[];
    return rows.map(toRecord);
  }

  nonTerminal(): GrantRecord[] {
    return (this.stmts.nonTerminal.all() as Row[]).map(toRecord);
  }

  countByState(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const r of this.db.prepare("SELECT state, backend, COUNT(*) n FROM grants GROUP BY state, backend").all() as { state: string; backend: string | null; n: number }[])
      out[`${r.state}|${r.backend ?? ""}`] = r.n;
    return out;
  }

  transitions(id: string): { from_state: string | null; to_state: string; backend: string | null; note: string | null; at: string }[] {
    return this.db.prepare("SELECT from_state, to_state, backend, note, at FROM transitions WHERE request_id = ? ORDER BY id").all(id) as never;
  }

  // ---- transitions ----------------------------------------------------------------------------

  /** Move a grant to `to` (and the fields that change alongside) in the next group commit. */
  transitionAsync(...args: Parameters<Store["transition"]>): Promise<GrantRecord> {
    return this.commit(() => this.transition(...args));
  }

  /** Move a grant to `to`, with the fields that change alongside, in one committed transaction. */
  transition(
    id: string,
    to: GrantState,
    changes: {
      backend?: string | null;
      instance?: ProvisionedInstance | null;
      error_kind?: string | null;
      error_message?: string | null;
      attempts?: Attempt[];
      outcome?: Outcome | null;
      note?: string;
    } = {},
  ): GrantRecord {
    return this.timed("transition", () =>
      this.tx(() => {
        const row = this.getRow(id);
        if (!row) throw new Error(`unknown grant ${id}`);
        const now = this.nowIso();
        const set: Record<string, unknown> = { request_id: id, state: to, now };
        const cols: string[] = ["state = @state", "updated_at = @now"];
        if (changes.backend !== undefined) (cols.push("backend = @backend"), (set.backend = changes.backend));
        if (changes.instance !== undefined) (cols.push("instance_json = @instance_json"), (set.instance_json = changes.instance ? JSON.stringify(changes.instance) : null));
        if (changes.error_kind !== undefined) (cols.push("error_kind = @error_kind"), (set.error_kind = changes.error_kind));
        if (changes.error_message !== undefined) (cols.push("error_message = @error_message"), (set.error_message = changes.error_message));
        if (changes.attempts !== undefined) (cols.push("attempts_json = @attempts_json"), (set.attempts_json = JSON.stringify(changes.attempts)));
        if (changes.outcome !== undefined) (cols.push("outcome_json = @outcome_json"), (set.outcome_json = changes.outcome ? JSON.stringify(changes.outcome) : null));
        this.prepared(`UPDATE grants SET ${cols.join(", ")} WHERE request_id = @request_id`).run(set);
        this.stmts.transition.run({ request_id: id, from_state: row.state, to_state: to, backend: changes.backend ?? row.backend, note: changes.note ?? null, at: now });
        return toRecord(this.getRow(id)!);
      }),
    );
  }

  requestCancel(id: string): GrantRecord | null {
    this.db.prepare("UPDATE grants SET cancel_requested = 1, updated_at = ? WHERE request_id = ?").run(this.nowIso(), id);
    return this.get(id);
  }

  /** finish() in the next group commit; the jsonl line is appended after the commit. */
  async finishAsync(...args: Parameters<Store["finishTx"]>): Promise<GrantRecord> {
    const r = await this.commit(() => this.finishTx(...args));
    this.flushJsonl();
    return r;
  }

  /** Final state and its signed ComputeLog in one transaction. */
  finishTx(
    id: string,
    to: GrantState,
    log: ComputeLog,
    changes: { error_kind?: string | null; error_message?: string | null } = {},
    publish = false,
  ): GrantRecord {
    return this.timed("finish", () =>
      this.tx(() => {
        const r = this.transition(id, to, { ...changes, note: `exit_reason=${log.exit_reason}` });
        const json = JSON.stringify(log);
        this.db.prepare("INSERT OR REPLACE INTO compute_logs (request_id, log_json, jsonl_pending, created_at) VALUES (?, ?, 1, ?)").run(id, json, this.nowIso());
        if (publish) this.enqueue("log", id, json);
        return r;
      }),
    );
  }

  computeLog(id: string): ComputeLog | null {
    const r = this.db.prepare("SELECT log_json FROM compute_logs WHERE request_id = ?").get(id) as { log_json: string } | undefined;
    return r ? (JSON.parse(r.log_json) as ComputeLog) : null;
  }

  /** Append committed logs not yet in compute-log.jsonl (at-least-once across crashes). */
  private flushJsonl(): void {
    const rows = this.db.prepare("SELECT request_id, log_json FROM compute_logs WHERE jsonl_pending = 1 ORDER BY rowid").all() as { request_id: string; log_json: string }[];
    if (rows.length === 0) return;
    appendFileSync(this.jsonlPath, rows.map((r) => r.log_json + "\n").join(""), { mode: 0o600 });
    const fd = openSync(this.jsonlPath, "r");
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    const mark = this.db.prepare("UPDATE compute_logs SET jsonl_pending = 0 WHERE request_id = ?");
    this.db.transaction(() => rows.forEach((r) => mark.run(r.request_id)))();
  }

  // ---- market outbox --------------------------------------------------------------------------

  enqueue(kind: "card" | "log", key: string, payload: string): void {
    this.db
      .prepare(
        `INSERT INTO outbox (kind, key, payload, attempts, next_attempt_at) VALUES (?, ?, ?, 0, ?)
         ON CONFLICT (kind, key) DO UPDATE SET payload = excluded.payload, attempts = 0, next_attempt_at = excluded.next_attempt_at, last_error = NULL`,
      )
      .run(kind, key, payload, this.clock.now());
  }

  dueOutbox(limit: number): OutboxItem[] {
    return this.db.prepare("SELECT id, kind, key, payload, attempts, next_attempt_at FROM outbox WHERE next_attempt_at <= ? ORDER BY id LIMIT ?").all(this.clock.now(), limit) as OutboxItem[];
  }

  nextOutboxAt(): number | null {
    const r = this.db.prepare("SELECT MIN(next_attempt_at) t FROM outbox").get() as { t: number | null };
    return r.t;
  }

  outboxSize(): number {
    return (this.db.prepare("SELECT COUNT(*) n FROM outbox").get() as { n: number }).n;
  }

  ackOutbox(id: number, payload: string): void {
    // Only delete the version that was sent: a newer card enqueued meanwhile stays.
    this.db.prepare("DELETE FROM outbox WHERE id = ? AND payload = ?").run(id, payload);
  }

  retryOutbox(id: number, nextAt: number, error: string): void {
    this.db.prepare("UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE id = ?").run(nextAt, error.slice(0, 500), id);
  }

  close(): void {
    if (this.pending.length) this.flush();
    if (this.walFd !== null) {
      fsyncSync(this.walFd);
      // An fsync still running on the thread pool closes the descriptor when it returns.
      if (this.fsyncsInFlight === 0) closeSync(this.walFd);
      this.walFd = null;
    }
    if (this.db.open) this.db.close();
  }

  private readonly statementCache = new Map<string, Database.Statement>();
  /** Prepared statements for SQL built from a fixed set of column lists. */
  private prepared(sql: string): Database.Statement {
    let st = this.statementCache.get(sql);
    if (!st) this.statementCache.set(sql, (st = this.db.prepare(sql)));
    return st;
  }

  private prepareStatements() {
    const db = this.db;
    return {
      insert: db.prepare(
        `INSERT INTO grants (request_id, body_digest, grant_json, envelope_json, state, backend, private_key, public_key, created_at, updated_at)
         VALUES (@request_id, @body_digest, @grant_json, @envelope_json, @state, @backend, @private_key, @public_key, @now, @now)`,
      ),
      transition: db.prepare("INSERT INTO transitions (request_id, from_state, to_state, backend, note, at) VALUES (@request_id, @from_state, @to_state, @backend, @note, @at)"),
      get: db.prepare("SELECT * FROM grants WHERE request_id = ?"),
      listAll: db.prepare("SELECT * FROM grants WHERE seq > @after ORDER BY seq LIMIT @limit"),
      listByState: db.prepare("SELECT * FROM grants WHERE state = @state AND seq > @after ORDER BY seq LIMIT @limit"),
      nonTerminal: db.prepare("SELECT * FROM grants WHERE state IN ('accepted','provisioning','running','terminating') ORDER BY seq"),
    };
  }
}

function toRecord(r: Row): GrantRecord {
  return {
    seq: r.seq,
    request_id: r.request_id,
    body_digest: r.body_digest,
    grant: JSON.parse(r.grant_json) as ComputeGrant,
    envelope: JSON.parse(r.envelope_json) as Envelope,
    state: r.state,
    backend: r.backend,
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
  };
}
