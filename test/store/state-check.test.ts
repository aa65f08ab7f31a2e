import assert from "node:assert/strict";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { ALLOW_NEW_DATABASE, assertDatabaseNotLost, LostDatabaseError, previousUse } from "../../src/store/state-check.js";
import { Store } from "../../src/store/store.js";
import { systemClock } from "../../src/util/clock.js";
import { tempDir } from "../helpers/tmp.js";

describe("lost database check at start", () => {
  it("a fresh state dir starts (nothing shows earlier use)", (t) => {
    const dir = tempDir(t);
    assert.deepEqual(previousUse(dir), []);
    assertDatabaseNotLost(dir)();
  });

  it("a used state dir with a missing database refuses, naming what it found and the way out", (t) => {
    const dir = tempDir(t);
    writeFileSync(path.join(dir, "identity.key"), "k");
    writeFileSync(path.join(dir, "compute-log.jsonl"), "{}\n");
    mkdirSync(path.join(dir, "local", "runs", "g1"), { recursive: true });
    assert.throws(() => assertDatabaseNotLost(dir), (e: unknown) => {
      assert.ok(e instanceof LostDatabaseError);
      assert.match(e.message, /identity\.key, compute-log\.jsonl, 1 local run directory/);
      assert.match(e.message, /bridge\.db is missing/);
      assert.match(e.message, /Restore bridge\.db/);
      assert.match(e.message, new RegExp(ALLOW_NEW_DATABASE));
      assert.match(e.message, /docs\/operations\.md/);
      return true;
    });
  });

  it("an empty (0-byte) or truncated database counts as lost", (t) => {
    const dir = tempDir(t);
    writeFileSync(path.join(dir, "identity.key"), "k");
    writeFileSync(path.join(dir, "bridge.db"), "");
    assert.throws(() => assertDatabaseNotLost(dir), /bridge\.db is empty \(0 bytes\)/);
    writeFileSync(path.join(dir, "bridge.db"), "SQLite format 3\0");
    assert.throws(() => assertDatabaseNotLost(dir), /only 16 bytes/);
  });

  it("a real database passes; the operator's allow-new-database file allows exactly one start", (t) => {
    const dir = tempDir(t);
    writeFileSync(path.join(dir, "identity.key"), "k");
    writeFileSync(path.join(dir, ALLOW_NEW_DATABASE), "");
    const created = assertDatabaseNotLost(dir);
    const s = new Store(dir, systemClock);
    t.after(() => s.close());
    created();
    assert.equal(existsSync(path.join(dir, ALLOW_NEW_DATABASE)), false, "used up");
    assertDatabaseNotLost(dir)();
  });
});
