import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { systemClock } from "../../src/util/clock.js";

describe("system clock", () => {
  it("a sleep longer than setTimeout's 24.8-day limit does not fire at once", async () => {
    const ctl = new AbortController();
    let fired = false;
    const p = systemClock.sleep(40 * 24 * 3600 * 1000, ctl.signal).then(() => (fired = true), () => "aborted");
    // Give an overflowing timer (which Node clamps to 1 ms) ample chances to fire.
    for (let i = 0; i < 5; i++) await new Promise((r) => setTimeout(r, 5));
    assert.equal(fired, false);
    ctl.abort();
    assert.equal(await p, "aborted");
  });

  it("short sleeps resolve and aborts reject", async () => {
    await systemClock.sleep(1);
    const ctl = new AbortController();
    ctl.abort();
    await assert.rejects(systemClock.sleep(10, ctl.signal));
  });
});
