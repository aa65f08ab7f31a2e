import assert from "node:assert/strict";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, describe, it } from "node:test";
import { localRunsDir } from "../../src/config/schema.js";
import { ALLOW_NEW_DATABASE, assertDatabaseNotLost, LostDatabaseError, previousUse } from "../../src/store/state-check.js";
import { SqliteStore as Store } from "../../src/store/sqlite.js";
import { openCheckedStore, SCHEMA_VERSION } from "../../src/store/store.js";
import { systemClock } from "../../src/util/clock.js";
import { ENGINES, stopEngines } from "../helpers/store-engines.js";
import { tempDir } from "../helpers/tmp.js";

after(stopEngines);

/** The local backend's run directories where runs_dir is not set. */
const runsOf = (stateDir: string) => localRunsDir(undefined, stateDir);

describe("lost database check at start", () => {
  it("a fresh state dir starts (nothing shows earlier use)", (t) => {
    const dir = tempDir(t);
    assert.deepEqual(previousUse(dir, runsOf(dir)), []);
    assertDatabaseNotLost(dir, runsOf(dir))();
  });

  it("a used state dir with a missing database refuses, naming what it found and the way out", (t) => {
    const dir = tempDir(t);
    writeFileSync(path.join(dir, "identity.key"), "k");
    writeFileSync(path.join(dir, "compute-log.jsonl"), "{}\n");
    mkdirSync(path.join(dir, "local", "runs", "g1"), { recursive: true });
    assert.throws(() => assertDatabaseNotLost(dir, runsOf(dir)), (e: unknown) => {
      assert.ok(e instanceof LostDatabaseError);
      assert.match(e.message, /identity\.key, compute-log\.jsonl, 1 local run directory/);
      assert.match(e.message, /bridge\.db is missing/);
      assert.match(e.message, /Restore bridge\.db/);
      assert.match(e.message, new RegExp(ALLOW_NEW_DATABASE));
      assert.match(e.message, /docs\/operations\.md/);
      return true;
    });
  });

  it("counts the run directories in the configured runs_dir, wherever it is", (t) => {
    const dir = tempDir(t);
    const shared = path.join(tempDir(t), "runs");
    mkdirSync(path.join(shared, "g1"), { recursive: true });
    mkdirSync(path.join(shared, "g2"));
    assert.throws(() => assertDatabaseNotLost(dir, shared), (e: unknown) => {
      assert.ok(e instanceof LostDatabaseError);
      assert.match(e.message, new RegExp(`2 local run directories \\(${shared}\\)`));
      return true;
    });
    assert.deepEqual(previousUse(dir, path.join(dir, "elsewhere")), [], "a runs_dir without runs shows nothing");
  });

  it("an empty (0-byte) or truncated database counts as lost", (t) => {
    const dir = tempDir(t);
    writeFileSync(path.join(dir, "identity.key"), "k");
    writeFileSync(path.join(dir, "bridge.db"), "");
    assert.throws(() => assertDatabaseNotLost(dir, runsOf(dir)), /bridge\.db is empty \(0 bytes\)/);
    writeFileSync(path.join(dir, "bridge.db"), "SQLite format 3\0");
    assert.throws(() => assertDatabaseNotLost(dir, runsOf(dir)), /only 16 bytes/);
  });

  it("a real database passes; the operator's allow-new-database file allows exactly one start", (t) => {
    const dir = tempDir(t);
    writeFileSync(path.join(dir, "identity.key"), "k");
    writeFileSync(path.join(dir, ALLOW_NEW_DATABASE), "");
    const created = assertDatabaseNotLost(dir, runsOf(dir));
    const s = new Store(dir, systemClock);
    t.after(() => s.close());
    created();
    assert.equal(existsSync(path.join(dir, ALLOW_NEW_DATABASE)), false, "used up");
    assertDatabaseNotLost(dir, runsOf(dir))();
  });
});

for (const engine of ENGINES) {
  describe(`lost database check when the store opens (${engine.name})`, () => {
    const spec = (p: { dir: string; url: string | null }) => (p.url === null ? { kind: "sqlite" as const, stateDir: p.dir } : { kind: "postgres" as const, stateDir: p.dir, url: p.url });

    it("a fresh state dir opens a new database; reopening it needs nothing", async (t) => {
      const p = await engine.place(t);
      await (await openCheckedStore(spec(p), systemClock, runsOf(p.dir))).close();
      writeFileSync(path.join(p.dir, "identity.key"), "k");
      await (await openCheckedStore(spec(p), systemClock, runsOf(p.dir))).close();
    });

    if (engine.name === "postgres")
      it("a replica's state dir holding only the provider's identity.key opens a new database (the docs have it copied in first)", async (t) => {
        const p = await engine.place(t);
        writeFileSync(path.join(p.dir, "identity.key"), "k");
        await (await openCheckedStore(spec(p), systemClock, runsOf(p.dir))).close();
        assert.equal(await p.version(), SCHEMA_VERSION);
      });

    it("a used state dir next to a new, empty database refuses, creates nothing, and the allow file allows one start", async (t) => {
      const p = await engine.place(t);
      writeFileSync(path.join(p.dir, "identity.key"), "k");
      writeFileSync(path.join(p.dir, "compute-log.jsonl"), "{}\n");
      await assert.rejects(openCheckedStore(spec(p), systemClock, runsOf(p.dir)), (e: unknown) => {
        assert.ok(e instanceof LostDatabaseError);
        assert.match(e.message, engine.name === "sqlite" ? /identity\.key, compute-log\.jsonl/ : /\(compute-log\.jsonl\)/);
        assert.match(e.message, new RegExp(ALLOW_NEW_DATABASE));
        if (engine.name === "postgres") assert.match(e.message, /no compute-bridge schema/);
        return true;
      });
      if (engine.name === "sqlite") assert.equal(existsSync(path.join(p.dir, "bridge.db")), false, "no database was created");
      else assert.equal(await p.version().catch(() => 0), 0, "no schema was created");
      writeFileSync(path.join(p.dir, ALLOW_NEW_DATABASE), "");
      await (await openCheckedStore(spec(p), systemClock, runsOf(p.dir))).close();
      assert.equal(existsSync(path.join(p.dir, ALLOW_NEW_DATABASE)), false, "used up");
      await (await openCheckedStore(spec(p), systemClock, runsOf(p.dir))).close();
    });
  });
}
