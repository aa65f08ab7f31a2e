import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import pg from "pg";
import { LEDGER_LOCK, PostgresStore } from "../../src/store/postgres.js";
import { LeaseLostError, type GrantRecord, type NewGrant, type Store } from "../../src/store/store.js";
import { systemClock } from "../../src/util/clock.js";
import { until } from "../helpers/http.js";
import { ENGINES, stopEngines, type Place } from "../helpers/store-engines.js";

// Several replicas on one PostgreSQL database (issue #19): per-grant fenced leases, the leader
// role and the admission change feed, between two PostgresStore instances standing for two
// replicas. Lease expiry runs on the database's clock: a short TTL, and waits that poll for it.

const TTL = 800;
const grant = (id: string) => ({ request_id: id, region: "r", tdx_required: false, cpu_millicores: 1, ram_mib: 1, valid_to: 1 });
const envelope = { image: { url: "file:///x", sha256: "a".repeat(64), format: "bundle" as const } };
const newGrant = (id: string): NewGrant => ({ request_id: id, grant: grant(id), envelope, backend: "local", private_key: null, public_key: null });
const log = (id: string) => ({ request_id: id, exit_reason: "exited" }) as never;

after(stopEngines);

const postgres = ENGINES.find((e) => e.name === "postgres")!;
const sqlite = ENGINES.find((e) => e.name === "sqlite")!;

async function replica(t: { after(fn: () => unknown): void }, p: Place, id: string, ttl = TTL): Promise<PostgresStore> {
  const s = await PostgresStore.open({ url: p.url!, stateDir: `${p.dir}/${id}`, clock: systemClock, replicaId: id, leaseTtlMs: ttl });
  t.after(() => s.close());
  return s;
}

