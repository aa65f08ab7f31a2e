import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { BatchLookup, BatchWatcher, type PollEvent } from "../../../src/backends/common/batch-watcher.js";
import { ManualClock } from "../../helpers/manual-clock.js";

/** Virtual time: sleeps resolve only when the test advances the clock. */

interface St {
  state: string;
}

/** A fake cloud: status per id per scope, every describe call recorded. */
function harness(opts: { missingAfter?: number; interval?: number } = {}) {
  const clock = new ManualClock(1_000_000);
  const states = new Map<string, string>(); // `${scope}/${id}` -> state
  const calls: { scope: string; ids: string[] }[] = [];
  const polls: PollEvent[] = [];
  const waiting: { n: number; resolve: () => void }[] = [];
  let failNext = 0;
  const w = new BatchWatcher<St>({
    describe: async (scope, ids) => {
      calls.push({ scope, ids: [...ids] });
      await Promise.resolve();
      if (failNext > 0) {
        failNext--;
        throw new Error("RequestLimitExceeded");
      }
      const out = new Map<string, St>();
      for (const id of ids) {
        const s = states.get(`${scope}/${id}`);
        if (s !== undefined) out.set(id, { state: s });
      }
      return out;
    },
    intervalMs: opts.interval ?? 1000,
    clock,
    ...(opts.missingAfter !== undefined ? { missingAfter: opts.missingAfter } : {}),
    onPoll: (e) => {
      polls.push(e);
      for (const x of waiting.filter((x) => polls.length >= x.n)) {
        waiting.splice(waiting.indexOf(x), 1);
        x.resolve();
      }
    },
  });
  /** Resolves once `n` polls in total have completed. */
  const polled = (n: number) => (polls.length >= n ? Promise.resolve() : new Promise<void>((resolve) => waiting.push({ n, resolve })));
  return { clock, states, calls, polls, polled, w, failNextDescribe: (n: number) => (failNext = n) };
}

const done = (s: St) => s.state === "terminated";

describe("BatchWatcher", () => {
  it("one describe per scope per interval for every watched id; resolves each id when its state is final", async () => {
    const h = harness();
    const ids = Array.from({ length: 300 }, (_, i) => `i-${i}`);
    for (const id of ids) h.states.set(`${Number(id.slice(2)) % 2 ? "eu" : "us"}/${id}`, "running");
    const results = new Map<string, string>();
    const all = ids.map((id) =>
      h.w.waitFor(Number(id.slice(2)) % 2 ? "eu" : "us", id, { until: done }).then((r) => {
        assert.equal(r.kind, "match");
        results.set(id, r.kind === "match" ? r.status.state : "");
      }),
    );
    await h.polled(2); // the immediate first poll of each scope
    assert.equal(h.calls.length, 2);
    assert.deepEqual(h.calls.map((c) => c.ids.length).sort(), [150, 150]);
    for (let tick = 1; tick <= 5; tick++) {
      h.clock.advance(1000);
      await h.polled(2 + 2 * tick);
      assert.equal(h.calls.length, 2 + 2 * tick, `exactly one call per scope at tick ${tick}`);
    }
    // Half of them end; the next poll resolves exactly those.
    for (const id of ids.filter((_, i) => i % 3 === 0)) h.states.set(`${Number(id.slice(2)) % 2 ? "eu" : "us"}/${id}`, "terminated");
    h.clock.advance(1000);
    await h.polled(14);
    await new Promise((r) => setImmediate(r));
    assert.equal(results.size, 100);
    assert.equal(h.w.stats().waiters, 200);
    for (const id of ids) h.states.set(`${Number(id.slice(2)) % 2 ? "eu" : "us"}/${id}`, "terminated");
    h.clock.advance(1000);
    await Promise.all(all);
    assert.equal(results.size, 300);
    assert.equal(h.calls.length, 16, "16 calls for 300 instances over 8 polls of 2 scopes");
    // Pollers stop once nobody waits.
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(h.w.stats(), { scopes: 0, waiters: 0, polls: 16, errors: 0 });
    assert.equal(h.clock.pending, 0, "no timer left behind");
  });

  it("describe errors are counted and retried on the next tick; waiters keep waiting", async () => {
    const h = harness();
    h.states.set("us/a", "running");
    const p = h.w.waitFor("us", "a", { until: done });
    h.failNextDescribe(2);
    await h.polled(1);
    assert.equal(h.polls[0]!.ok, false);
    assert.equal(h.w.lastError("us") instanceof Error, true);
    h.clock.advance(1000);
    await h.polled(2);
    assert.equal(h.polls[1]!.consecutiveErrors, 2);
    h.states.set("us/a", "terminated");
    h.clock.advance(1000);
    assert.deepEqual(await p, { kind: "match", status: { state: "terminated" } });
    assert.equal(h.w.stats().errors, 2);
    assert.equal(h.w.lastError("us"), undefined);
  });

  it("an id absent from `missingAfter` consecutive polls resolves as missing, with its last status", async () => {
    const h = harness({ missingAfter: 2 });
    h.states.set("us/gone", "running");
    const p = h.w.waitFor("us", "gone", { until: done });
    await h.polled(1);
    h.states.delete("us/gone");
    h.clock.advance(1000);
    await h.polled(2);
    // Seen once more: the miss counter resets.
    h.states.set("us/gone", "running");
    h.clock.advance(1000);
    await h.polled(3);
    h.states.delete("us/gone");
    h.clock.advance(1000);
    await h.polled(4);
    h.clock.advance(1000);
    assert.deepEqual(await p, { kind: "missing", last: { state: "running" } });
    assert.equal(h.polls.length, 5);
  });

  it("waiters joining mid-interval share the next poll; per-waiter conditions; abort removes only that waiter", async () => {
    const h = harness();
    h.states.set("us/a", "pending");
    h.states.set("us/b", "pending");
    const booted = h.w.waitFor("us", "a", { until: (s) => s.state !== "pending" });
    const ended = h.w.waitFor("us", "a", { until: done });
    await h.polled(1);
    const ctl = new AbortController();
    const b = h.w.waitFor("us", "b", { until: done, signal: ctl.signal });
    h.states.set("us/a", "running");
    h.clock.advance(1000);
    await booted;
    assert.deepEqual(h.calls[1]!.ids.sort(), ["a", "b"], "a and b described together");
    ctl.abort();
    await assert.rejects(b, (e: unknown) => e instanceof Error && e.name === "AbortError");
    h.states.set("us/a", "terminated");
    h.clock.advance(1000);
    assert.equal((await ended).kind, "match");
    assert.deepEqual(h.calls[2]!.ids, ["a"], "the aborted waiter is no longer described");
  });

  it("an emptied scope stops its poller at once; close() rejects pending waiters", async () => {
    const h = harness();
    h.states.set("us/a", "running");
    const ctl = new AbortController();
    const p = h.w.waitFor("us", "a", { until: done, signal: ctl.signal });
    await h.polled(1);
    await new Promise((r) => setImmediate(r)); // onPoll fires just before the poller goes to sleep
    assert.equal(h.clock.pending, 1, "sleeping until the next tick");
    ctl.abort();
    await assert.rejects(p);
    await new Promise((r) => setImmediate(r));
    assert.equal(h.clock.pending, 0, "the sleep was cut short");
    assert.equal(h.w.stats().scopes, 0);

    const q = h.w.waitFor("eu", "x", { until: done });
    h.w.close();
    await assert.rejects(q, /closed/);
    await assert.rejects(h.w.waitFor("eu", "y", { until: done }), /closed/);
  });
});

