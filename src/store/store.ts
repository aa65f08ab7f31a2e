import { readSecret, registerSecret } from "../config/secrets.js";
import type { StoreConfig } from "../config/schema.js";
import type { ComputeLog, GrantState, ProvisionedInstance } from "../domain/index.js";
import type { Clock } from "../util/clock.js";
import { defaultReplicaId } from "./lease.js";
import { assertDatabaseNotLost, assertPgDatabaseNotLost } from "./state-check.js";
import type { AcceptResult, Attempt, GrantRecord, NewGrant, OutboxItem, Outcome } from "./schema.js";

export { SCHEMA_VERSION } from "./schema.js";
export { isStorageFull, isStoreUnavailable } from "./errors.js";
export type { AcceptResult, Attempt, GrantRecord, NewGrant, OutboxItem, Outcome } from "./schema.js";
export { LeaseLostError, defaultReplicaId } from "./lease.js";

/** One entry of a grant's history. */
export interface Transition {
  from_state: GrantState | null;
  to_state: GrantState;
  backend: string | null;
  note: string | null;
  at: string;
}

/** What a transition changes alongside the state. */
export interface GrantChanges {
  backend?: string | null;
  placement?: string | null;
  price_per_hour?: number | null;
  instance?: ProvisionedInstance | null;
  error_kind?: string | null;
  error_message?: string | null;
  attempts?: Attempt[];
  outcome?: Outcome | null;
  note?: string;
}

export type StoreEngine = "sqlite" | "postgres";

/**
 * The durable grant state, as the rest of the daemon sees it: one interface, two engines.
 *
 * - `sqlite.ts` (the default): one file in state_dir, reads on the main thread's own connection,
 *   writes through one writer thread with group commit.
 * - `postgres.ts`: a PostgreSQL database shared by the bridge's replicas (issue #19).
 *
 * Both keep the same rules: a write resolves only once it is durably committed, so the caller may
 * act on it (every transition is written before the side effect it announces); a transition the
 * state machine does not allow (domain/grant-record.ts canTransition) is refused by the store; a
 * ComputeLog reaches compute-log.jsonl only after its commit. Reads are async because a database
 * across the network needs them to be; on SQLite they resolve at once (no I/O callback runs in
 * between), so the daemon behaves the same on it as when they were synchronous.
 *
 * A failed write rejects with the engine's error: errors.ts (isStoreUnavailable, isStorageFull)
 * and listener/store-errors.ts recognise both engines' storage failures.
 */
export interface Store {
  readonly engine: StoreEngine;
  /**
   * Resolves if the store can never write again (SQLite: its writer thread died); the daemon then
   * stops. A PostgreSQL connection that fails is not that: the next write reconnects.
   */
  readonly failed: Promise<Error>;
  /** Observed write latencies (ms), for metrics. */
  onWrite?: (op: string, ms: number) => void;
  /**
   * Why the database cannot be used right now (the last operation failed for a storage reason and
   * none has succeeded since), else null: /readyz reports it while the store may recover by itself.
   */
  unavailable(): string | null;

  // ---- writes (resolve once durable) ----
  /**
   * Durably record a new grant, routed to `g.backend`, or report the existing one: a duplicate if
   * its body digest (grantRequestDigest) matches, else a conflict.
   */
  accept(g: NewGrant): Promise<AcceptResult>;
  /** Move a grant to `to`, with the fields that change alongside. */
  transition(id: string, to: GrantState, changes?: GrantChanges): Promise<GrantRecord>;
  /** Final state and its signed ComputeLog in one commit; the compute-log.jsonl line follows it. */
  finish(id: string, to: GrantState, log: ComputeLog, changes?: { error_kind?: string | null; error_message?: string | null }, publish?: boolean): Promise<GrantRecord>;
  requestCancel(id: string): Promise<GrantRecord | null>;
  /** Queue a document for the market (replacing an undelivered one with the same key). */
  enqueue(kind: "card" | "log", key: string, payload: string): Promise<void>;
  ackOutbox(id: number, payload: string): Promise<void>;
  retryOutbox(id: number, nextAt: number, error: string): Promise<void>;

