import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { SweepGuard } from "../../src/lifecycle/sweep-guard.js";

describe("SweepGuard (sweeps with several replicas)", () => {
  it("an id found without a live grant is an orphan only at the second consecutive sweep that finds it so", () => {
    const g = new SweepGuard();
    const first = g.pass(["a"]);
    assert.equal(first.has("a"), true);
    assert.equal(first.has("x"), true, "first sight: spared (another replica may just have accepted it)");
    assert.deepEqual([...first], ["a"], "iterating gives the snapshot (cloud sweeps map it to owner keys)");
    const second = g.pass(["a"]);
    assert.equal(second.has("x"), false, "still without a grant a sweep later: an orphan");
    assert.equal(second.has("y"), true, "a new one is spared in its first sweep");
  });

  it("an id that was live in between starts over", () => {
    const g = new SweepGuard();
    assert.equal(g.pass([]).has("x"), true);
    assert.equal(g.pass(["x"]).has("x"), true);
    assert.equal(g.pass([]).has("x"), true, "its grant ended since: first sight again");
    assert.equal(g.pass([]).has("x"), false);
  });
});
