import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { after, describe, it } from "node:test";
import type { Worker } from "node:worker_threads";
import path from "node:path";
import pg from "pg";
import { grantRequestDigest } from "../../src/domain/index.js";
import { PG_MIGRATIONS } from "../../src/store/pg-schema.js";
import type { PostgresStore } from "../../src/store/postgres.js";
import { SqliteStore } from "../../src/store/sqlite.js";
import { isStoreUnavailable, SCHEMA_VERSION, type Store } from "../../src/store/store.js";
import { ENGINES, stopEngines, type Place } from "../helpers/store-engines.js";

const grant = (id: string) => ({ request_id: id, region: "r", tdx_required: false, cpu_millicores: 1, ram_mib: 1, valid_to: 1 });
const envelope = { image: { url: "file:///x", sha256: "a".repeat(64), format: "bundle" as const } };

/** A grant to accept; another `ramMib` makes another body (digest) for the same request_id. */
const newGrant = (id: string, ramMib = 1) => ({ request_id: id, grant: { ...grant(id), ram_mib: ramMib }, envelope, backend: "local", private_key: null, public_key: null });
const log = (id: string) => ({ request_id: id, exit_reason: "exited" }) as never;

after(stopEngines);

/** Open the place's store, closed after the test. */
async function opened(t: { after(fn: () => unknown): void }, p: Place): Promise<Store> {
  const s = await p.open();
  t.after(() => s.close());
  return s;
}

/** Undo, on a database at the current version, what every migration after `version` added. */
async function downgrade(p: Place, version: number): Promise<void> {
  const undo: Record<number, string[]> = {
    2: ["DROP INDEX compute_logs_jsonl_pending"],
    3: ["ALTER TABLE grants DROP COLUMN routed_backend"],
    4: ["ALTER TABLE grants DROP COLUMN placement"],
    5: ["DROP INDEX grants_created", "ALTER TABLE grants DROP COLUMN price_per_hour", "ALTER TABLE grants DROP COLUMN cost"],
    6: ["ALTER TABLE grants DROP COLUMN attestation_nonce"],
    7: [
      "DROP INDEX grants_ledger",
      ...(p.engine === "postgres" ? ["DROP INDEX grants_open_leases", "DROP SEQUENCE grants_ledger_seq"] : []),
      ...["lease_owner", "lease_token", "lease_expires_at", "ledger_seq"].map((c) => `ALTER TABLE grants DROP COLUMN ${c}`),
      "DROP TABLE roles",
      "DROP TABLE provider_identity",
    ],
  };
  assert.equal(Object.keys(undo).length + 1, SCHEMA_VERSION, "every migration has its undo here");
  for (let v = SCHEMA_VERSION; v > version; v--) for (const q of undo[v]!) await p.sql(q);
  await p.setVersion(version);
}

/** Does the database have this index? */
async function hasIndex(p: Place, name: string): Promise<boolean> {
  const rows = p.engine === "sqlite" ? await p.sql("SELECT name FROM sqlite_master WHERE type = 'index' AND name = ?", name) : await p.sql("SELECT indexname FROM pg_indexes WHERE indexname = ?", name);
  return rows.length === 1;
}

describe("store engines", () => {
  it("have the same schema version: one PostgreSQL migration per SQLite migration", () => {
    assert.equal(PG_MIGRATIONS.length, SCHEMA_VERSION);
  });
});

