/**
 * bench/pg-accept: durable accepts/s of POST /v1/grants with the grant state on PostgreSQL (issue
 * #19) against SQLite (the default engine), in the same run, and two replicas accepting together
 * into one PostgreSQL database against one replica alone.
 *   node --import tsx bench/pg-accept.ts [grants per round] [connections] [rounds]
 *
 * The daemon's accept path as bench/listener.ts builds it (the compiled build: store, GrantManager,
 * listener) in this process, its backend one that takes every grant and parks it mid-provision, so
 * only the accept is measured. Each round accepts the same number of grants (2,000) over the same
 * number of connections (32) into each configuration in turn, so a noisy neighbour hits them alike:
 *  - SQLite (the baseline): the writer thread's group commit, WAL fsync;
 *  - PostgreSQL, one replica: each admission is a transaction under an advisory lock that
 *    serializes admissions across replicas (src/store/postgres.ts admit());
 *  - PostgreSQL, two replicas (r1, r2: their own store, pool, manager and listener, one database),
 *    half the connections to each: their combined accepts/s.
 * The PostgreSQL replicas run as the daemon runs them (resumeAll: the lease loop renews every lease
 * held every 5 s). The cluster is a throwaway one (test/helpers/postgres.ts) on loopback, its data
 * on the same disk as SQLite's, with fsync on as in production. BENCH_PG_FSYNC=off runs it as the
 * tests do (fsync=off): the difference is what its WAL flushes cost.
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import pg from "pg";
import type { ManagedBackend } from "../src/backends/backend.js";
import type { Store } from "../src/store/store.js";
import { startPostgres, stopPostgres, type PgCluster } from "../test/helpers/postgres.js";
import { fromDist } from "./lib/dist.js";
import { LoadClient, table, type LoadResult } from "./lib/load.js";
import { cardConfigToml } from "./lib/card-config.js";

const { Almanac } = await fromDist<typeof import("../src/domain/index.js")>("domain/index.js");
const { Fleet } = await fromDist<typeof import("../src/fleet/fleet.js")>("fleet/fleet.js");
const { GrantManager } = await fromDist<typeof import("../src/lifecycle/manager.js")>("lifecycle/manager.js");
const { buildCard } = await fromDist<typeof import("../src/fleet/card.js")>("fleet/card.js");
const { parseConfigText } = await fromDist<typeof import("../src/config/load.js")>("config/load.js");
const { buildListener } = await fromDist<typeof import("../src/listener/server.js")>("listener/server.js");
const { SqliteStore } = await fromDist<typeof import("../src/store/sqlite.js")>("store/sqlite.js");
const { PostgresStore } = await fromDist<typeof import("../src/store/postgres.js")>("store/postgres.js");
const { systemClock } = await fromDist<typeof import("../src/util/clock.js")>("util/clock.js");
const { Identity } = await fromDist<typeof import("../src/util/identity.js")>("util/identity.js");
const { createLogger } = await fromDist<typeof import("../src/util/logger.js")>("util/logger.js");

const TOKEN = "bench-token-0123456789";
const REGION = "bench-1";
/** For the card route only (never called here); the backend is the parked one below. */
const CFG = cardConfigToml(REGION);

/** Accepts every grant and parks it: the bench measures the accept path, not workloads. */
function parkedBackend(): ManagedBackend {
  return {
    name: "parked",
    capabilities: () => ({ regions: [REGION], tdx_capable: false, max_cpu_millicores: 1e9, max_ram_mib: 1e9 }),
    canSatisfy: () => ({ ok: true }),
    provision: (_g, _e, signal) => new Promise((_, reject) => signal.addEventListener("abort", () => reject(signal.reason), { once: true })),
    watchUntilExit: async () => ({ kind: "exited", exit_code: 0, cpu_seconds: null, peak_memory_mib: null, ended_at: null, failure: null }),
    terminate: async () => undefined,
  };
}

interface Replica {
  url: string;
  store: Store;
  /** Store write latencies (ms): SQLite's group commits, PostgreSQL's accept transactions. */
  writes: number[];
  close(): Promise<void>;
}

