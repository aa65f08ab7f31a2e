import assert from "node:assert/strict";
import { describe, it } from "node:test";
import Database from "better-sqlite3";
import path from "node:path";
import { SCHEMA_VERSION, Store } from "../../src/store/store.js";
import { systemClock } from "../../src/util/clock.js";
import { tempDir } from "../helpers/tmp.js";

const grant = (id: string) => ({ request_id: id, region: "r", tdx_required: false, cpu_millicores: 1, ram_mib: 1, valid_to: 1 });
const envelope = { image: { url: "file:///x", sha256: "a".repeat(64), format: "bundle" as const } };

describe("store", () => {
  it("group-commits accepts that arrive together and detects duplicates and conflicts in one batch", async (t) => {
    const s = new Store(tempDir(t), systemClock);
    t.after(() => s.close());
    const n = (id: string, digest: string) => ({ request_id: id, body_digest: digest, grant: grant(id), envelope, backend: "local", private_key: null, public_key: null });
    const [a, b, c, d] = await Promise.all([s.accept(n("g1", "d1")), s.accept(n("g1", "d1")), s.accept(n("g1", "d2")), s.accept(n("g2", "d1"))]);
    assert.deepEqual([a.status, b.status, c.status, d.status], ["created", "duplicate", "conflict", "created"]);
    assert.equal(s.nonTerminal().length, 2);
    // Accepted and routed in one commit: one audit row, already naming the backend.
    assert.deepEqual(s.transitions("g1").map((x) => [x.from_state, x.to_state, x.backend]), [[null, "provisioning", "local"]]);
  });

  it("is durable across reopen and refuses a newer schema", (t) => {
    const dir = tempDir(t);
    const s = new Store(dir, systemClock);
    s.db.exec("SELECT 1");
    s.close();
    const db = new Database(path.join(dir, "bridge.db"));
    assert.equal(db.pragma("user_version", { simple: true }), SCHEMA_VERSION);
    assert.equal(db.pragma("journal_mode", { simple: true }), "wal");
    db.pragma(`user_version = ${SCHEMA_VERSION + 1}`);
    db.close();
    assert.throws(() => new Store(dir, systemClock), /newer than this build/);
  });
});
