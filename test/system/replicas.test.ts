import assert from "node:assert/strict";
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, describe, it } from "node:test";
import { spawnDaemon, type ChildDaemon } from "../helpers/child-daemon.js";
import { tickIn, writeLocalConfig } from "../helpers/config.js";
import { call, until } from "../helpers/http.js";
import { scriptImage } from "../helpers/images.js";
import { startPostgres, stopPostgres, type PgCluster } from "../helpers/postgres.js";
import { killLocalRuns, liveLocalRuns } from "../helpers/proc.js";
import { verifySignedDoc } from "../../src/util/identity.js";
import { tempDir } from "../helpers/tmp.js";

// Several bridges, one provider (issue #19): replicas as separate processes (the production entry
// point) on one throwaway PostgreSQL 15 database, sharing the local backend's runs_dir the way
// replicas on one machine do. Leases last 3 s (renewed every second).

after(stopPostgres);

const TTL_S = 3;
const TERMINAL = ["completed", "failed", "expired", "cancelled"];

interface Replicas {
  cluster: PgCluster;
  database: string;
  runs: string;
  starts: string;
  gate: string;
  image: { url: string; sha256: string };
  /** Start a replica; `ownIdentity`: with an identity.key of its own instead of the provider's. */
  start(name: string, o?: { ownIdentity?: boolean }): Promise<ChildDaemon>;
  sql<R>(query: string, params?: unknown[]): Promise<R[]>;
}

/** A database, a shared runs_dir, a gated workload image, and replicas started on demand (killed after the test). */
async function replicas(t: { after(fn: () => unknown): void }, local: Record<string, unknown> = {}): Promise<Replicas> {
  const cluster = await startPostgres();
  const url = await cluster.createDatabase();
  const database = new URL(url).pathname.slice(1);
  const dir = tempDir(t);
  const runs = path.join(dir, "runs");
  const starts = path.join(dir, "starts");
  const gate = path.join(dir, "gate");
  writeFileSync(path.join(dir, "db.url"), `${url}\n`, { mode: 0o600 });
  const image = scriptImage(dir, "work", `echo "$ID" >> ${starts}; while [ ! -e ${gate} ]; do sleep 0.05; done; exit 7`);
  const started: ChildDaemon[] = [];
  let firstName: string | undefined;
  t.after(async () => {
    for (const d of started) await d.kill9();
    killLocalRuns(dir, runs);
  });
  return {
    cluster,
    database,
    runs,
    starts,
    gate,
    image,
    async start(name, o = {}) {
      const rdir = path.join(dir, name);
      mkdirSync(path.join(rdir, "state"), { recursive: true, mode: 0o700 });
      // One provider: every replica signs with the first one's identity.key (as the docs say to set them up).
      const first = started.length > 0 ? path.join(dir, firstName!, "state", "identity.key") : null;
      if (first && !o.ownIdentity) copyFileSync(first, path.join(rdir, "state", "identity.key"));
      firstName ??= name;
      const config = writeLocalConfig(rdir, {
        stateDir: path.join(rdir, "state"),
        logLevel: "info",
        local: { runs_dir: runs, max_concurrent: 500, ...local },
        extra: `\n[store]\nkind = "postgres"\nurl_file = ${JSON.stringify(path.join(dir, "db.url"))}\nlease_ttl_seconds = ${TTL_S}\nreplica_id = ${JSON.stringify(name)}\n`,
      });
      const d = await spawnDaemon(config);
      started.push(d);
      return d;
    },
    sql: (query, params) => cluster.query(database, query, params) as never,
  };
}

/** One valid_to for the whole file: a re-post is the same body. */
const VALID_TO = tickIn(1800);
const post = (r: Replicas, url: string, id: string) =>
  call(url, "POST", "/v1/grants", {
    grant: { request_id: id, region: "local", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: VALID_TO },
    envelope: { image: { url: r.image.url, sha256: r.image.sha256, format: "bundle" }, env: { ID: id } },
  });

const startsOf = (r: Replicas) => (existsSync(r.starts) ? readFileSync(r.starts, "utf8").trim().split("\n").filter(Boolean) : []);

