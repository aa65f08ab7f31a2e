import type { Almanac } from "../../src/domain/index.js";
import type { Fleet } from "../../src/fleet/fleet.js";
import { GrantManager } from "../../src/lifecycle/manager.js";
import { SqliteStore } from "../../src/store/sqlite.js";
import type { Store } from "../../src/store/store.js";
import { systemClock, type Clock } from "../../src/util/clock.js";
import { Identity } from "../../src/util/identity.js";
import { createLogger, type Logger } from "../../src/util/logger.js";

export interface TestBridgeOptions {
  stateDir: string;
  fleet: Fleet;
  almanac: Almanac;
  providerId: string;
  log?: Logger;
  /** Persist the identity in stateDir (restart tests) instead of a throwaway one. */
  persistentIdentity?: boolean;
  retryBaseMs?: number;
  retryCapMs?: number;
  expiryGraceMs?: number;
  /** The manager's clock (sleeps, valid_to); the store stamps rows with the system clock. */
  clock?: Clock;
  provisionConcurrency?: number;
}

/**
 * GrantManager + Store over a Fleet, wired as src/daemon.ts wires them; closed after the test.
 * The store is SQLite in `stateDir` unless `o.store` opens another (a PostgreSQL one).
 */
export async function testBridge(t: { after: (fn: () => unknown) => void }, o: TestBridgeOptions & { store?: Store }) {
  const store: Store = o.store ?? new SqliteStore(o.stateDir, systemClock);
  const manager = await GrantManager.open({
    store,
    fleet: o.fleet,
    almanac: o.almanac,
    identity: o.persistentIdentity ? Identity.loadOrCreate(o.stateDir) : Identity.ephemeral(),
    log: o.log ?? createLogger("silent"),
    clock: o.clock ?? systemClock,
    providerId: o.providerId,
    ...(o.provisionConcurrency !== undefined ? { provisionConcurrency: o.provisionConcurrency } : {}),
    maxAttempts: 3,
    retryBaseMs: o.retryBaseMs ?? 10,
    retryCapMs: o.retryCapMs ?? 100,
    expiryGraceMs: o.expiryGraceMs ?? 2000,
  });
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    await manager.shutdown(2000);
    await store.close();
  };
  t.after(close);
  return { store, fleet: o.fleet, manager, close };
}
