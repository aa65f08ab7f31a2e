import Database from "better-sqlite3";
import path from "node:path";
import { PostgresStore } from "../../src/store/postgres.js";
import { SqliteStore } from "../../src/store/sqlite.js";
import type { Store, StoreEngine } from "../../src/store/store.js";
import { systemClock } from "../../src/util/clock.js";
import { startPostgres, stopPostgres } from "./postgres.js";
import { tempDir } from "./tmp.js";

// Every store test runs against both engines: a Place is where one test's store lives (a state
// dir, and with PostgreSQL a database of its own in the test file's cluster), opened as often as
// the test likes (reopen, migrate), with raw SQL on the same database for what a test sets up or
// inspects behind the store's back.

export interface Place {
  engine: StoreEngine;
  dir: string;
  /** The PostgreSQL URL (null on SQLite). */
  url: string | null;
  open(): Promise<Store>;
  /** SQL with `?` placeholders on the store's database; the rows it returns. */
  sql<R = Record<string, unknown>>(query: string, ...params: unknown[]): Promise<R[]>;
  /** The schema version recorded in the database. */
  version(): Promise<number>;
  setVersion(v: number): Promise<void>;
}

export interface Engine {
  name: StoreEngine;
  place(t?: unknown): Promise<Place>;
}

const sqlite: Engine = {
  name: "sqlite",
  async place(t) {
    const dir = tempDir(t);
    const withDb = <T>(fn: (db: Database.Database) => T): T => {
      const db = new Database(path.join(dir, "bridge.db"));
      try {
        return fn(db);
      } finally {
        db.close();
      }
    };
    return {
      engine: "sqlite",
      dir,
      url: null,
      open: async () => new SqliteStore(dir, systemClock),
      sql: async <R>(query: string, ...params: unknown[]) =>
        withDb((db) => {
          const st = db.prepare(query);
          return (st.reader ? st.all(...params) : (st.run(...params), [])) as R[];
        }),
      version: async () => withDb((db) => db.pragma("user_version", { simple: true }) as number),
      setVersion: async (v) => withDb((db) => void db.pragma(`user_version = ${v}`)),
    };
  },
};

const postgres: Engine = {
  name: "postgres",
  async place(t) {
    const cluster = await startPostgres();
    const dir = tempDir(t);
    const url = await cluster.createDatabase();
    const database = new URL(url).pathname.slice(1);
    const sql = async <R>(query: string, ...params: unknown[]) => {
      let i = 0;
      return (await cluster.query(database, query.replace(/\?/g, () => `$${++i}`), params)) as R[];
    };
    return {
      engine: "postgres",
      dir,
      url,
      open: () => PostgresStore.open({ url, stateDir: dir, clock: systemClock }),
      sql,
      version: async () => (await sql<{ version: number }>("SELECT version FROM cb_schema"))[0]?.version ?? 0,
      setVersion: async (v) => void (await sql("UPDATE cb_schema SET version = ?", v)),
    };
  },
};

export const ENGINES: Engine[] = [sqlite, postgres];

/** Stop the test file's PostgreSQL cluster if it was started (register with node:test `after`). */
export function stopEngines(): Promise<void> {
  return stopPostgres();
}