describe("replicas on one PostgreSQL database", () => {
  it("any replica accepts; idempotency and conflicts hold across them; together they never over-admit", async (t) => {
    const r = await replicas(t, { max_concurrent: 6 });
    const [a, b] = [await r.start("r1"), await r.start("r2")];
    // 20 grants at once, alternating between the replicas: the local backend takes 6 in all.
    const ids = Array.from({ length: 20 }, (_, i) => `adm-${i}`);
    const answers = await Promise.all(ids.map((id, i) => post(r, (i % 2 ? b : a).url, id)));
    const accepted = ids.filter((_, i) => answers[i]!.status === 202);
    assert.equal(accepted.length, 6, `answers: ${answers.map((x) => x.status).join(" ")}`);
    for (const x of answers) assert.ok([202, 422].includes(x.status), `${x.status} ${x.text}`);
    // A re-post to the other replica is the same grant (200); another body under its id is a conflict (409).
    const first = ids.indexOf(accepted[0]!);
    const other = first % 2 ? a : b;
    assert.equal((await post(r, other.url, accepted[0]!)).status, 200);
    const conflict = await call(other.url, "POST", "/v1/grants", {
      grant: { request_id: accepted[0], region: "local", tdx_required: false, cpu_millicores: 200, ram_mib: 64, valid_to: VALID_TO },
      envelope: { image: { url: r.image.url, sha256: r.image.sha256, format: "bundle" } },
    });
    assert.equal(conflict.status, 409);
    assert.equal((await r.sql<{ n: string }>("SELECT COUNT(*) AS n FROM grants"))[0]!.n, "6");
    // Either replica serves any grant's record.
    for (const id of accepted) for (const d of [a, b]) assert.equal((await call(d.url, "GET", `/v1/grants/${id}`)).status, 200);
    await until(() => startsOf(r).length === 6, "the 6 workloads to start", 60_000);
    // A slot frees only when a grant ends, whichever replica ended it.
    assert.equal((await post(r, b.url, "adm-late")).status, 422);
    writeFileSync(r.gate, "");
    await until(async () => (await r.sql<{ n: string }>("SELECT COUNT(*) AS n FROM grants WHERE state = 'completed'"))[0]!.n === "6", "the 6 grants to complete", 60_000);
    assert.equal((await post(r, b.url, "adm-late")).status, 202);
  });

  it("kill -9 and SIGSTOP: the survivor takes every grant over, each ends once with one ComputeLog, and the paused replica, woken, writes nothing", async (t) => {
    const r = await replicas(t);
    const [a, b] = [await r.start("r1"), await r.start("r2")];
    const ids = { r1: Array.from({ length: 8 }, (_, i) => `a-${i}`), r2: Array.from({ length: 8 }, (_, i) => `b-${i}`) };
    for (const id of ids.r1) assert.equal((await post(r, a.url, id)).status, 202);
    for (const id of ids.r2) assert.equal((await post(r, b.url, id)).status, 202);
    await until(() => startsOf(r).length === 16, "the 16 workloads to start", 90_000);
    await until(async () => (await r.sql<{ n: string }>("SELECT COUNT(*) AS n FROM grants WHERE state = 'running'"))[0]!.n === "16", "the 16 grants to be running", 60_000, 100);
    const owners = await r.sql<{ request_id: string; lease_owner: string; state: string }>("SELECT request_id, lease_owner, state FROM grants ORDER BY request_id");
    assert.deepEqual(
      owners.map((o) => [o.request_id.slice(0, 1), o.lease_owner, o.state]),
      [...ids.r1.map(() => ["a", "r1", "running"]), ...ids.r2.map(() => ["b", "r2", "running"])],
    );
    const c = await r.start("r3");

    // r1 dies, r2 stalls: r3 takes all 16 over once their leases lapse.
    await a.kill9();
    b.proc.kill("SIGSTOP");
    t.after(() => b.proc.kill("SIGCONT"));
    const stoppedAt = Date.now();
    await until(async () => (await r.sql<{ n: string }>("SELECT COUNT(*) AS n FROM grants WHERE lease_owner = 'r3'"))[0]!.n === "16", "r3 to hold all 16 leases", 90_000, 100);
    const takeoverMs = Date.now() - stoppedAt;
    t.diagnostic(`takeover of 16 running grants: ${takeoverMs} ms (lease TTL ${TTL_S} s)`);
    // r3 is the leader now (r2 held it or r1 did; both lapsed).
    await until(async () => (await r.sql<{ owner: string }>("SELECT owner FROM roles WHERE name = 'leader'"))[0]?.owner === "r3", "r3 to lead", 30_000, 100);

    // The workloads finish; r3 ends every grant.
    writeFileSync(r.gate, "");
    await until(async () => (await r.sql<{ n: string }>("SELECT COUNT(*) AS n FROM grants WHERE state = 'completed'"))[0]!.n === "16", "r3 to complete all 16", 90_000, 100);
    // r2 wakes: its leases are gone, so it drops its grants without a write.
    const transitionsBefore = await r.sql<{ n: string }>("SELECT COUNT(*) AS n FROM transitions");
    b.proc.kill("SIGCONT");
    await until(() => (b.output().match(/lease lost/g) ?? []).length >= 8, "r2 to notice it lost its 8 leases", 30_000, 100);
    // Still serving: it answers, and it may take new grants.
    assert.equal((await call(b.url, "GET", "/v1/grants/b-0")).status, 200);
    assert.deepEqual(await r.sql("SELECT COUNT(*) AS n FROM transitions"), transitionsBefore, "the woken replica wrote no transition");

    // Each grant ended once, as its workload said, with one ComputeLog; each workload ran once; none is left.
    const ended = await r.sql<{ request_id: string; state: string; lease_owner: string | null }>("SELECT request_id, state, lease_owner FROM grants ORDER BY request_id");
    assert.ok(ended.every((g) => g.state === "completed" && g.lease_owner === null), JSON.stringify(ended));
    const terminal = await r.sql<{ request_id: string; n: string }>(`SELECT request_id, COUNT(*) AS n FROM transitions WHERE to_state IN (${TERMINAL.map((s) => `'${s}'`).join(",")}) GROUP BY request_id`);
    assert.equal(terminal.length, 16);
    assert.ok(terminal.every((x) => x.n === "1"), JSON.stringify(terminal));
    const logs = await r.sql<{ log_json: string }>("SELECT log_json FROM compute_logs");
    assert.equal(logs.length, 16);
    assert.ok(logs.every((l) => (JSON.parse(l.log_json) as { exit_code: number }).exit_code === 7));
    // One provider signature, whichever replica wrote the log: the card's key verifies every one.
    const card = (await call(c.url, "GET", "/v1/provider-card")).body as { public_key: string };
    assert.ok(logs.every((l) => verifySignedDoc(JSON.parse(l.log_json), card.public_key)), "every ComputeLog verifies with the provider's key");
    assert.deepEqual(startsOf(r).sort(), [...ids.r1, ...ids.r2].sort(), "every workload started exactly once");
    assert.equal(liveLocalRuns("", r.runs).size, 0, "nothing left running");
    assert.match(c.output(), /taking over a grant whose replica's lease lapsed/);
    // Who drives what, in r3's metrics and on every one of its log lines.
    const metrics = (await call(c.url, "GET", "/metrics")).text;
    assert.match(metrics, /^cb_replica_info\{replica="r3",store="postgres"\} 1$/m);
    assert.match(metrics, /^cb_leader 1$/m);
    const taken = [...metrics.matchAll(/^cb_lease_takeovers_total\{from_replica="(r[12])"\} (\d+)$/gm)].reduce((n, m) => n + Number(m[2]), 0);
    assert.equal(taken, 16, metrics.split("\n").filter((l) => l.startsWith("cb_lease")).join("\n"));
    const lines = c.output().split("\n").filter((l) => l.startsWith("{"));
    assert.ok(lines.length > 0 && lines.every((l) => (JSON.parse(l) as { replica?: string }).replica === "r3"), "every log line names its replica");
  });

  it("the database restarts mid-run: replicas answer 503 meanwhile, reconnect by themselves, and nothing is lost", async (t) => {
    const r = await replicas(t);
    const [a, b] = [await r.start("r1"), await r.start("r2")];
    const ids = Array.from({ length: 10 }, (_, i) => `db-${i}`);
    for (const [i, id] of ids.entries()) assert.equal((await post(r, (i % 2 ? b : a).url, id)).status, 202);
    await until(() => startsOf(r).length === 10, "the 10 workloads to start", 90_000);
    // Down for 4 s, longer than the lease TTL: leases lapse and are taken again once it is back.
    const restarted = r.cluster.restart(4000);
    // Once the replica has noticed (its lease renewal failed), a POST is answered 503 and writes nothing.
    await until(async () => (await call(a.url, "GET", "/readyz")).status === 503, "the replica to report the outage on /readyz", 30_000, 100);
    assert.equal((await post(r, a.url, "db-during")).status, 503);
    await restarted;
    // Back: both replicas accept again without a restart of their own, and every grant completes once.
    await until(async () => (await post(r, b.url, "db-after")).status === 202, "a POST after the restart to be accepted", 60_000, 200);
    writeFileSync(r.gate, "");
    const done = () => r.sql<{ n: string }>("SELECT COUNT(*) AS n FROM grants WHERE state = 'completed'");
    await until(async () => (await done())[0]!.n === "11", "the 11 grants to complete", 90_000, 200);
    assert.equal((await r.sql<{ n: string }>("SELECT COUNT(*) AS n FROM grants"))[0]!.n, "11", "the POST answered 503 wrote nothing");
    assert.equal((await r.sql<{ n: string }>("SELECT COUNT(*) AS n FROM compute_logs"))[0]!.n, "11");
    assert.deepEqual(startsOf(r).sort(), [...ids, "db-after"].sort(), "every workload started exactly once");
    for (const d of [a, b]) assert.equal((await call(d.url, "GET", "/readyz")).status, 200);
  });

  it("a replica whose identity.key is not the provider's refuses to start, saying which file to copy", async (t) => {
    const r = await replicas(t);
    await r.start("r1");
    await assert.rejects(r.start("r2", { ownIdentity: true }), /identity\.key is not the provider identity the other replicas on this database sign with.*copy identity\.key/s);
  });
});