/** One daemon's accept path on `store`, listening on loopback. */
async function replica(store: Store): Promise<Replica> {
  const log = createLogger("silent");
  const writes: number[] = [];
  store.onWrite = (op, ms) => {
    if (op === "group_commit" || op === "accept") writes.push(ms);
  };
  const fleet = Fleet.of([parkedBackend()], systemClock);
  const identity = Identity.ephemeral();
  const manager = await GrantManager.open({ store, fleet, almanac: new Almanac(new Date("2026-01-01T00:00:00Z"), 1), identity, log, clock: systemClock, providerId: "bench", maxAttempts: 1 });
  // As the daemon starts: the lease loop (PostgreSQL) runs while grants are accepted.
  await manager.resumeAll();
  const l = buildListener({ manager, store, card: () => buildCard(parseConfigText(CFG, "bench"), fleet, identity), token: TOKEN, log, bodyLimit: 1 << 20 });
  await l.app.listen({ host: "127.0.0.1", port: 0 });
  return {
    url: `http://127.0.0.1:${(l.app.server.address() as { port: number }).port}/v1/grants`,
    store,
    writes,
    close: async () => {
      await manager.shutdown(1000);
      await l.app.close();
      await store.close();
    },
  };
}

/** CPU time (ms, 10 ms ticks) of the postmaster and its children (backends, WAL writer, ...), from /proc. */
function clusterCpuMs(postmaster: number): number {
  let ms = 0;
  for (const pid of readdirSync("/proc")) {
    if (!/^\d+$/.test(pid)) continue;
    try {
      const f = readFileSync(`/proc/${pid}/stat`, "utf8");
      const x = f.slice(f.lastIndexOf(")") + 2).split(" ");
      if (Number(x[1]) === postmaster || Number(pid) === postmaster) ms += (Number(x[11]) + Number(x[12])) * 10;
    } catch {
      /* exited meanwhile */
    }
  }
  return ms;
}

/** The postmaster's pid: the parent of a backend, read while that backend's connection is open. */
async function postmasterOf(cluster: PgCluster): Promise<number> {
  const c = new pg.Client({ connectionString: cluster.url("postgres") });
  await c.connect();
  try {
    const pid = (await c.query<{ pid: number }>("SELECT pg_backend_pid() AS pid")).rows[0]!.pid;
    const f = readFileSync(`/proc/${pid}/stat`, "utf8");
    return Number(f.slice(f.lastIndexOf(")") + 2).split(" ")[1]);
  } finally {
    await c.end();
  }
}

type Config = "sqlite" | "pg" | "pg2";
interface Round {
  res: LoadResult;
  /** This process's CPU (ms): the bridge (both replicas for pg2), its store writer thread included. */
  bridgeCpuMs: number;
  /** The PostgreSQL server's processes (ms, 10 ms ticks); 0 for SQLite. */
  pgCpuMs: number;
}