describe("leases (postgres)", () => {
  it("an accepted grant is leased to its replica: another cannot claim it or write it while the lease is current", async (t) => {
    const p = await postgres.place(t);
    const a = await replica(t, p, "a");
    const b = await replica(t, p, "b", 60_000);
    const r = await a.accept(newGrant("g1"));
    assert.equal(r.status, "created");
    assert.equal(r.record.lease_owner, "a");
    assert.deepEqual(await b.claim(10), []);
    await assert.rejects(b.transition("g1", "running"), LeaseLostError);
    assert.equal(await a.holds("g1"), true);
    assert.equal(await b.holds("g1"), false);
    // a's own writes go through, and the renewal keeps its lease.
    await a.transition("g1", "running");
    assert.deepEqual(await a.renew(), { renewed: 1, lost: [], cancelled: [] });
  });

  it("a lapsed lease is taken over with a new token: the old holder's writes change nothing, its renewal reports the loss", async (t) => {
    const p = await postgres.place(t);
    const a = await replica(t, p, "a");
    const b = await replica(t, p, "b", 60_000);
    await a.accept(newGrant("g1"));
    await a.accept(newGrant("g2"));
    await a.transition("g1", "running");
    // a stalls (no renewal): after the TTL, b takes both, oldest first, and learns whose they were.
    const claimed: Awaited<ReturnType<Store["claim"]>> = [];
    await until(async () => (claimed.push(...(await b.claim(10))), claimed.length === 2), "b claims the lapsed leases");
    assert.deepEqual(
      claimed.map((c) => [c.record.request_id, c.record.state, c.previous]),
      [
        ["g1", "running", "a"],
        ["g2", "provisioning", "a"],
      ],
    );
    const tokens = await p.sql<{ request_id: string; lease_owner: string; lease_token: number }>("SELECT request_id, lease_owner, lease_token FROM grants ORDER BY seq");
    assert.deepEqual(tokens.map((r) => [r.request_id, r.lease_owner, Number(r.lease_token)]), [
      ["g1", "b", 2],
      ["g2", "b", 2],
    ]);
    // a wakes: its lease check fails, and a guarded write changes nothing.
    assert.equal(await a.holds("g1"), false);
    const before = await p.sql("SELECT state, updated_at FROM grants WHERE request_id = 'g2'");
    await assert.rejects(a.transition("g2", "running"), LeaseLostError);
    await assert.rejects(a.finish("g2", "failed", log("g2")), LeaseLostError);
    assert.deepEqual(await p.sql("SELECT state, updated_at FROM grants WHERE request_id = 'g2'"), before);
    assert.deepEqual(await p.sql("SELECT request_id FROM compute_logs"), []);
    // b drives them to the end; an ended grant is leased by no one.
    await b.transition("g1", "terminating");
    await b.finish("g1", "completed", log("g1"));
    assert.deepEqual(await p.sql("SELECT lease_owner FROM grants WHERE request_id = 'g1'"), [{ lease_owner: null }]);
    assert.deepEqual(await b.renew(), { renewed: 1, lost: [], cancelled: [] });
  });

  it("renewal reports grants another replica took, and cancels recorded through another replica", async (t) => {
    const p = await postgres.place(t);
    const a = await replica(t, p, "a");
    const b = await replica(t, p, "b", 60_000);
    await a.accept(newGrant("g1"));
    await a.accept(newGrant("g2"));
    await b.requestCancel("g2");
    assert.deepEqual(await a.renew(), { renewed: 2, lost: [], cancelled: ["g2"] });
    // Taken behind a's back (as a takeover after a lapse would): a's next renewal reports it lost, once.
    await p.sql("UPDATE grants SET lease_owner = 'b', lease_token = lease_token + 1 WHERE request_id = 'g1'");
    assert.deepEqual(await a.renew(), { renewed: 1, lost: ["g1"], cancelled: ["g2"] });
    assert.deepEqual((await a.renew()).lost, []);
    // A grant that ended is not lost: it is no longer renewed.
    await a.transition("g2", "terminating");
    await a.finish("g2", "cancelled", log("g2"));
    assert.deepEqual(await a.renew(), { renewed: 0, lost: [], cancelled: [] });
  });

  it("a replica does not claim back a lapsed lease of a grant it says it still drives", async (t) => {
    const p = await postgres.place(t);
    const a = await replica(t, p, "a");
    await a.accept(newGrant("g1"));
    await a.accept(newGrant("g2"));
    // a stalls past its TTL; its task of g1 is still unwinding: only g2 is taken back.
    const first = await until(async () => {
      const c = await a.claim(10, ["g1"]);
      return c.length > 0 ? c : null;
    }, "a claims its lapsed lease of g2");
    assert.deepEqual(first.map((c) => [c.record.request_id, c.previous]), [["g2", "a"]]);
    assert.deepEqual((await a.claim(10)).map((c) => c.record.request_id), ["g1"], "once no longer driven, g1 too");
  });

  it("renewal and takeover have connections of their own: they never wait behind the grants' writes", async (t) => {
    const p = await postgres.place(t);
    // Ended first (after hooks run in order), so that a's blocked accept can end and a close.
    const blocker = new pg.Client({ connectionString: p.url! });
    await blocker.connect();
    t.after(() => blocker.end());
    const a = await PostgresStore.open({ url: p.url!, stateDir: `${p.dir}/a`, clock: systemClock, replicaId: "a", leaseTtlMs: 60_000, poolSize: 1, connectTimeoutMs: 2000 });
    t.after(() => a.close());
    await a.accept(newGrant("g1"));
    // The ledgers' lock held elsewhere: a's next accept waits for it on a's only grant connection.
    await blocker.query("SELECT pg_advisory_lock($1)", [LEDGER_LOCK]);
    const blocked = a.accept(newGrant("g2"));
    assert.deepEqual(await a.renew(), { renewed: 1, lost: [], cancelled: [] });
    assert.deepEqual(await a.claim(10), []);
    assert.equal(await a.role("leader"), true);
    await blocker.query("SELECT pg_advisory_unlock($1)", [LEDGER_LOCK]);
    assert.equal((await blocked).status, "created");
  });

  it("a released lease (a clean stop, or a task that gave up) is taken at once", async (t) => {
    const p = await postgres.place(t);
    const a = await replica(t, p, "a", 60_000);
    const b = await replica(t, p, "b", 60_000);
    await a.accept(newGrant("g1"));
    await a.accept(newGrant("g2"));
    a.forget("g1");
    const first = await until(async () => {
      const c = await b.claim(10);
      return c.length > 0 ? c : null;
    }, "b claims the forgotten lease");
    assert.deepEqual(first.map((c) => c.record.request_id), ["g1"]);
    await a.releaseAll();
    assert.deepEqual((await b.claim(10)).map((c) => c.record.request_id), ["g2"]);
    assert.deepEqual(await a.renew(), { renewed: 0, lost: [], cancelled: [] });
  });

  it("one leader at a time: renewed by its holder, taken once lapsed, and a paused ex-leader's fenced check fails", async (t) => {
    const p = await postgres.place(t);
    const a = await replica(t, p, "a");
    const b = await replica(t, p, "b", 60_000);
    assert.equal(await a.role("leader"), true);
    assert.equal(await b.role("leader"), false);
    assert.equal(await a.role("leader"), true, "renewed by its holder");
    assert.equal(await a.role("leader", { fenced: true }), true);
    // a pauses past its TTL; b takes the role.
    await until(() => b.role("leader"), "b takes the lapsed leader role");
    assert.equal(await a.role("leader", { fenced: true }), false);
    assert.equal(await a.role("leader"), false, "b's role is current");
    assert.equal(await b.role("leader", { fenced: true }), true);
  });

  it("admissions see every replica's accepts, moves and ends since their last one, in commit order", async (t) => {
    const p = await postgres.place(t);
    const a = await replica(t, p, "a");
    const b = await replica(t, p, "b");
    await a.ledgerStart();
    await b.ledgerStart();
    const seen: GrantRecord[][] = [];
    const admitA = (id: string) => a.admit((changes) => (seen.push(changes), newGrant(id)));
    await admitA("g1");
    assert.deepEqual(seen.pop(), []);
    await b.accept(newGrant("g2"));
    await b.admitMove("g2", () => ({ backend: "aws", placement: null }));
    await admitA("g3");
    assert.deepEqual(seen.pop()!.map((r) => [r.request_id, r.backend]), [
      ["g1", "local"],
      ["g2", "aws"],
    ]);
    await b.transition("g2", "terminating");
    await b.finish("g2", "completed", log("g2"));
    const none = await b.admit((changes) => (seen.push(changes), null));
    assert.equal(none, null);
    // b's move of g2 was an admission too: it saw g1 and g2 then.
    assert.deepEqual(seen.pop()!.map((r) => [r.request_id, r.state]), [
      ["g3", "provisioning"],
      ["g2", "completed"],
    ]);
    await admitA("g4");
    assert.deepEqual(seen.pop()!.map((r) => [r.request_id, r.state]), [
      ["g3", "provisioning"],
      ["g2", "completed"],
    ]);
  });
});

