import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import type { Worker } from "node:worker_threads";
import Database from "better-sqlite3";
import path from "node:path";
import { grantRequestDigest } from "../../src/domain/index.js";
import { SCHEMA_VERSION, Store } from "../../src/store/store.js";
import { systemClock } from "../../src/util/clock.js";
import { tempDir } from "../helpers/tmp.js";

const grant = (id: string) => ({ request_id: id, region: "r", tdx_required: false, cpu_millicores: 1, ram_mib: 1, valid_to: 1 });
const envelope = { image: { url: "file:///x", sha256: "a".repeat(64), format: "bundle" as const } };

/** A grant to accept; another `ramMib` makes another body (digest) for the same request_id. */
const newGrant = (id: string, ramMib = 1) => ({ request_id: id, grant: { ...grant(id), ram_mib: ramMib }, envelope, backend: "local", private_key: null, public_key: null });
const log = (id: string) => ({ request_id: id, exit_reason: "exited" }) as never;
/** The writer thread, to stop it the way a crash of that thread would. */
const writerOf = (s: Store) => (s as unknown as { worker: Worker }).worker;

describe("store", () => {
  it("group-commits accepts that arrive together and detects duplicates and conflicts in one batch", async (t) => {
    const s = new Store(tempDir(t), systemClock);
    t.after(() => s.close());
    const [a, b, c, d] = await Promise.all([s.accept(newGrant("g1")), s.accept(newGrant("g1")), s.accept(newGrant("g1", 2)), s.accept(newGrant("g2"))]);
    assert.deepEqual([a.status, b.status, c.status, d.status], ["created", "duplicate", "conflict", "created"]);
    // The writer digests the body as the listener does (grantRequestDigest).
    assert.equal(a.record.body_digest, grantRequestDigest({ grant: newGrant("g1").grant, envelope }));
    assert.equal(s.get("g1")?.body_digest, a.record.body_digest);
    assert.equal(s.nonTerminal().length, 2);
    // Accepted and routed in one commit, the grants row alone: no audit row, and the history shows it.
    assert.equal((s.db.prepare("SELECT COUNT(*) n FROM transitions").get() as { n: number }).n, 0);
    assert.deepEqual(s.transitions("g1").map((x) => [x.from_state, x.to_state, x.backend]), [[null, "provisioning", "local"]]);
    assert.equal(s.transitions("g1")[0]?.at, a.record.created_at);
  });

  it("a grant's history starts at the backend it was routed to, after a failover too, and shows an accept audited by an older build once", async (t) => {
    const s = new Store(tempDir(t), systemClock);
    t.after(() => s.close());
    await s.accept(newGrant("g1"));
    await s.transition("g1", "provisioning", { backend: "aws", attempts: [{ backend: "local", error_kind: "capacity", message: "full", at: "2026-01-01T00:00:00.000Z" }] });
    await s.transition("g1", "running");
    const history = (id: string) => s.transitions(id).map((x) => [x.from_state, x.to_state, x.backend]);
    assert.deepEqual(history("g1"), [
      [null, "provisioning", "local"],
      ["provisioning", "provisioning", "aws"],
      ["provisioning", "running", "aws"],
    ]);
    await s.accept(newGrant("old"));
    s.db.prepare("INSERT INTO transitions (request_id, from_state, to_state, backend, note, at) VALUES ('old', NULL, 'provisioning', 'local', 'accepted', '2026-01-01T00:00:00.000Z')").run();
    assert.deepEqual(history("old"), [[null, "provisioning", "local"]]);
    assert.deepEqual(s.transitions("nope"), []);
    // Routed to a backend that left the config before provisioning: it moves on without an attempt.
    await s.accept(newGrant("moved"));
    await s.transition("moved", "provisioning", { backend: "gcp" });
    assert.deepEqual(history("moved"), [
      [null, "provisioning", "local"],
      ["provisioning", "provisioning", "gcp"],
    ]);
    // A row accepted before routed_backend was recorded: the first attempt, else the backend.
    s.db.prepare("UPDATE grants SET routed_backend = NULL").run();
    assert.deepEqual(history("g1")[0], [null, "provisioning", "local"]);
    assert.deepEqual(history("moved")[0], [null, "provisioning", "gcp"]);
  });

  it("is durable across reopen and refuses a newer schema", async (t) => {
    const dir = tempDir(t);
    const s = new Store(dir, systemClock);
    s.db.exec("SELECT 1");
    await s.close();
    const db = new Database(path.join(dir, "bridge.db"));
    assert.equal(db.pragma("user_version", { simple: true }), SCHEMA_VERSION);
    assert.equal(db.pragma("journal_mode", { simple: true }), "wal");
    db.pragma(`user_version = ${SCHEMA_VERSION + 1}`);
    db.close();
    assert.throws(() => new Store(dir, systemClock), /newer than this build/);
  });

  it("finds the logs still to append to compute-log.jsonl by index, not by scanning every log; migrates an older database to it", async (t) => {
    const dir = tempDir(t);
    const plan = (db: Database.Database) =>
      (db.prepare("EXPLAIN QUERY PLAN SELECT request_id, log_json FROM compute_logs WHERE jsonl_pending = 1 ORDER BY rowid").all() as { detail: string }[]).map((r) => r.detail).join("; ");
    const s = new Store(dir, systemClock);
    assert.match(plan(s.db), /USING INDEX compute_logs_jsonl_pending/);
    // A database from before the index: version 1, no index (nor what later versions add).
    downgrade(s.db, 1);
    await s.close();
    const again = new Store(dir, systemClock);
    t.after(() => again.close());
    assert.equal(again.db.pragma("user_version", { simple: true }), SCHEMA_VERSION);
    assert.match(plan(again.db), /USING INDEX compute_logs_jsonl_pending/);
  });

  it("migrates a version 2 database: routed_backend is added, its grants keep their history and new ones record it", async (t) => {
    const dir = tempDir(t);
    const s = new Store(dir, systemClock);
    await s.accept(newGrant("before"));
    await s.transition("before", "provisioning", { backend: "aws", attempts: [{ backend: "local", error_kind: "capacity", message: "full", at: "2026-01-01T00:00:00.000Z" }] });
    downgrade(s.db, 2);
    await s.close();
    const again = new Store(dir, systemClock);
    t.after(() => again.close());
    assert.equal(again.db.pragma("user_version", { simple: true }), SCHEMA_VERSION);
    assert.equal((again.db.prepare("SELECT routed_backend FROM grants WHERE request_id = 'before'").get() as { routed_backend: string | null }).routed_backend, null);
    assert.equal(again.transitions("before")[0]?.backend, "local");
    await again.accept(newGrant("after"));
    assert.equal((again.db.prepare("SELECT routed_backend FROM grants WHERE request_id = 'after'").get() as { routed_backend: string | null }).routed_backend, "local");
  });

  it("fails only the operation that fails, not the rest of its batch", async (t) => {
    const s = new Store(tempDir(t), systemClock);
    t.after(() => s.close());
    const [a, bad, b] = await Promise.allSettled([s.accept(newGrant("g1")), s.transition("nope", "running"), s.accept(newGrant("g2"))]);
    assert.equal(a.status, "fulfilled");
    assert.equal(b.status, "fulfilled");
    assert.equal(bad.status, "rejected");
    assert.match(String((bad as PromiseRejectedResult).reason), /unknown grant nope/);
    assert.deepEqual(s.nonTerminal().map((g) => g.request_id), ["g1", "g2"]);
  });

  it("answers a write only after its commit, and reads on this thread see it", async (t) => {
    const dir = tempDir(t);
    const s = new Store(dir, systemClock);
    t.after(() => s.close());
    const pending = s.accept(newGrant("g1"));
    assert.equal(s.get("g1"), null, "nothing is visible before the writer commits");
    await pending;
    const running = await s.transition("g1", "running", { note: "up" });
    assert.equal(running.state, "running");
    assert.equal(s.get("g1")?.state, "running");
    await s.transition("g1", "terminating");
    const done = await s.finish("g1", "completed", log("g1"), {}, true);
    assert.equal(done.state, "completed");
    assert.deepEqual(s.computeLog("g1"), log("g1"));
    // The jsonl line is appended (and fsync'd) before finish() resolves; the log is queued for the market.
    assert.equal(readFileSync(path.join(dir, "compute-log.jsonl"), "utf8"), `${JSON.stringify(log("g1"))}\n`);
    assert.equal(s.outboxSize(), 1);
    assert.deepEqual(s.transitions("g1").map((x) => x.to_state), ["provisioning", "running", "terminating", "completed"]);
  });

  it("keeps the counts by state and backend that metrics read, without querying every grant, across writes, failures and reopen", async (t) => {
    const dir = tempDir(t);
    const s = new Store(dir, systemClock);
    const fromTable = (db: Database.Database) =>
      Object.fromEntries((db.prepare("SELECT state, backend, COUNT(*) n FROM grants GROUP BY state, backend").all() as { state: string; backend: string | null; n: number }[]).map((r) => [`${r.state}|${r.backend ?? ""}`, r.n]));
    await Promise.all([s.accept(newGrant("g1")), s.accept(newGrant("g1")), s.accept(newGrant("g1", 2)), s.accept(newGrant("g2")), s.accept(newGrant("g3"))]);
    assert.deepEqual(s.countByState(), { "provisioning|local": 3 }, "a duplicate or a conflict counts nothing");
    await s.transition("g1", "running");
    await s.transition("g2", "provisioning", { backend: "aws" });
    await assert.rejects(s.transition("nope", "running"), /unknown grant nope/);
    await s.transition("g3", "terminating");
    await s.finish("g3", "failed", log("g3"));
    const expected = { "running|local": 1, "provisioning|aws": 1, "failed|local": 1 };
    const queries: string[] = [];
    const prepare = s.db.prepare.bind(s.db);
    s.db.prepare = ((sql: string) => (queries.push(sql), prepare(sql))) as typeof s.db.prepare;
    assert.deepEqual(s.countByState(), expected);
    assert.deepEqual(queries, [], "a scrape runs no query");
    s.db.prepare = prepare;
    assert.deepEqual(s.countByState(), fromTable(s.db));
    await s.close();
    const again = new Store(dir, systemClock);
    t.after(() => again.close());
    assert.deepEqual(again.countByState(), expected, "counted once at open");
  });

  it("close() commits what was queued before it; later writes are refused", async (t) => {
    const dir = tempDir(t);
    const s = new Store(dir, systemClock);
    const queued = s.accept(newGrant("late"));
    await s.close();
    assert.equal((await queued).status, "created");
    await assert.rejects(s.accept(newGrant("after")), /state database is closed/);
    const again = new Store(dir, systemClock);
    t.after(() => again.close());
    assert.equal(again.get("late")?.state, "provisioning");
  });

  it("when the writer thread dies, every pending and later write fails and `failed` says why", async (t) => {
    const s = new Store(tempDir(t), systemClock);
    t.after(() => s.close());
    await s.accept(newGrant("before"));
    const inFlight = s.accept(newGrant("lost"));
    await writerOf(s).terminate();
    await assert.rejects(inFlight, /state database writer failed/);
    assert.match((await s.failed).message, /writer thread exited/);
    await assert.rejects(s.transition("before", "running"), /state database writer failed/);
    assert.equal(s.get("before")?.state, "provisioning", "reads keep working");
  });

  it("an idle store does not keep the process alive", async (t) => {
    const dir = tempDir(t);
    const script = `
      import { Store } from ${JSON.stringify(new URL("../../src/store/store.ts", import.meta.url).href)};
      import { systemClock } from ${JSON.stringify(new URL("../../src/util/clock.ts", import.meta.url).href)};
      const s = new Store(${JSON.stringify("__DIR__")}, systemClock);
      const r = await s.accept(${JSON.stringify(newGrant("x"))});
      console.log(r.status);
    `;
    const out = await new Promise<string>((resolve, reject) =>
      execFile(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script.replace("__DIR__", dir)], { timeout: 30_000 }, (err, stdout, stderr) =>
        err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout),
      ),
    );
    assert.equal(out.trim(), "created");
  });
});