describe("BatchLookup", () => {
  it("coalesces lookups made in the same turn into one call per scope, chunked, results per key", async () => {
    const calls: { scope: string; keys: string[] }[] = [];
    const l = new BatchLookup<string>(async (scope, keys) => {
      calls.push({ scope, keys: [...keys] });
      return new Map(keys.filter((k) => k !== "none").map((k) => [k, [`${scope}:${k}`]]));
    }, 10);
    const a = Array.from({ length: 25 }, (_, i) => l.get("us", `k${i}`));
    const dup = l.get("us", "k3");
    const b = [l.get("eu", "x"), l.get("eu", "none")];
    assert.deepEqual(await Promise.all(a), Array.from({ length: 25 }, (_, i) => [`us:k${i}`]));
    assert.deepEqual(await dup, ["us:k3"]);
    assert.deepEqual(await Promise.all(b), [["eu:x"], []]);
    assert.deepEqual(calls.map((c) => [c.scope, c.keys.length]), [["us", 10], ["us", 10], ["us", 5], ["eu", 2]]);
    assert.equal(l.callCount, 4);
    // A later turn is a new batch.
    await l.get("us", "k0");
    assert.equal(l.callCount, 5);
  });

  it("an error reaches every caller of that batch; an abort releases only its caller", async () => {
    let fail = true;
    const l = new BatchLookup<number>(async (_scope, keys) => {
      if (fail) throw new Error("RequestLimitExceeded");
      return new Map(keys.map((k) => [k, [1]]));
    });
    const r = await Promise.allSettled([l.get("us", "a"), l.get("us", "b")]);
    assert.deepEqual(r.map((x) => x.status), ["rejected", "rejected"]);
    fail = false;
    const ctl = new AbortController();
    const gone = l.get("us", "a", ctl.signal);
    const stays = l.get("us", "b");
    ctl.abort();
    await assert.rejects(gone, (e: unknown) => (e as Error).name === "AbortError");
    assert.deepEqual(await stays, [1]);
  });
});