  // ---- reads ----
  get(id: string): Promise<GrantRecord | null>;
  list(opts: { state?: GrantState; after?: number; limit: number }): Promise<GrantRecord[]>;
  /** Grants accepted at or after `sinceIso` (their charges to the current budget windows). */
  acceptedSince(sinceIso: string): Promise<GrantRecord[]>;
  nonTerminal(): Promise<GrantRecord[]>;
  /**
   * Grants by "state|backend" (backend "" when none), kept by this process's writes from a count
   * made at open: a metrics scrape costs no query however long the history grows.
   */
  countByState(): Record<string, number>;
  /** A grant's history: its accept, then every later transition. */
  transitions(id: string): Promise<Transition[]>;
  computeLog(id: string): Promise<ComputeLog | null>;
  dueOutbox(limit: number): Promise<OutboxItem[]>;
  nextOutboxAt(): Promise<number | null>;
  outboxSize(): Promise<number>;

  // ---- several replicas (issue #19) ----
  /** This process among the replicas sharing the database: on every log line, lease and role. */
  readonly replicaId: string;
  /**
   * True when other replicas may share the database (PostgreSQL): grants are then driven under
   * leases, admissions are serialized across replicas and the singletons run on a leader. SQLite
   * serves one process (state_dir is locked): every lease is its own and every check passes.
   */
  readonly shared: boolean;
  /** The lease length (ms): a replica that does not renew for this long loses its grants. */
  readonly leaseTtlMs: number;
  /**
   * Take the leases of open grants that no replica holds (never leased, released, or lapsed: their
   * replica died or stalled), at most `limit`, each with a new fencing token. From then on every
   * write of such a grant's state is guarded by that token. Returns the grants, and the replica
   * that held each before (null: none). `exclude`: grants this replica still drives (a task that
   * may be unwinding after losing its lease): never claimed back under them, so one life of a
   * replica never holds two tokens of a grant.
   */
  claim(limit: number, exclude?: readonly string[]): Promise<{ record: GrantRecord; previous: string | null }[]>;
  /**
   * Extend every lease this replica holds (one statement). `lost`: grants another replica took
   * (their writes would be refused from now on); `cancelled`: held grants whose cancel was
   * recorded, perhaps through another replica.
   */
  renew(): Promise<{ renewed: number; lost: string[]; cancelled: string[] }>;
  /** Whether this replica's lease on `id` is still current (checked before a create or terminate). */
  holds(id: string): Promise<boolean>;
  /** Stop renewing `id` (its task ended without finishing it: another replica may take it now). */
  forget(id: string): void;
  /** Give up every lease and role (a clean shutdown): other replicas take the grants at once. */
  releaseAll(): Promise<void>;
  /**
   * Take or keep the leased role `name` (one holder at a time across replicas, fenced like a
   * grant's lease): true while this replica holds it. `fenced` asks only whether it still does.
   */
  role(name: string, opts?: { fenced?: boolean }): Promise<boolean>;
  /**
   * The provider's public key (base64 SPKI) every replica signs with: the first replica records
   * its own; the database's is returned (a replica with another identity.key must not start).
   * SQLite: one replica; returns `publicKey`.
   */
  pinIdentity(publicKey: string): Promise<string>;
  /**
   * Admission, one at a time across replicas: `decide` runs (synchronously) with the grants whose
   * capacity or spend changed since the last admission or ledgerStart() (other replicas' accepts,
   * moves and ends), then the accept it returns commits under the same lock. null: it accepted
   * nothing. SQLite: no other replica; `decide` gets no changes.
   */
  admit(decide: (changes: GrantRecord[]) => NewGrant | null): Promise<AcceptResult | null>;
  /** As admit(), for a grant moving to another backend (a failover): `decide` returns its changes. */
  admitMove(id: string, decide: (changes: GrantRecord[]) => GrantChanges | null): Promise<GrantRecord | null>;
  /**
   * Where the ledgers' change feed starts: call before reading the open grants that rebuild the
   * ledgers, so that admit() later reports everything committed since.
   */
  ledgerStart(): Promise<void>;

