import assert from "node:assert/strict";
import path from "node:path";
import { rmSync } from "node:fs";
import { describe, it } from "node:test";
import { isStorageFull, isStoreUnavailable, Store } from "../../src/store/store.js";
import { systemClock } from "../../src/util/clock.js";
import { fillDisk, mountTmpfs } from "../helpers/tmpfs.js";
import { tempDir } from "../helpers/tmp.js";

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
  it("classifies SQLite, fs and writer-thread errors", () => {
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
});
