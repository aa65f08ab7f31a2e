import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Semaphore } from "../../../src/backends/common/semaphore.js";

/** A call that runs until the test lets it finish. */
function gate() {
  let open!: () => void;
  const opened = new Promise<void>((r) => (open = r));
  return { open, opened };
}

describe("Semaphore", () => {
  it("runs at most `max` calls at once; the others start in order as slots free up, also after a failure", async () => {
    const s = new Semaphore(2);
    const started: number[] = [];
    const gates = [gate(), gate(), gate(), gate()];
    const calls = gates.map((g, i) =>
      s.run(async () => {
        started.push(i);
        await g.opened;
        if (i === 0) throw new Error("call 0 failed");
        return i;
      }),
    );
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(started, [0, 1]);
    gates[0]!.open();
    await assert.rejects(calls[0]!, /call 0 failed/);
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(started, [0, 1, 2]);
    gates[1]!.open();
    gates[2]!.open();
    gates[3]!.open();
    assert.deepEqual(await Promise.all(calls.slice(1)), [1, 2, 3]);
    assert.deepEqual(started, [0, 1, 2, 3]);
  });

  it("a waiter whose signal aborts gives up without taking a slot; an aborted signal never starts", async () => {
    const s = new Semaphore(1);
    const first = gate();
    const running = s.run(() => first.opened);
    const ctl = new AbortController();
    let ranAborted = false;
    const waiting = s.run(async () => {
      ranAborted = true;
    }, ctl.signal);
    const next = s.run(async () => "next");
    ctl.abort();
    await assert.rejects(waiting, (e: Error) => e.name === "AbortError");
    await assert.rejects(s.run(async () => "never", ctl.signal), (e: Error) => e.name === "AbortError");
    first.open();
    await running;
    assert.equal(await next, "next");
    assert.equal(ranAborted, false);
    // Every slot came back: two calls at once on a Semaphore(1) would both start otherwise.
    const order: string[] = [];
    const a = gate();
    const p1 = s.run(async () => {
      order.push("a");
      await a.opened;
    });
    const p2 = s.run(async () => void order.push("b"));
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(order, ["a"]);
    a.open();
    await Promise.all([p1, p2]);
    assert.deepEqual(order, ["a", "b"]);
  });
});