for (const engine of ENGINES) {
  describe(`store (${engine.name})`, () => {
    it("accepts grants that arrive together and detects duplicates and conflicts among them", async (t) => {
      const p = await engine.place(t);
      const s = await opened(t, p);
      const [a, b, c, d] = await Promise.all([s.accept(newGrant("g1")), s.accept(newGrant("g1")), s.accept(newGrant("g1", 2)), s.accept(newGrant("g2"))]);
      if (engine.name === "sqlite") {
        // One group commit, applied in the order the writes were made.
        assert.deepEqual([a.status, b.status, c.status, d.status], ["created", "duplicate", "conflict", "created"]);
      } else {
        // Concurrent transactions: whichever body was inserted first is the grant; the others are
        // a duplicate of it or a conflict with it.
        const g1 = [a, b, c];
        const created = g1.filter((r) => r.status === "created");
        assert.equal(created.length, 1);
        const body = (r: typeof a) => (r === c ? 2 : 1);
        for (const r of g1) if (r !== created[0]) assert.equal(r.status, body(r) === body(created[0]!) ? "duplicate" : "conflict");
        assert.equal(d.status, "created");
      }
      const g1 = [a, b, c].find((r) => r.status === "created")!;
      // The store digests the body as the listener does (grantRequestDigest).
      assert.equal(g1.record.body_digest, grantRequestDigest({ grant: g1.record.grant, envelope }));
      assert.equal((await s.get("g1"))?.body_digest, g1.record.body_digest);
      assert.equal((await s.nonTerminal()).length, 2);
      // Accepted and routed in one commit, the grants row alone: no audit row, and the history shows it.
      assert.equal(Number((await p.sql<{ n: number }>("SELECT COUNT(*) AS n FROM transitions"))[0]!.n), 0);
      assert.deepEqual((await s.transitions("g1")).map((x) => [x.from_state, x.to_state, x.backend]), [[null, "provisioning", "local"]]);
      assert.equal((await s.transitions("g1"))[0]?.at, g1.record.created_at);
    });

    it("a grant's history starts at the backend it was routed to, after a failover too, and shows an accept audited by an older build once", async (t) => {
      const p = await engine.place(t);
      const s = await opened(t, p);
      await s.accept(newGrant("g1"));
      await s.transition("g1", "provisioning", { backend: "aws", attempts: [{ backend: "local", error_kind: "capacity", message: "full", at: "2026-01-01T00:00:00.000Z" }] });
      await s.transition("g1", "running");
      const history = async (id: string) => (await s.transitions(id)).map((x) => [x.from_state, x.to_state, x.backend]);
      assert.deepEqual(await history("g1"), [
        [null, "provisioning", "local"],
        ["provisioning", "provisioning", "aws"],
        ["provisioning", "running", "aws"],
      ]);
      await s.accept(newGrant("old"));
      await p.sql("INSERT INTO transitions (request_id, from_state, to_state, backend, note, at) VALUES ('old', NULL, 'provisioning', 'local', 'accepted', '2026-01-01T00:00:00.000Z')");
      assert.deepEqual(await history("old"), [[null, "provisioning", "local"]]);
      assert.deepEqual(await s.transitions("nope"), []);
      // Routed to a backend that left the config before provisioning: it moves on without an attempt.
      await s.accept(newGrant("moved"));
      await s.transition("moved", "provisioning", { backend: "gcp" });
      assert.deepEqual(await history("moved"), [
        [null, "provisioning", "local"],
        ["provisioning", "provisioning", "gcp"],
      ]);
      // A row accepted before routed_backend was recorded: the first attempt, else the backend.
      await p.sql("UPDATE grants SET routed_backend = NULL");
      assert.deepEqual((await history("g1"))[0], [null, "provisioning", "local"]);
      assert.deepEqual((await history("moved"))[0], [null, "provisioning", "gcp"]);
    });

    it("is durable across reopen and refuses a newer schema", async (t) => {
      const p = await engine.place(t);
      const s = await p.open();
      await s.accept(newGrant("kept"));
      await s.close();
      assert.equal(await p.version(), SCHEMA_VERSION);
      if (engine.name === "sqlite") assert.equal((await p.sql<{ journal_mode: string }>("PRAGMA journal_mode"))[0]?.journal_mode, "wal");
      const again = await p.open();
      assert.equal((await again.get("kept"))?.state, "provisioning");
      await again.close();
      await p.setVersion(SCHEMA_VERSION + 1);
      await assert.rejects(p.open(), /newer than this build/);
    });

    it("finds the logs still to append to compute-log.jsonl by index; migrates an older database to it", async (t) => {
      const p = await engine.place(t);
      const s = await p.open();
      assert.ok(await hasIndex(p, "compute_logs_jsonl_pending"));
      if (s instanceof SqliteStore) {
        const plan = (s.db.prepare("EXPLAIN QUERY PLAN SELECT request_id, log_json FROM compute_logs WHERE jsonl_pending = 1 ORDER BY rowid").all() as { detail: string }[]).map((r) => r.detail).join("; ");
        assert.match(plan, /USING INDEX compute_logs_jsonl_pending/);
      }
      await s.close();
      // A database from before the index: version 1, no index (nor what later versions add).
      await downgrade(p, 1);
      assert.ok(!(await hasIndex(p, "compute_logs_jsonl_pending")));
      await opened(t, p);
      assert.equal(await p.version(), SCHEMA_VERSION);
      assert.ok(await hasIndex(p, "compute_logs_jsonl_pending"));
    });

    it("migrates a version 2 database: routed_backend is added, its grants keep their history and new ones record it", async (t) => {
      const p = await engine.place(t);
      const s = await p.open();
      await s.accept(newGrant("before"));
      await s.transition("before", "provisioning", { backend: "aws", attempts: [{ backend: "local", error_kind: "capacity", message: "full", at: "2026-01-01T00:00:00.000Z" }] });
      await s.close();
      await downgrade(p, 2);
      const again = await opened(t, p);
      assert.equal(await p.version(), SCHEMA_VERSION);
      const routed = async (id: string) => (await p.sql<{ routed_backend: string | null }>("SELECT routed_backend FROM grants WHERE request_id = ?", id))[0]?.routed_backend;
      assert.equal(await routed("before"), null);
      assert.equal((await again.transitions("before"))[0]?.backend, "local");
      await again.accept(newGrant("after"));
      assert.equal(await routed("after"), "local");
    });

    it("fails only the operation that fails, not the others made with it", async (t) => {
      const s = await opened(t, await engine.place(t));
      const [a, bad, b] = await Promise.allSettled([s.accept(newGrant("g1")), s.transition("nope", "running"), s.accept(newGrant("g2"))]);
      assert.equal(a.status, "fulfilled");
      assert.equal(b.status, "fulfilled");
      assert.equal(bad.status, "rejected");
      assert.match(String((bad as PromiseRejectedResult).reason), /unknown grant nope/);
      assert.deepEqual((await s.nonTerminal()).map((g) => g.request_id).sort(), ["g1", "g2"]);
    });

    it("refuses a transition the state machine does not allow, and changes nothing", async (t) => {
      const s = await opened(t, await engine.place(t));
      await s.accept(newGrant("g1"));
      await s.transition("g1", "running");
      await assert.rejects(s.transition("g1", "completed"), /running -> completed is not an allowed transition/);
      assert.equal((await s.get("g1"))?.state, "running");
      assert.deepEqual(s.countByState(), { "running|local": 1 });
    });

    it("answers a write only after its commit, and reads see it; finish appends the ComputeLog to compute-log.jsonl first", async (t) => {
      const p = await engine.place(t);
      const s = await opened(t, p);
      const pending = s.accept(newGrant("g1"));
      if (engine.name === "sqlite") assert.equal(await s.get("g1"), null, "nothing is visible before the writer commits");
      await pending;
      const running = await s.transition("g1", "running", { note: "up" });
      assert.equal(running.state, "running");
      assert.equal((await s.get("g1"))?.state, "running");
      await s.transition("g1", "terminating");
      const done = await s.finish("g1", "completed", log("g1"), {}, true);
      assert.equal(done.state, "completed");
      assert.deepEqual(await s.computeLog("g1"), log("g1"));
      // The jsonl line is appended (and fsync'd) before finish() resolves; the log is queued for the market.
      assert.equal(readFileSync(path.join(p.dir, "compute-log.jsonl"), "utf8"), `${JSON.stringify(log("g1"))}\n`);
      assert.equal(await s.outboxSize(), 1);
      assert.deepEqual((await s.transitions("g1")).map((x) => x.to_state), ["provisioning", "running", "terminating", "completed"]);
      assert.deepEqual((await p.sql<{ jsonl_pending: number }>("SELECT jsonl_pending FROM compute_logs")).map((r) => Number(r.jsonl_pending)), [0]);
    });

    it("keeps the market outbox: a newer card replaces an undelivered one, an ack removes only what was sent, a retry waits", async (t) => {
      const s = await opened(t, await engine.place(t));
      await s.enqueue("card", "card", "v1");
      const [v1] = await s.dueOutbox(10);
      assert.equal(v1?.payload, "v1");
      await s.enqueue("card", "card", "v2");
      await s.ackOutbox(v1!.id, "v1");
      assert.deepEqual((await s.dueOutbox(10)).map((i) => i.payload), ["v2"], "v2 arrived after v1 was sent: it stays");
      const [v2] = await s.dueOutbox(10);
      const later = Date.now() + 60_000;
      await s.retryOutbox(v2!.id, later, "HTTP 503");
      assert.deepEqual(await s.dueOutbox(10), []);
      assert.equal(await s.nextOutboxAt(), later);
      assert.equal(await s.outboxSize(), 1);
      await s.ackOutbox(v2!.id, "v2");
      assert.equal(await s.outboxSize(), 0);
      assert.equal(await s.nextOutboxAt(), null);
    });

    it("lists by state and page, and the grants accepted since a time", async (t) => {
      const s = await opened(t, await engine.place(t));
      for (const id of ["a", "b", "c"]) await s.accept(newGrant(id));
      await s.transition("b", "running");
      const all = await s.list({ limit: 2 });
      assert.deepEqual(all.map((r) => r.request_id), ["a", "b"]);
      assert.deepEqual((await s.list({ limit: 2, after: all[1]!.seq })).map((r) => r.request_id), ["c"]);
      assert.deepEqual((await s.list({ state: "running", limit: 10 })).map((r) => r.request_id), ["b"]);
      assert.equal((await s.acceptedSince("2000-01-01T00:00:00.000Z")).length, 3);
      assert.equal((await s.acceptedSince("2999-01-01T00:00:00.000Z")).length, 0);
      const cancelled = await s.requestCancel("a");
      assert.equal(cancelled?.cancel_requested, true);
      assert.equal(await s.requestCancel("nope"), null);
    });

    it("keeps the counts by state and backend that metrics read, without querying every grant, across writes, failures and reopen", async (t) => {
      const p = await engine.place(t);
      const s = await p.open();
      const fromTable = async () =>
        Object.fromEntries((await p.sql<{ state: string; backend: string | null; n: number }>("SELECT state, backend, COUNT(*) AS n FROM grants GROUP BY state, backend")).map((r) => [`${r.state}|${r.backend ?? ""}`, Number(r.n)]));
      await Promise.all([s.accept(newGrant("g1")), s.accept(newGrant("g1")), s.accept(newGrant("g1", 2)), s.accept(newGrant("g2")), s.accept(newGrant("g3"))]);
      assert.deepEqual(s.countByState(), { "provisioning|local": 3 }, "a duplicate or a conflict counts nothing");
      await s.transition("g1", "running");
      await s.transition("g2", "provisioning", { backend: "aws" });
      await assert.rejects(s.transition("nope", "running"), /unknown grant nope/);
      await s.transition("g3", "terminating");
      await s.finish("g3", "failed", log("g3"));
      const expected = { "running|local": 1, "provisioning|aws": 1, "failed|local": 1 };
      const queries = spyQueries(s);
      assert.deepEqual(s.countByState(), expected);
      assert.deepEqual(queries.stop(), [], "a scrape runs no query");
      assert.deepEqual(s.countByState(), await fromTable());
      await s.close();
      const again = await opened(t, p);
      assert.deepEqual(again.countByState(), expected, "counted once at open");
    });

    it("close() commits what was queued before it; later writes are refused", async (t) => {
      const p = await engine.place(t);
      const s = await p.open();
      const queued = s.accept(newGrant("late"));
      await s.close();
      assert.equal((await queued).status, "created");
      await assert.rejects(s.accept(newGrant("after")), /state database is closed/);
      const again = await opened(t, p);
      assert.equal((await again.get("late"))?.state, "provisioning");
    });

    it("an idle store does not keep the process alive", async (t) => {
      const p = await engine.place(t);
      const src = (f: string) => JSON.stringify(new URL(`../../src/${f}`, import.meta.url).href);
      const open =
        p.url === null
          ? `const { SqliteStore } = await import(${src("store/sqlite.ts")}); const s = new SqliteStore(${JSON.stringify(p.dir)}, systemClock);`
          : `const { PostgresStore } = await import(${src("store/postgres.ts")}); const s = await PostgresStore.open({ url: process.env.CB_TEST_PG_URL, stateDir: ${JSON.stringify(p.dir)}, clock: systemClock });`;
      const script = `
        import { systemClock } from ${src("util/clock.ts")};
        ${open}
        const r = await s.accept(${JSON.stringify(newGrant("x"))});
        console.log(r.status);
      `;
      // Generous: loading tsx and the modules alone has taken over 30 s on a loaded 2-core machine.
      const out = await new Promise<string>((resolve, reject) =>
        execFile(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], { timeout: 90_000, env: { ...process.env, CB_TEST_PG_URL: p.url ?? "" } }, (err, stdout, stderr) =>
          err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout),
        ),
      );
      assert.equal(out.trim(), "created");
    });
  });

  describe(`store (${engine.name}): attestation nonce (migration 6)`, () => {
    const tdx = (id: string, nonce?: string) => ({
      request_id: id,
      grant: { ...grant(id), tdx_required: true },
      envelope: nonce ? { ...envelope, attestation_nonce: nonce } : envelope,
      backend: "gcp",
      private_key: null,
      public_key: null,
    });

    it("records the requester's nonce, a fresh random one for a TDX grant without, none for other grants; durable across reopen", async (t) => {
      const p = await engine.place(t);
      const s = await p.open();
      const mine = await s.accept(tdx("mine", "ab".repeat(20)));
      const a = await s.accept(tdx("rand-a"));
      const b = await s.accept(tdx("rand-b"));
      const plain = await s.accept(newGrant("plain"));
      assert.equal(mine.record.attestation_nonce, "ab".repeat(20));
      assert.match(a.record.attestation_nonce!, /^[0-9a-f]{64}$/);
      assert.notEqual(a.record.attestation_nonce, b.record.attestation_nonce);
      assert.equal(plain.record.attestation_nonce, null);
      // The bridge's nonce is not part of the body: a re-post is still the same grant.
      assert.equal((await s.accept(tdx("rand-a"))).status, "duplicate");
      await s.close();
      const again = await opened(t, p);
      assert.equal((await again.get("rand-a"))?.attestation_nonce, a.record.attestation_nonce);
      assert.equal((await again.get("mine"))?.attestation_nonce, "ab".repeat(20));
      assert.equal((await again.get("plain"))?.attestation_nonce, null);
    });

    it("migrates a database without the column: its grants have none, new ones record theirs", async (t) => {
      const p = await engine.place(t);
      const s = await p.open();
      await s.accept(newGrant("old"));
      await s.close();
      await downgrade(p, SCHEMA_VERSION - 1);
      const again = await opened(t, p);
      assert.equal(await p.version(), SCHEMA_VERSION);
      assert.equal((await again.get("old"))?.attestation_nonce, null);
      assert.match((await again.accept(tdx("new"))).record.attestation_nonce!, /^[0-9a-f]{64}$/);
    });
  });
}

