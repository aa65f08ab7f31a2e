import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { CapacityError, TransientError } from "../../src/backends/backend.js";
import { Almanac, type GrantRequest } from "../../src/domain/index.js";
import { Fleet } from "../../src/fleet/fleet.js";
import { until } from "../helpers/http.js";
import { testBridge } from "../helpers/lifecycle.js";
import { ManualClock } from "../helpers/manual-clock.js";
import { ScriptedBackend } from "../helpers/scripted-backend.js";
import { tempDir } from "../helpers/tmp.js";

// The GrantManager against in-memory scripted backends: lifecycle, failover, expiry, cancel and
// resume in milliseconds. The clock is manual, so valid_to passes when the test says.

const T0 = Date.parse("2026-12-01T00:00:00Z");
const almanac = new Almanac(new Date(T0), 1);

function request(id: string, validInSeconds = 600): GrantRequest {
  return {
    grant: { request_id: id, region: "r", tdx_required: false, cpu_millicores: 500, ram_mib: 256, valid_to: validInSeconds },
    envelope: { image: { url: "https://images.example/x", sha256: "a".repeat(64), format: "bundle" }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb0 t" },
  };
}

async function rig(t: { after: (fn: () => unknown) => void }, backends: ScriptedBackend[], o: { stateDir?: string; clock?: ManualClock } = {}) {
  const clock = o.clock ?? new ManualClock(T0);
  const stateDir = o.stateDir ?? tempDir(t);
  const fleet = Fleet.of(backends, clock);
  const bridge = await testBridge(t, { stateDir, fleet, almanac, providerId: "p", clock, retryBaseMs: 1, retryCapMs: 2, expiryGraceMs: 1000 });
  const state = async (id: string) => (await bridge.store.get(id))?.state;
  return { ...bridge, clock, stateDir, state };
}

describe("GrantManager on scripted backends", () => {
  it("provisions, watches and ends a grant with its exit code; terminates once; frees its reservation", async (t) => {
    const a = new ScriptedBackend("a");
    const { manager, store, fleet, state } = await rig(t, [a]);
    const r = await manager.submit(request("life-1"));
    assert.equal(r.status, "created");
    assert.equal(fleet.reservations.held("a").count, 1);
    await until(() => a.watching("life-1"), "the watch");
    assert.equal(await state("life-1"), "running");
    a.exit("life-1", 3);
    await manager.settled("life-1");
    assert.equal(await state("life-1"), "completed");
    assert.equal((await store.computeLog("life-1"))?.exit_code, 3);
    assert.deepEqual([a.count("provision", "life-1"), a.count("watch", "life-1"), a.count("terminate", "life-1")], [1, 1, 1]);
    assert.equal(fleet.reservations.held("a").count, 0);
    assert.deepEqual((await store.transitions("life-1")).map((x) => x.to_state), ["provisioning", "running", "terminating", "completed"]);
  });

  it("fails over on a capacity error: the half-created remains are terminated, the reservation moves, the attempt is recorded", async (t) => {
    const a = new ScriptedBackend("a");
    const b = new ScriptedBackend("b");
    a.provisionSteps.set("fo-1", [{ error: new CapacityError("no m6i.large", "a").withOffering("r", "m6i.large") }]);
    const { manager, store, fleet } = await rig(t, [a, b]);
    await manager.submit(request("fo-1"));
    await until(() => b.watching("fo-1"), "the grant on b");
    const rec = (await store.get("fo-1"))!;
    assert.equal(rec.backend, "b");
    assert.deepEqual(rec.attempts.map((x) => [x.backend, x.error_kind]), [["a", "capacity"]]);
    assert.equal(a.count("terminate", "fo-1"), 1, "whatever a created is removed");
    assert.equal(fleet.unavailable.isUnavailable("a", "r", "m6i.large"), true);
    assert.deepEqual([fleet.reservations.held("a").count, fleet.reservations.held("b").count], [0, 1]);
    b.exit("fo-1", 0);
    await manager.settled("fo-1");
    assert.equal((await store.get("fo-1"))!.state, "completed");
  });

  it("retries transient errors with backoff, then fails with the error's kind when they persist", async (t) => {
    const a = new ScriptedBackend("a");
    a.provisionSteps.set("tr-1", [{ error: new TransientError("503", "a") }, { error: new TransientError("503", "a") }]);
    a.provisionSteps.set("tr-2", Array.from({ length: 5 }, () => ({ error: new TransientError("throttled", "a") })));
    const { manager, store, clock } = await rig(t, [a]);
    await manager.submit(request("tr-1"));
    await manager.submit(request("tr-2"));
    // The backoff sleeps are on the manual clock: move it until both settle.
    await until(async () => {
      clock.advance(10);
      return a.watching("tr-1") && (await store.get("tr-2"))?.state === "failed";
    }, "tr-1 running and tr-2 failed");
    assert.equal(a.count("provision", "tr-1"), 3);
    assert.equal(a.count("provision", "tr-2"), 4, "1 + 3 retries");
    assert.equal((await store.get("tr-2"))!.error_kind, "transient");
    assert.equal((await store.computeLog("tr-2"))?.partial, true);
  });

  it("valid_to ends a watch the backend never reports (after the grace), and a provisioning wait at once", async (t) => {
    const a = new ScriptedBackend("a");
    a.provisionSteps.set("exp-2", ["hang"]);
    const { manager, store, clock, state } = await rig(t, [a]);
    await manager.submit(request("exp-1", 60));
    await manager.submit(request("exp-2", 60));
    await until(() => a.watching("exp-1") && a.count("provision", "exp-2") === 1, "one watching, one provisioning");
    clock.advance(60_000);
    await until(async () => (await state("exp-2")) === "expired", "the provisioning grant to expire at valid_to");
    assert.ok(a.aborted.has("exp-2"), "its provision call was aborted");
    assert.equal(await state("exp-1"), "running", "the watch gets its grace");
    clock.advance(1_000);
    await until(async () => (await state("exp-1")) === "expired", "the watch to give up after the grace");
    assert.equal(a.count("terminate", "exp-1"), 1);
    assert.equal(a.count("terminate", "exp-2"), 1);
    assert.equal((await store.computeLog("exp-1"))?.exit_reason, "expired");
  });

  it("cancel ends a grant at once in every phase: waiting for a slot, provisioning, running", async (t) => {
    const a = new ScriptedBackend("a");
    a.provisionSteps.set("c-prov", ["hang"]);
    const { manager, store, state } = await testBridgeWithLimit(t, a);
    await manager.submit(request("c-prov"));
    await manager.submit(request("c-wait"));
    await until(() => a.count("provision", "c-prov") === 1, "c-prov provisioning");
    assert.ok(manager.queued("c-wait"), "c-wait waits for the one slot");
    await manager.cancel("c-wait");
    await until(async () => (await state("c-wait")) === "cancelled", "the waiting grant cancelled");
    assert.equal(a.count("provision", "c-wait"), 0, "never provisioned");
    await manager.cancel("c-prov");
    await until(async () => (await state("c-prov")) === "cancelled", "the provisioning grant cancelled");
    assert.ok(a.aborted.has("c-prov"));
    await manager.submit(request("c-run"));
    await until(() => a.watching("c-run"), "c-run running");
    await manager.cancel("c-run");
    await until(async () => (await state("c-run")) === "cancelled", "the running grant cancelled");
    for (const id of ["c-prov", "c-run", "c-wait"]) assert.equal((await store.computeLog(id))?.exit_reason, "cancelled");
  });

  it("resumes after a restart: re-attaches running grants, provisions waiting ones, never provisions one twice", async (t) => {
    const a = new ScriptedBackend("a");
    const first = await rig(t, [a]);
    await first.manager.submit(request("re-1"));
    await until(() => a.watching("re-1"), "re-1 running");
    await first.close();
    const a2 = new ScriptedBackend("a");
    const second = await rig(t, [a2], { stateDir: first.stateDir });
    assert.equal(second.fleet.reservations.held("a").count, 1, "the reservation is rebuilt before anything runs");
    assert.equal(await second.manager.resumeAll(), 1);
    await until(() => a2.watching("re-1"), "the watch re-attached");
    assert.equal(a2.count("provision", "re-1"), 0, "a running grant is not provisioned again");
    a2.exit("re-1", 0);
    await second.manager.settled("re-1");
    assert.equal(await second.state("re-1"), "completed");
  });

  it("a grant whose accept committed but whose answer failed (a lost connection) is driven, once, when the market posts it again", async (t) => {
    const a = new ScriptedBackend("a");
    const { manager, store, fleet } = await rig(t, [a]);
    assert.equal(await manager.resumeAll(), 0);
    const real = store.accept.bind(store);
    let lose = true;
    store.accept = (async (g: Parameters<typeof real>[0]) => {
      const r = await real(g);
      if (lose) {
        lose = false;
        throw new Error("Connection terminated unexpectedly");
      }
      return r;
    }) as typeof store.accept;
    await assert.rejects(manager.submit(request("amb-1")), /Connection terminated/);
    assert.equal(fleet.reservations.held("a").count, 0, "the failed submit released what it reserved");
    assert.equal((await store.get("amb-1"))?.state, "provisioning", "but the accept had committed");
    assert.equal((await manager.submit(request("amb-1"))).status, "duplicate");
    await until(() => a.watching("amb-1"), "the adopted grant running");
    assert.equal(fleet.reservations.held("a").count, 1);
    assert.equal((await manager.submit(request("amb-1"))).status, "duplicate");
    assert.equal(a.count("provision", "amb-1"), 1, "driven once");
  });

  it("a failed state write (disk full) does not stall the grant: it continues from its last committed state after a pause", async (t) => {
    const a = new ScriptedBackend("a");
    const { manager, store, clock, state } = await rig(t, [a]);
    // The first two writes of a transition fail as a full disk would (SQLite's SQLITE_FULL).
    const real = store.transition.bind(store);
    let failing = 2;
    store.transition = (async (...args: Parameters<typeof real>) => {
      if (args[1] === "running" && failing > 0) {
        failing--;
        throw Object.assign(new Error("database or disk is full"), { name: "SqliteError", code: "SQLITE_FULL" });
      }
      return real(...args);
    }) as typeof store.transition;
    await manager.submit(request("full-1"));
    await until(() => {
      clock.advance(50);
      return a.watching("full-1");
    }, "the grant running once the disk has room again");
    assert.equal(await state("full-1"), "running");
    assert.equal(a.count("provision", "full-1"), 3, "provision called again each time: the backend adopts what it made (idempotent per request_id)");
    a.exit("full-1", 0);
    await manager.settled("full-1");
    assert.equal(await state("full-1"), "completed");
  });

  it("a lease found lapsed before the create is no provisioning failure: nothing is written or terminated, and the grant is driven once claimed again", async (t) => {
    const a = new ScriptedBackend("a");
    const { manager, store, clock, state } = await rig(t, [a]);
    // Leased as with several replicas on PostgreSQL: the check before the create finds the lease
    // lapsed once (this replica stalled past its TTL); a later claim (this replica's or another's)
    // takes the grant again.
    let checks = 0;
    Object.assign(store, {
      shared: true,
      leaseTtlMs: 3000,
      holds: async () => ++checks > 1,
      claim: async () => (await store.nonTerminal()).map((record) => ({ record, previous: "r2" })),
    });
    assert.equal(await manager.resumeAll(), 0);
    await manager.submit(request("ll-1"));
    await until(() => checks >= 1 && manager.activeCount === 0, "the grant dropped at its lease check");
    assert.equal(await state("ll-1"), "provisioning");
    assert.deepEqual((await store.transitions("ll-1")).map((x) => x.to_state), ["provisioning"], "no write after the lease was lost");
    assert.deepEqual([a.count("provision", "ll-1"), a.count("terminate", "ll-1")], [0, 0]);
    await until(() => {
      clock.advance(1000);
      return a.watching("ll-1");
    }, "the grant claimed and driven again");
    a.exit("ll-1", 5);
    await manager.settled("ll-1");
    assert.equal(await state("ll-1"), "completed");
    assert.equal((await store.computeLog("ll-1"))?.exit_code, 5);
    assert.deepEqual((await store.transitions("ll-1")).map((x) => x.to_state), ["provisioning", "running", "terminating", "completed"]);
    assert.equal(a.count("provision", "ll-1"), 1);
  });

  it("concurrent posts of one request_id: one is created, an identical one is a duplicate, another body a conflict; one reservation", async (t) => {
    const a = new ScriptedBackend("a");
    const { manager, fleet } = await rig(t, [a]);
    const other = request("same-1");
    other.grant.cpu_millicores = 750;
    // The daemon's listener keeps the process alive while writes commit; here a timer does.
    const alive = setInterval(() => undefined, 1000);
    t.after(() => clearInterval(alive));
    const [x, y, z] = await Promise.all([manager.submit(request("same-1")), manager.submit(request("same-1")), manager.submit(other)]);
    assert.deepEqual([x.status, y.status, z.status], ["created", "duplicate", "conflict"]);
    assert.equal(fleet.reservations.held("a").count, 1);
  });

  it("the store refuses a transition the table does not allow", async (t) => {
    const a = new ScriptedBackend("a");
    const { manager, store } = await rig(t, [a]);
    await manager.submit(request("tt-1"));
    await until(() => a.watching("tt-1"), "running");
    await assert.rejects(store.transition("tt-1", "provisioning"), /running -> provisioning is not an allowed transition/);
    await assert.rejects(store.transition("tt-1", "completed"), /running -> completed is not an allowed transition/);
  });
});

async function testBridgeWithLimit(t: { after: (fn: () => unknown) => void }, a: ScriptedBackend) {
  const clock = new ManualClock(T0);
  const fleet = Fleet.of([a], clock);
  const bridge = await testBridge(t, { stateDir: tempDir(t), fleet, almanac, providerId: "p", clock, provisionConcurrency: 1, retryBaseMs: 1, retryCapMs: 2 });
  return { ...bridge, state: async (id: string) => (await bridge.store.get(id))?.state };
}
