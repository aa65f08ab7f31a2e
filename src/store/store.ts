import { readSecret, registerSecret } from "../config/secrets.js";
import type { StoreConfig } from "../config/schema.js";
import type { ComputeLog, GrantState, ProvisionedInstance } from "../domain/index.js";
import type { Clock } from "../util/clock.js";
import { assertDatabaseNotLost, assertPgDatabaseNotLost } from "./state-check.js";
import type { AcceptResult, Attempt, GrantRecord, NewGrant, OutboxItem, Outcome } from "./schema.js";

export { SCHEMA_VERSION } from "./schema.js";
export { isStorageFull, isStoreUnavailable } from "./errors.js";
export type { AcceptResult, Attempt, GrantRecord, NewGrant, OutboxItem, Outcome } from "./schema.js";

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

  /** Let outstanding writes commit, then close. Later writes are refused. */
  close(): Promise<void>;
}

/** Where the state lives: the `[store]` section of the boot TOML, resolved (the URL read from its secret). */
export type StoreSpec = { kind: "sqlite"; stateDir: string } | { kind: "postgres"; stateDir: string; url: string; poolSize?: number };

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
  const s = await PostgresStore.open({ url: spec.url, stateDir: spec.stateDir, clock, ...(spec.poolSize !== undefined ? { poolSize: spec.poolSize } : {}), onNewDatabase: () => (created = assertPgDatabaseNotLost(spec.stateDir, localRunsDir)) });
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
    return new SqliteStore(spec.stateDir, clock);
  }
  const { PostgresStore } = await import("./postgres.js");
  return PostgresStore.open({ url: spec.url, stateDir: spec.stateDir, clock, ...(spec.poolSize !== undefined ? { poolSize: spec.poolSize } : {}) });
}

/**
 * The store the `[store]` section names, its PostgreSQL URL read from `url_file` (relative to the
 * config's directory) or `url_env`. The URL and the password in it are registered as secrets, so
 * logs never carry them; errors name the config key, never the value.
 */
export function storeSpec(cfg: StoreConfig, configDir: string, stateDir: string): StoreSpec {
  if (cfg.kind === "sqlite") return { kind: "sqlite", stateDir };
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
  return { kind: "postgres", stateDir, url, poolSize: cfg.pool_size };
}