describe("store (sqlite): the writer thread", () => {
  it("when the writer thread dies, every pending and later write fails and `failed` says why", async (t) => {
    const p = await ENGINES.find((e) => e.name === "sqlite")!.place(t);
    const s = (await opened(t, p)) as SqliteStore;
    await s.accept(newGrant("before"));
    const inFlight = s.accept(newGrant("lost"));
    await (s as unknown as { worker: Worker }).worker.terminate();
    await assert.rejects(inFlight, /state database writer failed/);
    assert.match((await s.failed).message, /writer thread exited/);
    await assert.rejects(s.transition("before", "running"), /state database writer failed/);
    assert.equal((await s.get("before"))?.state, "provisioning", "reads keep working");
  });
});

describe("store (postgres): connections", () => {
  it("connections cut by the server: a transaction cut before its commit runs again on a new connection, once; reads and writes reconnect", async (t) => {
    const p = await ENGINES.find((e) => e.name === "postgres")!.place(t);
    const s = await opened(t, p);
    await s.accept(newGrant("before"));
    const database = new URL(p.url!).pathname.slice(1);
    // Every connection of the store ended by the server (as a restart or a failover does).
    const cut = async () => {
      const rows = await p.sql<{ n: number }>("SELECT COUNT(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE datname = ? AND pid <> pg_backend_pid()", database);
      return Number(rows[0]!.n);
    };
    // A write held open inside a transaction (a lock on its row) when the cut comes.
    const blocker = new pg.Client({ connectionString: p.url! });
    blocker.on("error", () => undefined); // it is cut too
    await blocker.connect();
    t.after(() => blocker.end().catch(() => undefined));
    await blocker.query("BEGIN");
    await blocker.query("SELECT * FROM grants WHERE request_id = 'before' FOR UPDATE");
    const blocked = s.transition("before", "running").then(
      () => null,
      (e: unknown) => e,
    );
    // Wait until the store's transaction waits for the lock (observable in pg_stat_activity).
    for (;;) {
      const waiting = await p.sql("SELECT 1 FROM pg_stat_activity WHERE datname = ? AND wait_event_type = 'Lock'", database);
      if (waiting.length > 0) break;
      await new Promise((r) => setImmediate(r));
    }
    assert.ok((await cut()) >= 2);
    const moved = await blocked;
    assert.ok(!(moved instanceof Error), `the cut transaction ran again: ${String(moved)}`);
    assert.equal((await s.get("before"))?.state, "running");
    assert.deepEqual((await s.transitions("before")).map((x) => x.to_state), ["provisioning", "running"], "written once");
    await cut();
    assert.equal((await s.accept(newGrant("after"))).status, "created", "a write after the next cut reconnects");
    assert.equal((await s.get("after"))?.state, "provisioning");
    assert.equal(typeof (s as PostgresStore).schemaVersion, "function");
    assert.equal(await (s as PostgresStore).schemaVersion(), SCHEMA_VERSION);
  });

  it("a database outage: writes and reads fail as unavailable and say so for /readyz; once it is back they succeed and nothing was lost", async (t) => {
    const p = await ENGINES.find((e) => e.name === "postgres")!.place(t);
    await (await p.open()).close(); // the schema, created by the cluster's superuser
    const database = new URL(p.url!).pathname.slice(1);
    // The store as an ordinary role (a connection limit does not apply to superusers).
    const role = `app_${database}`;
    await p.sql(`CREATE ROLE ${role} LOGIN PASSWORD 'app-pw-0123456789'`);
    await p.sql(`GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO ${role}`);
    await p.sql(`GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO ${role}`);
    const u = new URL(p.url!);
    u.username = role;
    u.password = "app-pw-0123456789";
    const { PostgresStore } = await import("../../src/store/postgres.js");
    const { systemClock } = await import("../../src/util/clock.js");
    const s = await PostgresStore.open({ url: u.href, stateDir: p.dir, clock: systemClock, connectTimeoutMs: 2000 });
    t.after(() => s.close());
    await s.accept(newGrant("kept"));
    assert.equal(s.unavailable(), null);
    // No new connections to the database, and the open ones ended: an outage as the store sees it.
    await p.sql(`ALTER DATABASE ${database} CONNECTION LIMIT 0`);
    t.after(() => p.sql(`ALTER DATABASE ${database} CONNECTION LIMIT -1`).catch(() => undefined));
    await p.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ? AND pid <> pg_backend_pid()", database);
    const write = await s.accept(newGrant("during")).then(
      () => null,
      (e: unknown) => e,
    );
    assert.ok(write && isStoreUnavailable(write), `the write failed as unavailable: ${String(write)}`);
    await assert.rejects(s.get("kept"), (e: unknown) => isStoreUnavailable(e));
    assert.equal(s.unavailable(), "the state database cannot be reached");
    await p.sql(`ALTER DATABASE ${database} CONNECTION LIMIT -1`);
    assert.equal((await s.get("kept"))?.state, "provisioning");
    assert.equal(s.unavailable(), null, "ready again once it answers");
    assert.equal((await s.accept(newGrant("after"))).status, "created");
    assert.equal(await s.get("during"), null, "the failed write wrote nothing");
  });

  it("a database that cannot be reached fails the open as unavailable, naming no password", async (t) => {
    const p = await ENGINES.find((e) => e.name === "postgres")!.place(t);
    const { PostgresStore } = await import("../../src/store/postgres.js");
    const { systemClock } = await import("../../src/util/clock.js");
    const u = new URL(p.url!);
    u.port = "1"; // nothing listens on port 1
    const err = await PostgresStore.open({ url: u.href, stateDir: p.dir, clock: systemClock, connectTimeoutMs: 2000 }).then(
      () => null,
      (e: unknown) => e as Error,
    );
    assert.ok(err);
    assert.ok(isStoreUnavailable(err), String(err));
    assert.ok(!String(err.message).includes(decodeURIComponent(u.password)), "the error carries no password");
  });
});

/** The SQL a store runs from now until stop() (both engines). */
function spyQueries(s: Store): { stop(): string[] } {
  const seen: string[] = [];
  if (s instanceof SqliteStore) {
    const prepare = s.db.prepare.bind(s.db);
    s.db.prepare = ((sql: string) => (seen.push(sql), prepare(sql))) as typeof s.db.prepare;
    return { stop: () => ((s.db.prepare = prepare), seen) };
  }
  const pool = (s as unknown as { pool: pg.Pool }).pool;
  const query = pool.query.bind(pool);
  const connect = pool.connect.bind(pool);
  pool.query = ((...args: Parameters<typeof query>) => (seen.push(String(args[0])), query(...args))) as typeof pool.query;
  pool.connect = ((...args: Parameters<typeof connect>) => (seen.push("connect"), connect(...args))) as typeof pool.connect;
  return {
    stop: () => {
      pool.query = query;
      pool.connect = connect;
      return seen;
    },
  };
}
