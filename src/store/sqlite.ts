import type Database from "better-sqlite3";
import { randomBytes } from "node:crypto";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { Worker } from "node:worker_threads";
import type { ComputeLog, GrantState } from "../domain/index.js";
import { isoFormatter, type Clock } from "../util/clock.js";
import { acceptedRecord, columns, countKey, flushJsonl, historyOf, migrate, openDatabase, toRecord, type AcceptResult, type GrantRecord, type NewGrant, type OutboxItem, type Row } from "./schema.js";
import { defaultReplicaId } from "./lease.js";
import type { GrantChanges, Store, Transition } from "./store.js";
import type { AcceptOutcome, FromWriter, ToWriter, Transitioned, WriteOp } from "./writer.js";

/** Batches queued at the writer at most (it commits every queued batch together). */
const MAX_BATCHES_IN_FLIGHT = 16;

interface Pending {
  op: WriteOp;
  resolve: (v: never) => void;
  reject: (e: Error) => void;
}

/**
 * The SQLite engine (the default): durable grant state in SQLite (WAL) in state_dir. Every transition is committed, and fsync'd, before the side
 * effect it announces.
 *
 * One writer thread owns every write (writer.ts, writer-thread.ts): writes made in the same
 * event-loop turn go to it as one batch; it commits every batch queued at it in one transaction
 * (group commit), fsyncs the WAL once, and only then are their promises settled. The event loop
 * keeps parsing and routing the next requests meanwhile, and reads run on the main thread's own
 * connection (WAL readers never wait for the writer).
 */
export class SqliteStore implements Store {
  readonly engine = "sqlite" as const;
  readonly db: Database.Database;
  /** Resolves if the writer thread dies; from then on every write fails, and the daemon stops. */
  readonly failed: Promise<Error>;
  /** Observed write latencies (ms), for metrics. */
  onWrite?: (op: string, ms: number) => void;

  private readonly worker: Worker;
  private readonly stmts: ReturnType<SqliteStore["prepareStatements"]>;
  private queue: Pending[] = [];
  private readonly inFlight = new Map<number, Pending[]>();
  private nextBatch = 1;
  private scheduled = false;
  private failure: Error | null = null;
  private signalFailed!: (e: Error) => void;
  private closing: Promise<void> | null = null;
  private idleWaiters: (() => void)[] = [];
  /**
   * Grants by "state|backend", counted once at open and then kept by every acknowledged write (a
   * moment after readers can see its commit), so that a metrics scrape costs nothing however long
   * the history grows.
   */
  private readonly counts = new Map<string, number>();

  constructor(
    stateDir: string,
    private readonly clock: Clock,
    readonly replicaId: string = defaultReplicaId(),
  ) {
    mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    const dbPath = path.join(stateDir, "bridge.db");
    const jsonlPath = path.join(stateDir, "compute-log.jsonl");
    this.db = openDatabase(dbPath);
    migrate(this.db);
    // Logs a crash kept out of compute-log.jsonl: this thread's only write, before the writer starts.
    flushJsonl(this.db, jsonlPath);
    this.stmts = this.prepareStatements();
    for (const r of this.db.prepare("SELECT state, backend, COUNT(*) n FROM grants GROUP BY state, backend").all() as { state: string; backend: string | null; n: number }[])
      this.counts.set(countKey(r.state, r.backend), r.n);
    this.failed = new Promise((r) => (this.signalFailed = r));
    this.worker = startWriter(dbPath, jsonlPath);
    // Referenced only while writes are outstanding: an idle store never keeps the process alive.
    this.worker.unref();
    this.worker.on("message", (m: string) => this.onWriterMessage(m));
    this.worker.on("error", (e) => this.writerDied(e));
    this.worker.on("exit", (code) => {
      if (!this.closing) this.writerDied(new Error(`the writer thread exited with code ${code}`));
    });
  }

  private readonly iso = isoFormatter();
  /** The clock as an ISO timestamp (formatted once per millisecond: every write carries one). */
  private nowIso(): string {
    return this.iso(this.clock.now());
  }

  // ---- the writer ---------------------------------------------------------------------------

