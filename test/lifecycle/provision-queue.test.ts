import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { ProvisionQueue } from "../../src/lifecycle/provision-queue.js";
import { ManualClock } from "../helpers/manual-clock.js";

/** Let the callbacks of sleeps the clock just resolved run. */
const settle = () => new Promise<void>((r) => setImmediate(r));

function queue(limit: number, clock = new ManualClock(0)) {
  const started: string[] = [];
  const expired: string[] = [];
  const waits: number[] = [];
  const q = new ProvisionQueue<string>({
    limit,
    clock,
    start: (id) => started.push(id),
    onExpired: (id) => expired.push(id),
    onStarted: (_key, ms) => waits.push(ms),
  });
  return { q, started, expired, waits, clock };
}

describe("ProvisionQueue", () => {
  it("runs at most `limit` per key, in arrival order, and each key on its own", () => {
    const { q, started } = queue(2);
    for (const id of ["a1", "a2", "a3", "a4"]) q.enqueue(id, "aws|r1", Infinity, id);
    q.enqueue("b1", "aws|r2", Infinity, "b1");
    assert.deepEqual(started, ["a1", "a2", "b1"]);
    assert.equal(q.waiting, 2);
    assert.deepEqual(q.info("a4")?.position, 2);
    q.release("aws|r1");
    assert.deepEqual(started, ["a1", "a2", "b1", "a3"]);
    assert.equal(q.info("a4")?.position, 1);
    q.release("aws|r1");
    q.release("aws|r1");
    assert.deepEqual(started, ["a1", "a2", "b1", "a3", "a4"]);
    assert.equal(q.waiting, 0);
    assert.deepEqual(q.stats().find((s) => s.key === "aws|r1"), { key: "aws|r1", running: 1, waiting: 0, oldestWaitMs: 0 });
  });

  it("take() removes a waiting grant (cancel): it never starts, the ones behind move up", () => {
    const { q, started } = queue(1);
    for (const id of ["x", "y", "z"]) q.enqueue(id, "k", Infinity, id);
    assert.equal(q.take("y"), "y");
    assert.equal(q.take("y"), undefined, "only once");
    assert.equal(q.take("x"), undefined, "a started grant is not waiting");
    assert.equal(q.info("z")?.position, 1);
    q.release("k");
    assert.deepEqual(started, ["x", "z"]);
  });

  it("a waiting grant leaves at its deadline (one timer for the earliest), in deadline order", async () => {
    const { q, started, expired, clock } = queue(1);
    q.enqueue("run", "k", 10_000, "run");
    q.enqueue("late", "k", 5_000, "late");
    q.enqueue("early", "k", 1_000, "early");
    q.enqueue("never", "k", Infinity, "never");
    assert.equal(clock.pending, 1, "one timer, whatever the number waiting");
    clock.advance(999);
    await settle();
    assert.deepEqual(expired, []);
    clock.advance(1);
    await settle();
    assert.deepEqual(expired, ["early"]);
    clock.advance(4_000);
    await settle();
    assert.deepEqual(expired, ["early", "late"]);
    q.release("k");
    assert.deepEqual(started, ["run", "never"]);
    assert.equal(clock.pending, 0, "no timer once nothing with a deadline waits");
  });

  it("reports how long each grant waited", () => {
    const { q, waits, clock } = queue(1);
    q.enqueue("a", "k", Infinity, "a");
    q.enqueue("b", "k", Infinity, "b");
    clock.advance(2_500);
    assert.equal(q.stats()[0]!.oldestWaitMs, 2_500);
    q.release("k");
    assert.deepEqual(waits, [0, 2_500]);
  });

  it("close() stops its timer", async () => {
    const { q, expired, clock } = queue(1);
    q.enqueue("a", "k", 10, "a");
    q.enqueue("b", "k", 10, "b");
    q.close();
    clock.advance(100);
    await settle();
    assert.deepEqual(expired, []);
    assert.equal(clock.pending, 0);
  });

  it("stays correct through many enqueues, takes and releases (the heap keeps deadline order)", async () => {
    const { q, expired, clock } = queue(3);
    const deadlines = new Map<string, number>();
    for (let i = 0; i < 500; i++) {
      const d = 1_000 + ((i * 7919) % 5_000);
      deadlines.set(`g${i}`, d);
      q.enqueue(`g${i}`, "k", d, `g${i}`);
    }
    for (let i = 10; i < 500; i += 5) q.take(`g${i}`);
    // In steps, as a real clock would wake it: each wake takes every grant due by then.
    for (let t = 0; t < 3_000; t += 250) {
      clock.advance(250);
      await settle();
    }
    const late = expired.filter((id) => deadlines.get(id)! > 3_000);
    assert.deepEqual(late, [], "nothing expires before its deadline");
    const sorted = [...expired].sort((a, b) => deadlines.get(a)! - deadlines.get(b)!);
    assert.deepEqual(expired, sorted, "expired in deadline order");
    for (const id of expired) assert.ok(deadlines.get(id)! <= 3_000);
    const stillWaiting = [...deadlines.keys()].filter((id) => q.info(id));
    for (const id of stillWaiting) assert.ok(deadlines.get(id)! > 3_000, `${id} waits with a later deadline`);
  });
});
