import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { RateLimiter, TokenBucket } from "../../../src/backends/common/token-bucket.js";
import { ManualClock } from "../../helpers/manual-clock.js";

/** Let resolved promises run their continuations. */
const flush = () => new Promise<void>((r) => setImmediate(r));

/** Starts `n` takes and records, per take, the clock time at which it got its token. */
function takes(b: TokenBucket, clock: ManualClock, n: number, signal?: AbortSignal) {
  const at: (number | null)[] = Array.from({ length: n }, () => null);
  const ps = at.map((_, i) => b.take(signal).then(() => void (at[i] = clock.now())));
  return { at, ps };
}

describe("TokenBucket", () => {
  it("serves a full bucket at once, then exactly refill_per_second per second, in arrival order", async () => {
    const clock = new ManualClock(0);
    const b = new TokenBucket({ bucket: 3, refill_per_second: 2 }, clock);
    const { at } = takes(b, clock, 7);
    await flush();
    assert.deepEqual(at, [0, 0, 0, null, null, null, null]);
    assert.equal(b.waiting, 4);
    // One token every 500 ms: never early, never out of order.
    for (const [t, served] of [[499, 3], [500, 4], [999, 4], [1000, 5], [1500, 6], [2000, 7]] as const) {
      clock.advance(t - clock.now());
      await flush();
      assert.equal(at.filter((x) => x !== null).length, served, `at ${t} ms`);
    }
    assert.deepEqual(at, [0, 0, 0, 500, 1000, 1500, 2000]);
    assert.equal(b.waiting, 0);
  });

  it("refills to the bucket size and no further while idle", async () => {
    const clock = new ManualClock(0);
    const b = new TokenBucket({ bucket: 2, refill_per_second: 10 }, clock);
    await b.take();
    await b.take();
    assert.equal(b.available(), 0);
    clock.advance(60_000);
    assert.equal(b.available(), 2);
    const { at } = takes(b, clock, 3);
    await flush();
    assert.deepEqual(at, [60_000, 60_000, null]);
  });

  it("throttled(): empties the bucket and serves nobody before the pause (Retry-After) ends, then one token per refill interval", async () => {
    const clock = new ManualClock(0);
    const b = new TokenBucket({ bucket: 5, refill_per_second: 5 }, clock);
    b.throttled(3000);
    assert.equal(b.available(), 0);
    const { at } = takes(b, clock, 3);
    clock.advance(2999);
    await flush();
    assert.deepEqual(at, [null, null, null]);
    clock.advance(1);
    await flush();
    assert.deepEqual(at, [3000, null, null]);
    clock.advance(199);
    await flush();
    assert.deepEqual(at, [3000, null, null]);
    clock.advance(1);
    await flush();
    assert.deepEqual(at, [3000, 3200, null]);
    clock.advance(200);
    await flush();
    assert.deepEqual(at, [3000, 3200, 3400]);
  });

  it("throttled() without a Retry-After pauses for one refill interval; a throttle while waiting moves the wait", async () => {
    const clock = new ManualClock(0);
    const b = new TokenBucket({ bucket: 1, refill_per_second: 4 }, clock);
    await b.take();
    const { at } = takes(b, clock, 1);
    await flush();
    clock.advance(100);
    b.throttled(); // the next token 250 ms from now, not at 250 as before
    clock.advance(249);
    await flush();
    assert.deepEqual(at, [null]);
    clock.advance(1);
    await flush();
    assert.deepEqual(at, [350]);
  });

  it("an aborted waiter leaves the queue without taking a token; the next one is served in its place", async () => {
    const clock = new ManualClock(0);
    const b = new TokenBucket({ bucket: 1, refill_per_second: 1 }, clock);
    await b.take();
    const ctl = new AbortController();
    const first = b.take(ctl.signal);
    const { at } = takes(b, clock, 1);
    ctl.abort();
    await assert.rejects(first, (e: Error) => e.name === "AbortError");
    assert.equal(b.waiting, 1);
    clock.advance(1000);
    await flush();
    assert.deepEqual(at, [1000]);
    await assert.rejects(b.take(AbortSignal.abort()), (e: Error) => e.name === "AbortError");
  });

  it("rejects a bucket that could never serve anyone", () => {
    const clock = new ManualClock(0);
    assert.throws(() => new TokenBucket({ bucket: 0, refill_per_second: 1 }, clock), RangeError);
    assert.throws(() => new TokenBucket({ bucket: 1, refill_per_second: 0 }, clock), RangeError);
  });
});

describe("RateLimiter", () => {
  it("keeps one bucket per (scope, class): one region's describe calls never wait for another's, nor for launches", async () => {
    const clock = new ManualClock(0);
    const r = new RateLimiter({ describe: { bucket: 2, refill_per_second: 1 }, mutate: { bucket: 1, refill_per_second: 1 } }, clock);
    await r.take("us-east-1", "describe");
    await r.take("us-east-1", "describe");
    await r.take("us-east-1", "mutate");
    await r.take("eu-west-1", "describe");
    await r.take("eu-west-1", "mutate");
    let waited = false;
    const p = r.take("us-east-1", "describe").then(() => void (waited = true));
    await flush();
    assert.equal(waited, false);
    r.throttled("eu-west-1", "describe", 10_000);
    clock.advance(1000);
    await p;
    assert.equal(r.bucket("eu-west-1", "describe").available(), 0);
    assert.equal(r.bucket("us-east-1", "describe").spec.bucket, 2);
  });
});