/** Undo, on a database at the current version, what every migration after `version` added. */
function downgrade(db: Database.Database, version: number): void {
  const undo: Record<number, string> = {
    2: "DROP INDEX compute_logs_jsonl_pending",
    3: "ALTER TABLE grants DROP COLUMN routed_backend",
    4: "ALTER TABLE grants DROP COLUMN placement",
    5: "DROP INDEX grants_created; ALTER TABLE grants DROP COLUMN price_per_hour; ALTER TABLE grants DROP COLUMN cost",
    6: "ALTER TABLE grants DROP COLUMN attestation_nonce",
  };
  assert.equal(Object.keys(undo).length + 1, SCHEMA_VERSION, "every migration has its undo here");
  for (let v = SCHEMA_VERSION; v > version; v--) db.exec(undo[v]!);
  db.pragma(`user_version = ${version}`);
}

describe("store: attestation nonce (migration 6)", () => {
  const tdx = (id: string, nonce?: string) => ({
    request_id: id,
    grant: { ...grant(id), tdx_required: true },
    envelope: nonce ? { ...envelope, attestation_nonce: nonce } : envelope,
    backend: "gcp",
    private_key: null,
    public_key: null,
  });

  it("records the requester's nonce, a fresh random one for a TDX grant without, none for other grants; durable across reopen", async (t) => {
    const dir = tempDir(t);
    const s = new Store(dir, systemClock);
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
    const again = new Store(dir, systemClock);
    t.after(() => again.close());
    assert.equal(again.get("rand-a")?.attestation_nonce, a.record.attestation_nonce);
    assert.equal(again.get("mine")?.attestation_nonce, "ab".repeat(20));
    assert.equal(again.get("plain")?.attestation_nonce, null);
  });

  it("migrates a database without the column: its grants have none, new ones record theirs", async (t) => {
    const dir = tempDir(t);
    const s = new Store(dir, systemClock);
    await s.accept(newGrant("old"));
    s.db.exec("ALTER TABLE grants DROP COLUMN attestation_nonce");
    s.db.pragma(`user_version = ${SCHEMA_VERSION - 1}`);
    await s.close();
    const again = new Store(dir, systemClock);
    t.after(() => again.close());
    assert.equal(again.db.pragma("user_version", { simple: true }), SCHEMA_VERSION);
    assert.equal(again.get("old")?.attestation_nonce, null);
    assert.match((await again.accept(tdx("new"))).record.attestation_nonce!, /^[0-9a-f]{64}$/);
  });
});