export async function run(grants = 2000, connections = 32, rounds = 3): Promise<{ text: string; figures: Record<string, unknown> }> {
  const durable = process.env.BENCH_PG_FSYNC !== "off";
  const dir = mkdtempSync(path.join(os.tmpdir(), "cb-bench-pg-"));
  const cluster = await startPostgres({ durable });
  const clients: LoadClient[] = [];
  const replicas: Replica[] = [];
  try {
    const db1 = await cluster.createDatabase();
    const db2 = await cluster.createDatabase();
    const dbName = (url: string) => new URL(url).pathname.slice(1);
    const postmaster = await postmasterOf(cluster);
    const sqlite = await replica(new SqliteStore(path.join(dir, "sqlite"), systemClock));
    const pg = await replica(await PostgresStore.open({ url: db1, stateDir: path.join(dir, "pg"), clock: systemClock, replicaId: "r1" }));
    const pgA = await replica(await PostgresStore.open({ url: db2, stateDir: path.join(dir, "pg2-r1"), clock: systemClock, replicaId: "r1" }));
    const pgB = await replica(await PostgresStore.open({ url: db2, stateDir: path.join(dir, "pg2-r2"), clock: systemClock, replicaId: "r2" }));
    replicas.push(sqlite, pg, pgA, pgB);
    clients.push(new LoadClient(), new LoadClient());

    const headers = { authorization: `Bearer ${TOKEN}` };
    const template = JSON.stringify({
      grant: { request_id: `bench-${process.pid}-__I__`, region: REGION, tdx_required: false, cpu_millicores: 1000, ram_mib: 512, valid_to: 10_000_000_000 },
      envelope: { image: { url: "https://images.example/x.tar.gz", sha256: "a".repeat(64), format: "bundle" }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb0 bench" },
    });
    let offset = 0;
    const batch = (url: string, n: number, c: number, client = clients[0]!) => {
      const job = { url, connections: c, seconds: 600, requests: n, headers, template, offset };
      offset += n;
      return client.run(job);
    };
    const measured = async (config: Config, n: number): Promise<Round> => {
      const c0 = process.cpuUsage();
      const p0 = clusterCpuMs(postmaster);
      let res: LoadResult;
      if (config === "pg2") {
        // Half the connections (and grants) to each replica, at the same time.
        const [a, b] = await Promise.all([batch(pgA.url, n / 2, connections / 2, clients[0]), batch(pgB.url, n / 2, connections / 2, clients[1])]);
        const statuses: Record<number, number> = {};
        for (const r of [a, b]) for (const [k, v] of Object.entries(r.statuses)) statuses[Number(k)] = (statuses[Number(k)] ?? 0) + v;
        const seconds = Math.max(a.seconds, b.seconds);
        // The slower replica's latencies.
        res = { requests: a.requests + b.requests, errors: a.errors + b.errors, seconds, rps: (a.requests + b.requests) / seconds, p50: Math.max(a.p50, b.p50), p99: Math.max(a.p99, b.p99), statuses };
      } else res = await batch((config === "sqlite" ? sqlite : pg).url, n, connections);
      const c = process.cpuUsage(c0);
      return { res, bridgeCpuMs: (c.user + c.system) / 1000, pgCpuMs: config === "sqlite" ? 0 : clusterCpuMs(postmaster) - p0 };
    };

    // Warm-up (JIT, the writer thread, the pools' connections), not measured.
    const warm = { sqlite: 0, pg: 0, pg2: 0 };
    for (const config of ["sqlite", "pg", "pg2"] as const) warm[config] = (await measured(config, 200)).res.statuses[202] ?? 0;
    for (const r of replicas) r.writes.length = 0;
    const byConfig: Record<Config, Round[]> = { sqlite: [], pg: [], pg2: [] };
    for (let i = 0; i < rounds; i++) for (const config of ["sqlite", "pg", "pg2"] as const) byConfig[config].push(await measured(config, grants));

    // Every 202 the load generator saw is a grant in the store, and no more.
    const answered = (config: Config) => byConfig[config].reduce((a, r) => a + (r.res.statuses[202] ?? 0), 0) + warm[config];
    const countPg = async (url: string) => Number((await cluster.query<{ n: string }>(dbName(url), "SELECT COUNT(*) AS n FROM grants"))[0]!.n);
    const held = { sqlite: Object.values(sqlite.store.countByState()).reduce((a, n) => a + n, 0), pg: await countPg(db1), pg2: await countPg(db2) };
    for (const config of ["sqlite", "pg", "pg2"] as const) if (held[config] !== answered(config)) throw new Error(`${config}: the load generator saw ${answered(config)} grants accepted, the store holds ${held[config]}`);
    const leases = await cluster.query<{ owner: string; n: string }>(dbName(db2), "SELECT lease_owner AS owner, COUNT(*) AS n FROM grants GROUP BY lease_owner ORDER BY 1");

    const med = (config: Config, f: (r: Round) => number) => median(byConfig[config].map(f));
    const rps = (c: Config) => med(c, (r) => r.res.rps);
    const perRound = (a: Config, b: Config) => byConfig[a].map((r, i) => r.res.rps / byConfig[b][i]!.res.rps);
    const non2xx = (c: Config) => byConfig[c].reduce((a, r) => a + r.res.requests - (r.res.statuses[202] ?? 0), 0);
    const pgOverSqlite = perRound("pg", "sqlite");
    const pg2OverSqlite = perRound("pg2", "sqlite");
    const pg2OverPg = perRound("pg2", "pg");
    const rows: (string | number)[][] = [
      ["configuration", "accepts/s", "p50 ms", "p99 ms", "non-202"],
      ["SQLite, one daemon (baseline)", rps("sqlite"), med("sqlite", (r) => r.res.p50), med("sqlite", (r) => r.res.p99), non2xx("sqlite")],
      ["PostgreSQL, one replica", rps("pg"), med("pg", (r) => r.res.p50), med("pg", (r) => r.res.p99), non2xx("pg")],
      [`PostgreSQL, two replicas (${connections / 2} connections each), combined`, rps("pg2"), med("pg2", (r) => r.res.p50), med("pg2", (r) => r.res.p99), non2xx("pg2")],
      ["ratio PostgreSQL / SQLite", median(pgOverSqlite), med("pg", (r) => r.res.p50) / med("sqlite", (r) => r.res.p50), med("pg", (r) => r.res.p99) / med("sqlite", (r) => r.res.p99), ""],
      ["ratio two replicas / SQLite", median(pg2OverSqlite), "", "", ""],
      ["ratio two replicas / one replica", median(pg2OverPg), "", "", ""],
    ];
    const fmt = (xs: number[]) => xs.map((x) => x.toFixed(2)).join(", ");
    const cpuPer = (c: Config, f: (r: Round) => number) => ((byConfig[c].reduce((a, r) => a + f(r), 0) * 1000) / byConfig[c].reduce((a, r) => a + r.res.requests, 0)).toFixed(0);
    const q = (xs: number[], p: number) => {
      const s = [...xs].sort((a, b) => a - b);
      return (s[Math.min(s.length - 1, Math.floor(p * s.length))] ?? NaN).toFixed(2);
    };
    const pg2Writes = [...pgA.writes, ...pgB.writes];
    const text = [
      table(rows),
      `per round: PostgreSQL/SQLite ${fmt(pgOverSqlite)}; two replicas/one ${fmt(pg2OverPg)}`,
      `CPU per accept (µs): bridge process ${cpuPer("sqlite", (r) => r.bridgeCpuMs)} SQLite vs ${cpuPer("pg", (r) => r.bridgeCpuMs)} PostgreSQL (${cpuPer("pg2", (r) => r.bridgeCpuMs)} two replicas); PostgreSQL server ${cpuPer("pg", (r) => r.pgCpuMs)} (${cpuPer("pg2", (r) => r.pgCpuMs)} two replicas)`,
      `store writes: SQLite group commits (${sqlite.writes.length}, transaction + WAL fsync) p50 ${q(sqlite.writes, 0.5)} ms, p99 ${q(sqlite.writes, 0.99)} ms; PostgreSQL accept transactions (advisory lock wait included) one replica p50 ${q(pg.writes, 0.5)} ms, p99 ${q(pg.writes, 0.99)} ms; two replicas p50 ${q(pg2Writes, 0.5)} ms, p99 ${q(pg2Writes, 0.99)} ms`,
      `two replicas' grants by lease owner: ${leases.map((l) => `${l.owner} ${l.n}`).join(", ")}`,
      `PostgreSQL 1 cluster on loopback, fsync ${durable ? "on" : "off (BENCH_PG_FSYNC=off)"}, pool 8 connections per replica; everything shares the machine's ${os.cpus().length} cores`,
    ].join("\n");
    return { text, figures: { sqlite: rps("sqlite"), pg: rps("pg"), pg2: rps("pg2"), pg_over_sqlite: median(pgOverSqlite), pg2_over_pg: median(pg2OverPg) } };
  } finally {
    for (const c of clients) c.close();
    for (const r of replicas) await r.close().catch(() => undefined);
    await stopPostgres();
    rmSync(dir, { recursive: true, force: true });
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const [grants, connections, rounds] = [Number(process.argv[2] ?? 2000), Number(process.argv[3] ?? 32), Number(process.argv[4] ?? 3)];
  const r = await run(grants, connections, rounds);
  console.log(`durable accepts, PostgreSQL vs SQLite: ${rounds} rounds of ${grants} grants per configuration, ${connections} connections\n${r.text}`);
  process.exit(0);
}