  private write<T>(op: WriteOp): Promise<T> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closing) return Promise.reject(new Error("state database is closed"));
    return new Promise<T>((resolve, reject) => {
      this.queue.push({ op, resolve: resolve as (v: never) => void, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(() => {
          this.scheduled = false;
          this.send();
        });
      }
    });
  }

  private send(): void {
    if (this.queue.length === 0 || this.inFlight.size >= MAX_BATCHES_IN_FLIGHT || this.failure) return;
    const batch = this.queue;
    this.queue = [];
    const id = this.nextBatch++;
    this.inFlight.set(id, batch);
    if (this.inFlight.size === 1) this.worker.ref();
    // As one JSON string: structured-cloning nested objects costs several times more.
    this.worker.postMessage(JSON.stringify({ type: "batch", id, ops: batch.map((p) => p.op) } satisfies ToWriter));
  }

  private onWriterMessage(raw: string): void {
    const m = JSON.parse(raw) as FromWriter;
    this.onWrite?.("group_commit", m.ms);
    for (const { id, results } of m.batches) {
      const batch = this.inFlight.get(id);
      if (!batch) continue;
      this.inFlight.delete(id);
      batch.forEach((p, i) => {
        const r = results[i]!;
        if (r.ok) p.resolve(r.value as never);
        else p.reject(Object.assign(new Error(r.error.message), { name: r.error.name }, r.error.code ? { code: r.error.code } : {}));
      });
    }
    if (this.inFlight.size === 0) this.worker.unref();
    this.send();
    this.notifyIfIdle();
  }

  private writerDied(e: Error): void {
    if (this.failure) return;
    const code = (e as Error & { code?: unknown }).code;
    this.failure = Object.assign(new Error(`state database writer failed: ${e.message}`, { cause: e }), typeof code === "string" ? { code } : {});
    const lost = [...[...this.inFlight.values()].flat(), ...this.queue];
    this.inFlight.clear();
    this.queue = [];
    for (const p of lost) p.reject(this.failure);
    this.signalFailed(this.failure);
    this.notifyIfIdle();
  }

  private notifyIfIdle(): void {
    if (this.failure || (this.queue.length === 0 && this.inFlight.size === 0)) for (const w of this.idleWaiters.splice(0)) w();
  }

  // ---- writes -------------------------------------------------------------------------------

  /**
   * Durably record a new grant, routed to `backend`, or report the existing one: a duplicate if
   * its body digest (grantRequestDigest, computed by the writer) matches, else a conflict.
   */
  async accept(g: NewGrant): Promise<AcceptResult> {
    const now = this.nowIso();
    // A TDX grant's evidence binds a nonce: the requester's, else a random one recorded here.
    const attestation_nonce = g.envelope.attestation_nonce ?? (g.grant.tdx_required ? randomBytes(32).toString("hex") : null);
    const r = await this.write<AcceptOutcome>({
      op: "accept",
      row: {
        request_id: g.request_id,
        grant: g.grant,
        envelope: g.envelope,
        backend: g.backend,
        placement: g.placement ?? null,
        price_per_hour: g.price_per_hour ?? null,
        private_key: g.private_key,
        public_key: g.public_key,
        attestation_nonce,
      },
      now,
    });
    if (r.status !== "created") return { status: r.status, record: toRecord(r.row) };
    this.count("provisioning", g.backend, 1);
    // The new record, built from what was written (no read-back on the accept path).
    return { status: "created", record: acceptedRecord(g, { seq: r.seq, body_digest: r.body_digest, now, attestation_nonce }) };
  }

  /** Move a grant to `to`, with the fields that change alongside, in the next group commit. */
  async transition(id: string, to: GrantState, changes: GrantChanges = {}): Promise<GrantRecord> {
    return this.moved(await this.write<Transitioned>({ op: "transition", id, to, changes: columns(changes), note: changes.note ?? null, now: this.nowIso() }));
  }

  private moved(t: Transitioned): GrantRecord {
    this.count(t.from_state, t.from_backend, -1);
    this.count(t.row.state, t.row.backend, 1);
    return toRecord(t.row);
  }

  private count(state: string, backend: string | null, delta: number): void {
    const k = countKey(state, backend);
    const n = (this.counts.get(k) ?? 0) + delta;
    if (n > 0) this.counts.set(k, n);
    else this.counts.delete(k);
  }

  /** Final state and its signed ComputeLog in one commit; the compute-log.jsonl line follows it. */
  async finish(
    id: string,
    to: GrantState,
    log: ComputeLog,
    changes: { error_kind?: string | null; error_message?: string | null } = {},
    publish = false,
  ): Promise<GrantRecord> {
    const done = await this.write<Transitioned>({
      op: "finish",
      id,
      to,
      changes: { ...columns(changes), cost: log.usage?.cost ?? null },
      note: `exit_reason=${log.exit_reason}`,
      log_json: JSON.stringify(log),
      publish_at: publish ? this.clock.now() : null,
      now: this.nowIso(),
    });
    return this.moved(done);
  }

  async requestCancel(id: string): Promise<GrantRecord | null> {
    const row = await this.write<Row | null>({ op: "cancel", id, now: this.nowIso() });
    return row ? toRecord(row) : null;
  }

  /** Queue a document for the market (replacing an undelivered one with the same key). */
  enqueue(kind: "card" | "log", key: string, payload: string): Promise<void> {
    return this.write({ op: "enqueue", kind, key, payload, next_attempt_at: this.clock.now() });
  }

  ackOutbox(id: number, payload: string): Promise<void> {
    return this.write({ op: "ack", id, payload });
  }

  retryOutbox(id: number, nextAt: number, error: string): Promise<void> {
    return this.write({ op: "retry", id, next_attempt_at: nextAt, error });
  }

  // ---- reads (on this thread's own connection; resolved at once) -----------------------------

  private getRow(id: string): Row | undefined {
    return this.stmts.get.get(id) as Row | undefined;
  }

  async get(id: string): Promise<GrantRecord | null> {
    const r = this.getRow(id);
    return r ? toRecord(r) : null;
  }

  async list(opts: { state?: GrantState; after?: number; limit: number }): Promise<GrantRecord[]> {
    const rows = (
      opts.state
        ? this.stmts.listByState.all({ state: opts.state, after: opts.after ?? 0, limit: opts.limit })
        : this.stmts.listAll.all({ after: opts.after ?? 0, limit: opts.limit })
    ) as Row[];
    return rows.map(toRecord);
  }

  async acceptedSince(sinceIso: string): Promise<GrantRecord[]> {
    return (this.stmts.acceptedSince.all(sinceIso) as Row[]).map(toRecord);
  }

  async nonTerminal(): Promise<GrantRecord[]> {
    return (this.stmts.nonTerminal.all() as Row[]).map(toRecord);
  }

  /** A failed SQLite write is the writer's failure (`failed`), which the daemon does not outlive. */
  unavailable(): string | null {
    return null;
  }

  countByState(): Record<string, number> {
    return Object.fromEntries(this.counts);
  }

  async transitions(id: string): Promise<Transition[]> {
    const row = this.getRow(id);
    return row ? historyOf(row, this.stmts.transitions.all(id) as Transition[]) : [];
  }

  async computeLog(id: string): Promise<ComputeLog | null> {
    const r = this.stmts.computeLog.get(id) as { log_json: string } | undefined;
    return r ? (JSON.parse(r.log_json) as ComputeLog) : null;
  }

  // ---- market outbox --------------------------------------------------------------------------

  async dueOutbox(limit: number): Promise<OutboxItem[]> {
    return this.stmts.dueOutbox.all(this.clock.now(), limit) as OutboxItem[];
  }

  async nextOutboxAt(): Promise<number | null> {
    const r = this.stmts.nextOutboxAt.get() as { t: number | null };
    return r.t;
  }

  async outboxSize(): Promise<number> {
    return (this.stmts.outboxSize.get() as { n: number }).n;
  }

  // ---- one replica: every lease is this process's (state_dir is locked to it) ------------------

  readonly shared = false;
  readonly leaseTtlMs = Infinity;

  async claim(): Promise<{ record: GrantRecord; previous: string | null }[]> {
    return (await this.nonTerminal()).map((record) => ({ record, previous: null }));
  }

  async renew(): Promise<{ renewed: number; lost: string[]; cancelled: string[] }> {
    return { renewed: 0, lost: [], cancelled: [] };
  }

  async holds(): Promise<boolean> {
    return true;
  }

  forget(): void {}

  async releaseAll(): Promise<void> {}

  async role(): Promise<boolean> {
    return true;
  }

  /** Synchronous up to the accept: route, reserve and write in one turn of the event loop. */
  admit(decide: (changes: GrantRecord[]) => NewGrant | null): Promise<AcceptResult | null> {
    const g = decide([]);
    return g ? this.accept(g) : Promise.resolve(null);
  }

  admitMove(id: string, decide: (changes: GrantRecord[]) => GrantChanges | null): Promise<GrantRecord | null> {
    const c = decide([]);
    return c ? this.transition(id, "provisioning", c) : Promise.resolve(null);
  }

  async ledgerStart(): Promise<void> {}

  async pinIdentity(publicKey: string): Promise<string> {
    return publicKey;
  }

  /** Let outstanding writes commit, stop the writer, close the database. */
  close(): Promise<void> {
    return (this.closing ??= (async () => {
      await new Promise<void>((r) => {
        this.idleWaiters.push(r);
        this.notifyIfIdle();
      });
      if (!this.failure) {
        this.worker.ref();
        const exited = new Promise<void>((r) => this.worker.once("exit", () => r()));
        this.worker.postMessage(JSON.stringify({ type: "close" } satisfies ToWriter));
        let timer: NodeJS.Timeout | undefined;
        const late = await Promise.race([exited.then(() => false), new Promise<boolean>((r) => (timer = setTimeout(() => r(true), 5000)))]);
        clearTimeout(timer);
        if (late) await this.worker.terminate();
      }
      if (this.db.open) this.db.close();
    })());
  }

  private prepareStatements() {
    const db = this.db;
    return {
      get: db.prepare("SELECT * FROM grants WHERE request_id = ?"),
      listAll: db.prepare("SELECT * FROM grants WHERE seq > @after ORDER BY seq LIMIT @limit"),
      listByState: db.prepare("SELECT * FROM grants WHERE state = @state AND seq > @after ORDER BY seq LIMIT @limit"),
      acceptedSince: db.prepare("SELECT * FROM grants WHERE created_at >= ? ORDER BY seq"),
      nonTerminal: db.prepare("SELECT * FROM grants WHERE state IN ('accepted','provisioning','running','terminating') ORDER BY seq"),
      transitions: db.prepare("SELECT from_state, to_state, backend, note, at FROM transitions WHERE request_id = ? ORDER BY id"),
      computeLog: db.prepare("SELECT log_json FROM compute_logs WHERE request_id = ?"),
      dueOutbox: db.prepare("SELECT id, kind, key, payload, attempts, next_attempt_at FROM outbox WHERE next_attempt_at <= ? ORDER BY id LIMIT ?"),
      nextOutboxAt: db.prepare("SELECT MIN(next_attempt_at) t FROM outbox"),
      outboxSize: db.prepare("SELECT COUNT(*) n FROM outbox"),
    };
  }
}

/**
 * The writer thread. Built, its entry is writer-thread.js beside this file; run from source
 * (tests, benches under tsx) the thread registers tsx before importing writer-thread.ts.
 */
function startWriter(dbPath: string, jsonlPath: string): Worker {
  const workerData = { dbPath, jsonlPath };
  if (!import.meta.url.endsWith(".ts")) return new Worker(new URL("./writer-thread.js", import.meta.url), { workerData });
  const entry = new URL("./writer-thread.ts", import.meta.url).href;
  const tsx = import.meta.resolve("tsx/esm/api");
  return new Worker(`import(${JSON.stringify(tsx)}).then(({ register }) => { register(); return import(${JSON.stringify(entry)}); });`, { eval: true, workerData });
}