describe("a stalled replica (postgres)", () => {
  it("holds no lock past its lease TTL: the server ends its sessions idle in a transaction that long", async (t) => {
    const p = await postgres.place(t);
    const a = await replica(t, p, "a");
    // Both pools (grant writes, and leases with the leader role), as the server sees their sessions.
    type Q = { query(q: string): Promise<{ rows: Record<string, string>[] }> };
    const { pool, leasePool } = a as unknown as { pool: Q; leasePool: Q };
    for (const q of [pool, leasePool]) assert.equal((await q.query("SHOW idle_in_transaction_session_timeout")).rows[0]!.idle_in_transaction_session_timeout, `${TTL}ms`);
  });
});

describe("provider identity (postgres)", () => {
  it("the first replica records its public key; the others get it back to compare with theirs", async (t) => {
    const p = await postgres.place(t);
    const a = await replica(t, p, "a");
    const b = await replica(t, p, "b");
    assert.equal(await a.pinIdentity("key-A"), "key-A");
    assert.equal(await b.pinIdentity("key-B"), "key-A");
    assert.equal(await b.pinIdentity("key-A"), "key-A");
  });
});

describe("leases (sqlite: one replica)", () => {
  it("every open grant is this replica's, every check passes, and admission reports no changes", async (t) => {
    const p = await sqlite.place(t);
    const s: Store = await p.open();
    t.after(() => s.close());
    assert.equal(s.shared, false);
    await s.accept(newGrant("g1"));
    const r = await s.admit((changes) => (assert.deepEqual(changes, []), newGrant("g2")));
    assert.equal(r?.status, "created");
    assert.deepEqual((await s.claim(1)).map((c) => [c.record.request_id, c.previous]), [
      ["g1", null],
      ["g2", null],
    ]);
    assert.equal(await s.holds("g1"), true);
    assert.equal(await s.role("leader"), true);
    assert.deepEqual(await s.renew(), { renewed: 0, lost: [], cancelled: [] });
    assert.equal(await s.pinIdentity("key"), "key");
  });
});