  /** Let outstanding writes commit, then close. Later writes are refused. */
  close(): Promise<void>;
}

/** Where the state lives: the `[store]` section of the boot TOML, resolved (the URL read from its secret). */
export type StoreSpec =
  | { kind: "sqlite"; stateDir: string; replicaId?: string }
  | { kind: "postgres"; stateDir: string; url: string; poolSize?: number; replicaId?: string; leaseTtlMs?: number };

/**
 * Open the configured store, refusing a new empty database where state_dir, or the local
 * backend's run directories (`localRunsDir`, config/schema.ts), show that a bridge ran before
 * (state-check.ts: a lost or wrong database would forget every grant).
 */
export async function openCheckedStore(spec: StoreSpec, clock: Clock, localRunsDir: string): Promise<Store> {
  if (spec.kind === "sqlite") {
    const created = assertDatabaseNotLost(spec.stateDir, localRunsDir);
    const s = await openStore(spec, clock);
    created();
    return s;
  }
  let created = () => {};
  const { PostgresStore } = await import("./postgres.js");
  const s = await PostgresStore.open({ ...pgOptions(spec, clock), onNewDatabase: () => (created = assertPgDatabaseNotLost(spec.stateDir, localRunsDir)) });
  created();
  return s;
}

/**
 * Open the configured store: create or migrate its schema (refusing a schema newer than this
 * build), then count what it holds. SQLite is loaded always (it is the default); the PostgreSQL
 * client only when configured.
 */
export async function openStore(spec: StoreSpec, clock: Clock): Promise<Store> {
  if (spec.kind === "sqlite") {
    const { SqliteStore } = await import("./sqlite.js");
    return new SqliteStore(spec.stateDir, clock, spec.replicaId);
  }
  const { PostgresStore } = await import("./postgres.js");
  return PostgresStore.open(pgOptions(spec, clock));
}

function pgOptions(spec: Extract<StoreSpec, { kind: "postgres" }>, clock: Clock) {
  return {
    url: spec.url,
    stateDir: spec.stateDir,
    clock,
    ...(spec.poolSize !== undefined ? { poolSize: spec.poolSize } : {}),
    ...(spec.replicaId !== undefined ? { replicaId: spec.replicaId } : {}),
    ...(spec.leaseTtlMs !== undefined ? { leaseTtlMs: spec.leaseTtlMs } : {}),
  };
}

/**
 * The store the `[store]` section names, its PostgreSQL URL read from `url_file` (relative to the
 * config's directory) or `url_env`. The URL and the password in it are registered as secrets, so
 * logs never carry them; errors name the config key, never the value.
 */
export function storeSpec(cfg: StoreConfig, configDir: string, stateDir: string): StoreSpec {
  const replicaId = cfg.replica_id ?? defaultReplicaId();
  if (cfg.kind === "sqlite") return { kind: "sqlite", stateDir, replicaId };
  const url = readSecret(configDir, "store.url", { file: cfg.url_file, env: cfg.url_env });
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new Error(`store.url_${cfg.url_file !== undefined ? "file" : "env"}: not a URL (expected postgres://USER:PASSWORD@HOST:PORT/DATABASE)`);
  }
  if (parsed.protocol !== "postgres:" && parsed.protocol !== "postgresql:")
    throw new Error(`store.url_${cfg.url_file !== undefined ? "file" : "env"}: the URL must start with postgres:// or postgresql://`);
  if (parsed.password) {
    registerSecret(parsed.password);
    registerSecret(decodeURIComponent(parsed.password));
  }
  return { kind: "postgres", stateDir, url, poolSize: cfg.pool_size, replicaId, leaseTtlMs: cfg.lease_ttl_seconds * 1000 };
}
