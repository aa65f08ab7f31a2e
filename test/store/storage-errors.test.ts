import assert from "node:assert/strict";
import path from "node:path";
import { rmSync } from "node:fs";
import { after, describe, it } from "node:test";
import { isStorageFull, isStoreUnavailable } from "../../src/store/store.js";
import { SqliteStore as Store } from "../../src/store/sqlite.js";
import { classifyStoreError } from "../../src/listener/store-errors.js";
import { systemClock } from "../../src/util/clock.js";
import { fillDisk, mountTmpfs } from "../helpers/tmpfs.js";
import { tempDir } from "../helpers/tmp.js";
import { startPostgres, stopPostgres } from "../helpers/postgres.js";
import { PostgresStore } from "../../src/store/postgres.js";
import { chmodSync, chownSync } from "node:fs";
import { execFileSync } from "node:child_process";

after(stopPostgres);

const envelope = { image: { url: "https://example.com/x", sha256: "a".repeat(64), format: "bundle" as const } };
const newGrant = (id: string) => ({
  request_id: id,
  grant: { request_id: id, region: "r", tdx_required: false, cpu_millicores: 1, ram_mib: 1, valid_to: 1 },
  envelope: { ...envelope, env: { PAD: "x".repeat(4000) } },
  backend: "local",
  private_key: null,
  public_key: null,
});

describe("store write errors", () => {
  it("classifies SQLite, fs, writer-thread and PostgreSQL errors", () => {
    const sqlite = (code: string, message: string) => Object.assign(new Error(message), { name: "SqliteError", code });
    assert.ok(isStorageFull(sqlite("SQLITE_FULL", "database or disk is full")));
    assert.ok(isStorageFull(Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" })));
    assert.ok(isStorageFull(new Error("state database writer failed: database or disk is full")), "by message when the code was lost");
    assert.ok(isStorageFull(new Error("outer", { cause: sqlite("SQLITE_FULL", "x") })), "through a cause");
    assert.ok(isStoreUnavailable(sqlite("SQLITE_FULL", "database or disk is full")), "full is also unavailable");
    assert.ok(isStoreUnavailable(sqlite("SQLITE_IOERR_WRITE", "disk I/O error")));
    assert.ok(isStoreUnavailable(sqlite("SQLITE_BUSY", "database is locked")));
    assert.ok(isStoreUnavailable(sqlite("SQLITE_READONLY", "attempt to write a readonly database")));
    assert.ok(isStoreUnavailable(new Error("state database writer failed: the writer thread exited with code 1")));
    assert.ok(isStoreUnavailable(new Error("state database is closed")));
    assert.ok(!isStorageFull(sqlite("SQLITE_IOERR_WRITE", "disk I/O error")));
    // PostgreSQL (pg): SQLSTATEs, socket errors, pg's own connection messages.
    const pgErr = (code: string, message: string) => Object.assign(new Error(message), { name: "error", code });
    assert.ok(isStorageFull(pgErr("53100", "could not extend file: No space left on device")));
    for (const e of [
      pgErr("57P01", "terminating connection due to administrator command"),
      pgErr("08006", "connection failure"),
      pgErr("25006", "cannot execute INSERT in a read-only transaction"),
      pgErr("40001", "could not serialize access"),
      pgErr("53300", "sorry, too many clients already"),
      Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:5432"), { code: "ECONNREFUSED" }),
      new Error("Connection terminated unexpectedly"),
      new Error("timeout exceeded when trying to connect"),
    ]) {
      assert.ok(isStoreUnavailable(e), e.message);
      assert.ok(!isStorageFull(e), e.message);
      assert.equal(classifyStoreError(e)?.status, 503, e.message);
    }
    assert.equal(classifyStoreError(pgErr("53100", "could not extend file"))?.status, 507);
    for (const e of [pgErr("23505", "duplicate key value violates unique constraint"), pgErr("42P01", 'relation "grants" does not exist')]) {
      assert.equal(isStoreUnavailable(e), false, e.message);
      assert.equal(classifyStoreError(e), null, e.message);
    }
    for (const e of [sqlite("SQLITE_CONSTRAINT_UNIQUE", "UNIQUE constraint failed: grants.request_id"), new TypeError("x is undefined"), null, "text", 42]) {
      assert.equal(isStorageFull(e), false, String(e));
      assert.equal(isStoreUnavailable(e), false, String(e));
    }
  });

  it("state dir on a full tmpfs: a write fails as storage-full, and succeeds again once space is freed", async (t) => {
    const dir = path.join(tempDir(t), "state");
    const skip = mountTmpfs(t, dir, "2m");
    if (skip) return t.skip(skip);
    const s = new Store(dir, systemClock);
    t.after(() => s.close().catch(() => {}));
    await s.accept(newGrant("before"));
    fillDisk(path.join(dir, "filler"));
    let err: unknown = null;
    for (let i = 0; i < 200 && !err; i++) await s.accept(newGrant(`fill-${i}`)).catch((e: unknown) => (err = e));
    assert.ok(err, "a write failed on the full disk");
    assert.ok(isStorageFull(err), `recognised as storage full: ${String(err)}`);
    assert.ok(isStoreUnavailable(err));
    rmSync(path.join(dir, "filler"));
    const after = await s.accept(newGrant("after-freeing"));
    assert.equal(after.status, "created", "the store takes writes again: a retry with backoff can succeed");
  });

  it("PostgreSQL on a full disk: a write fails as storage-full (507), and succeeds again once space is freed", async (t) => {
    const cluster = await startPostgres();
    const parent = tempDir(t);
    chmodSync(parent, 0o711); // the server's user reaches the tablespace through it
    const space = path.join(parent, "space");
    const skip = mountTmpfs(t, space, "4m");
    if (skip) return t.skip(skip);
    // The database's tablespace on the small tmpfs, owned by the server's user.
    if (process.getuid?.() === 0) chownSync(space, Number(execFileSync("id", ["-u", "postgres"], { encoding: "utf8" }).trim()), -1);
    const name = `full_${process.pid}`;
    await cluster.query("postgres", `CREATE TABLESPACE ${name} LOCATION '${space}'`);
    await cluster.query("postgres", `CREATE DATABASE ${name} TABLESPACE ${name}`);
    t.after(async () => {
      await cluster.query("postgres", `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`).catch(() => undefined);
      await cluster.query("postgres", `DROP TABLESPACE IF EXISTS ${name}`).catch(() => undefined);
    });
    const s = await PostgresStore.open({ url: cluster.url(name), stateDir: tempDir(t), clock: systemClock });
    t.after(() => s.close().catch(() => {}));
    await s.accept(newGrant("before"));
    fillDisk(path.join(space, "filler"));
    let err: unknown = null;
    for (let i = 0; i < 2000 && !err; i++) await s.accept(newGrant(`fill-${i}`)).catch((e: unknown) => (err = e));
    assert.ok(err, "a write failed on the full disk");
    assert.ok(isStorageFull(err), `recognised as storage full: ${String(err)} (${(err as { code?: string }).code})`);
    assert.equal(classifyStoreError(err)?.status, 507);
    rmSync(path.join(space, "filler"));
    const after = await s.accept(newGrant("after-freeing"));
    assert.equal(after.status, "created", "the store takes writes again: a retry with backoff can succeed");
  });
});
