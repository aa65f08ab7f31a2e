/**
 * bench/takeover: how long the running grants of a replica killed with kill -9 take to be taken
 * over by another replica on the same PostgreSQL database (issue #19), against the goal "every
 * grant re-attached within TTL + 5 s", for each lease TTL given (default: 15 s, the default
 * lease_ttl_seconds, and 3 s, the shortest allowed).
 *   node --import tsx bench/takeover.ts [grants] [TTL seconds ...]
 * BENCH_TAKEOVER_LOGS=<dir> keeps each replica's log there.
 *
 * Replicas are daemons in child processes (the production bundle, test/helpers/child-daemon.ts)
 * on one throwaway PostgreSQL database (test/helpers/postgres.ts, loopback), sharing the local
 * backend's runs_dir as replicas on one machine do. Per TTL, in one run:
 *  1. r0, alone, accepts 100 grants; each starts a local workload that blocks on a FIFO (no CPU
 *     while it waits).
 *  2. Baseline: r1 starts, idle; r0 stops cleanly (SIGTERM releases its leases): the time until
 *     r1 holds all 100.
 *  3. r2 starts, idle. kill -9 r1 right after one of its renewals (the longest lease a kill can
 *     leave: nearly a TTL): the time until r2 holds every lease (polled every 50 ms:
 *     SELECT COUNT(*) FROM grants WHERE lease_owner = 'r2').
 *  4. Re-attached: a second after the takeover every grant is still running (r2's watches see
 *     their supervisors alive) with its workload alive, and once the FIFO is opened all 100
 *     complete (exit 7, one ComputeLog each), each workload having started once: the time from
 *     the gate to all 100 completed, and r2's CPU time meanwhile. Grants not completed 180 s
 *     after the gate are listed (state, lease owner, token, lease left) as a PROBLEM line with
 *     the figures, and the bench exits 1.
 * Also counted: leases a live replica lost anyway ("lease lost" lines: its renewals came more
 * than a TTL late, the process stalled or starved), which a short TTL on a loaded machine shows.
 * Every process started here (daemons, local workloads and their supervisors, PostgreSQL) is
 * killed at the end, also on failure. The cluster runs as in the tests (fsync off): what is
 * measured is lease timing, not commits.
 */
import { execFileSync } from "node:child_process";
import { closeSync, constants, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import pg from "pg";
import { spawnDaemon, type ChildDaemon } from "../test/helpers/child-daemon.js";
import { tickIn, writeLocalConfig } from "../test/helpers/config.js";
import { call } from "../test/helpers/http.js";
import { scriptImage } from "../test/helpers/images.js";
import { startPostgres, stopPostgres, type PgCluster } from "../test/helpers/postgres.js";
import { killLocalRuns, liveLocalRuns } from "../test/helpers/proc.js";
import { table } from "./lib/load.js";

const POLL_MS = 50;
const SLACK_MS = 5000;
/** After the gate opens, every grant should complete long before this (a watch polls every 200 ms). */
const COMPLETE_WITHIN_MS = 180_000;
const s = (ms: number) => `${(ms / 1000).toFixed(2)} s`;

export interface TakeoverFigures {
  ttl_s: number;
  grants: number;
  /** From the first POST until every workload had started. */
  all_running_ms: number;
  /** Baseline: SIGTERM of the holder until the idle replica holds every lease. */
  clean_ms: number;
  /** kill -9 of the holder until the idle replica holds its first lease, and every lease. */
  first_ms: number;
  all_ms: number;
  /** Leases the killed replica held when it was killed, and what was left of them (ms: shortest, longest). */
  held_at_kill: number;
  lease_left_ms: [number, number];
  /**
   * "lease lost" lines of live replicas: grants a replica stopped driving because its own lease had
   * lapsed (renewals more than a TTL late: a stalled or starved process) or was taken; r0 while
   * it ran the workloads, r1 until the kill, r2 after the takeover.
   */
  lost_by_live: { r0: number; r1: number; r2: number };
  /** Grants r2 claimed again after letting its own lease lapse ("resuming grant after restart"). */
  reclaimed_by_r2: number;
  goal_ms: number;
  /** Opening the workloads' gate until every grant completed, and r2's CPU time meanwhile. */
  gate_to_completed_ms: number;
  /** Grants completed (all of them, unless something went wrong: then `problems` says what). */
  completed: number;
  problems: string[];
  r2_cpu_to_complete_ms: number;
}

/** Until `fn` is truthy, polled every `every` ms; throws after `timeoutMs`. */
async function until<T>(fn: () => Promise<T | null | false | undefined>, what: string, timeoutMs: number, every = POLL_MS): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`takeover bench: timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

/** CPU time (ms, user + system, 10 ms ticks) a process has used so far, from /proc. */
function cpuMs(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, "utf8");
  const x = f.slice(f.lastIndexOf(")") + 2).split(" ");
  return (Number(x[11]) + Number(x[12])) * 10;
}

export async function measure(cluster: PgCluster, ttl: number, n = 100): Promise<TakeoverFigures> {
  const url = await cluster.createDatabase();
  const dir = mkdtempSync(path.join(os.tmpdir(), "cb-bench-takeover-"));
  const runs = path.join(dir, "runs");
  const starts = path.join(dir, "starts");
  const fifo = path.join(dir, "gate");
  execFileSync("mkfifo", [fifo]);
  writeFileSync(path.join(dir, "db.url"), `${url}\n`, { mode: 0o600 });
  // Opening a FIFO for reading blocks until a writer opens it: the workloads wait without polling.
  const image = scriptImage(dir, "work", `echo "$ID" >> ${starts}; cat ${fifo} > /dev/null; exit 7`);
  const daemons: ChildDaemon[] = [];
  const db = new pg.Client({ connectionString: url });
  await db.connect();
  const count = async (where: string, params: unknown[] = []) => Number((await db.query<{ n: string }>(`SELECT COUNT(*) AS n FROM grants WHERE ${where}`, params)).rows[0]!.n);
  const start = async (name: string) => {
    const rdir = path.join(dir, name);
    mkdirSync(rdir, { recursive: true });
    const config = writeLocalConfig(rdir, {
      stateDir: path.join(rdir, "state"),
      // As in production (and the lease-loss lines counted below are warnings either way).
      logLevel: "info",
      // The local backend's defaults (a 200 ms watch poll), with room for every grant.
      local: { runs_dir: runs, max_concurrent: 10_000, cpu_millicores: 10_000_000, ram_mib: 10_000_000, poll_interval_ms: 200, terminate_grace_seconds: 5 },
      extra: `\n[store]\nkind = "postgres"\nurl_file = ${JSON.stringify(path.join(dir, "db.url"))}\nlease_ttl_seconds = ${ttl}\nreplica_id = ${JSON.stringify(name)}\n`,
    });
    const d = await spawnDaemon(config);
    daemons.push(d);
    return d;
  };
  const startsSoFar = () => (existsSync(starts) ? readFileSync(starts, "utf8").trim().split("\n").filter(Boolean) : []);
  const lost = (d: ChildDaemon) => (d.output().match(/"msg":"lease lost/g) ?? []).length;
  try {
    // 1. r0 alone accepts n grants (16 at a time) and runs their workloads.
    const r0 = await start("r0");
    const validTo = tickIn(3600);
    const ids = Array.from({ length: n }, (_, i) => `tk-${ttl}-${i}`);
    const t0 = performance.now();
    for (let i = 0; i < n; i += 16)
      await Promise.all(
        ids.slice(i, i + 16).map(async (id) => {
          const r = await call(r0.url, "POST", "/v1/grants", {
            grant: { request_id: id, region: "local", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: validTo },
            envelope: { image: { url: image.url, sha256: image.sha256, format: "bundle" }, env: { ID: id } },
          });
          if (r.status !== 202) throw new Error(`takeover bench: POST ${id}: ${r.status} ${r.text}`);
        }),
      );
    await until(async () => startsSoFar().length === n && (await count("state = 'running' AND lease_owner = 'r0'")) === n, `r0 to run ${n} workloads`, 300_000);
    const allRunningMs = performance.now() - t0;

    // 2. Baseline: r1 idle; a clean stop of r0 hands its leases over at r1's next claim.
    const r1 = await start("r1");
    const lostR0 = lost(r0);
    const c0 = performance.now();
    const stopped = r0.stop();
    await until(async () => (await count("lease_owner = 'r1'")) === n, `r1 to hold the ${n} leases r0 released`, 120_000);
    const cleanMs = performance.now() - c0;
    await stopped;

    // 3. r2 idle; kill -9 r1 right after one of its renewals (seen in the database, polled every
    // 10 ms): its leases then have nearly a whole TTL left, the longest a kill leaves.
    const r2 = await start("r2");
    const expiry = async () => Number((await db.query<{ e: string }>("SELECT MAX(lease_expires_at) AS e FROM grants WHERE lease_owner = 'r1'")).rows[0]!.e);
    const e0 = await expiry();
    await until(async () => (await expiry()) > e0, "r1 to renew its leases", ttl * 2000, 10);
    const atKill = (
      await db.query<{ lo: string; hi: string; n: string }>(
        "SELECT MIN(lease_expires_at) - (extract(epoch from clock_timestamp()) * 1000)::bigint AS lo, MAX(lease_expires_at) - (extract(epoch from clock_timestamp()) * 1000)::bigint AS hi, COUNT(*) AS n FROM grants WHERE lease_owner = 'r1'",
      )
    ).rows[0]!;
    const k0 = performance.now();
    r1.proc.kill("SIGKILL");
    let firstMs = 0;
    await until(
      async () => {
        const held = await count("lease_owner = 'r2'");
        if (held > 0 && !firstMs) firstMs = performance.now() - k0;
        return held === n;
      },
      `r2 to hold all ${n} leases`,
      (ttl + 60) * 1000,
    );
    const allMs = performance.now() - k0;
    await r1.kill9();
    const lostR1 = lost(r1);

    // 4. Re-attached: still running a few watch polls later (r2's watches see live supervisors),
    // every workload alive; then the gate opens and r2 completes every grant.
    await new Promise((r) => setTimeout(r, 1000));
    const running = await count("state = 'running' AND lease_owner = 'r2'");
    if (running !== n) throw new Error(`takeover bench: ${running} of ${n} grants still running under r2 after the takeover`);
    const live = [...liveLocalRuns("", runs).keys()].filter((k) => k.endsWith("workload_pid")).length;
    if (live !== n) throw new Error(`takeover bench: ${live} of ${n} workloads alive after the takeover`);
    const g0 = performance.now();
    const cpu0 = cpuMs(r2.proc.pid!);
    const openGate = () => {
      // Non-blocking: fails (ENXIO) when no workload is reading; the readers see EOF at the close.
      try {
        closeSync(openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK));
      } catch {
        /* no reader right now */
      }
    };
    let polls = 0;
    let completed = 0;
    await until(
      async () => {
        if (polls++ % 10 === 0) openGate(); // a workload that was not reading yet gets a later one
        completed = await count("state = 'completed'");
        return completed === n || performance.now() - g0 > COMPLETE_WITHIN_MS;
      },
      `r2 to complete all ${n} grants`,
      COMPLETE_WITHIN_MS + 60_000,
    );
    const gateMs = performance.now() - g0;
    const gateCpuMs = cpuMs(r2.proc.pid!) - cpu0;
    // What did not go as it should is reported with the figures (the takeover figure stands).
    const problems: string[] = [];
    if (completed !== n) {
      const rest = (
        await db.query<{ request_id: string; state: string; lease_owner: string | null; lease_token: string; left_ms: string }>(
          "SELECT request_id, state, lease_owner, lease_token, lease_expires_at - (extract(epoch from clock_timestamp()) * 1000)::bigint AS left_ms FROM grants WHERE state <> 'completed' ORDER BY request_id",
        )
      ).rows;
      problems.push(
        `${n - completed} of ${n} grants not completed ${s(COMPLETE_WITHIN_MS)} after the gate opened (r2 alive): ${rest.map((r) => `${r.request_id} ${r.state}, lease ${r.lease_owner ?? "none"} token ${r.lease_token}, ${s(Number(r.left_ms))} left`).join("; ")}`,
      );
    }
    const logs = (await db.query<{ log_json: string }>("SELECT log_json FROM compute_logs")).rows;
    if (logs.length !== completed || !logs.every((l) => (JSON.parse(l.log_json) as { exit_code: number }).exit_code === 7)) problems.push(`${logs.length} ComputeLogs for ${completed} completed grants, not all with exit code 7`);
    const ran = startsSoFar();
    if (ran.length !== n || new Set(ran).size !== n) problems.push(`${ran.length} workload starts for ${n} grants`);
    if (!r2.output().includes("taking over a grant whose replica's lease lapsed")) problems.push("r2 did not log its takeover");
    return {
      ttl_s: ttl,
      grants: n,
      all_running_ms: allRunningMs,
      clean_ms: cleanMs,
      first_ms: firstMs,
      all_ms: allMs,
      held_at_kill: Number(atKill.n),
      lease_left_ms: [Number(atKill.lo), Number(atKill.hi)],
      goal_ms: ttl * 1000 + SLACK_MS,
      gate_to_completed_ms: gateMs,
      completed,
      problems,
      r2_cpu_to_complete_ms: gateCpuMs,
      lost_by_live: { r0: lostR0, r1: lostR1, r2: lost(r2) },
      reclaimed_by_r2: (r2.output().match(/"msg":"resuming grant after restart"/g) ?? []).length,
    };
  } finally {
    const keep = process.env.BENCH_TAKEOVER_LOGS;
    if (keep) {
      mkdirSync(keep, { recursive: true });
      for (const [i, d] of daemons.entries()) writeFileSync(path.join(keep, `ttl${ttl}-r${i}.log`), d.output());
    }
    for (const d of daemons) await d.kill9().catch(() => undefined);
    killLocalRuns("", runs);
    await db.end().catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  }
}

export async function run(n = 100, ttls = [15, 3]): Promise<{ text: string; figures: TakeoverFigures[] }> {
  const figures: TakeoverFigures[] = [];
  try {
    const cluster = await startPostgres();
    for (const ttl of ttls) figures.push(await measure(cluster, ttl, n));
  } finally {
    await stopPostgres();
  }
  const rows: (string | number)[][] = [
    ["lease TTL", "kill -9 to all leased by r2", "goal TTL + 5 s", "ratio to goal", "", "r1's leases at the kill: held, left", "then r2's next claim", "first leased", "clean stop (SIGTERM) to all leased", "gate to all completed"],
  ];
  for (const f of figures)
    rows.push([
      `${f.ttl_s} s`,
      s(f.all_ms),
      s(f.goal_ms),
      (f.all_ms / f.goal_ms).toFixed(2),
      f.all_ms <= f.goal_ms ? "OK" : "MISSED",
      `${f.held_at_kill}, ${s(f.lease_left_ms[0])} - ${s(f.lease_left_ms[1])}`,
      s(f.all_ms - f.lease_left_ms[1]),
      s(f.first_ms),
      s(f.clean_ms),
      `${f.completed === f.grants ? "" : `${f.completed} of ${f.grants} in `}${s(f.gate_to_completed_ms)} (r2 CPU ${s(f.r2_cpu_to_complete_ms)})`,
    ]);
  const text = [
    table(rows),
    `${n} running local grants per TTL (r0 ran them in ${figures.map((f) => s(f.all_running_ms)).join(", ")}); a second after each takeover every grant was still running with its workload alive, then ${figures.every((f) => f.problems.length === 0) ? "all" : "(see PROBLEM below)"} completed (exit 7, one ComputeLog each, each workload started once)`,
    `leases lost by a live replica (its renewals over a TTL late): ${figures.map((f) => `TTL ${f.ttl_s} s: r0 ${f.lost_by_live.r0} while running the workloads, r1 ${f.lost_by_live.r1} before the kill, r2 ${f.lost_by_live.r2} after the takeover (${f.reclaimed_by_r2} claimed again by r2)`).join("; ")}`,
    `leases are renewed and lapsed ones claimed every TTL/3: a takeover waits for what is left of the lease (here nearly a TTL) plus up to TTL/3 for the survivor's next claim; a clean stop releases the leases, so only the claim is waited for (0 to TTL/3)`,
    ...figures.flatMap((f) => f.problems.map((p) => `PROBLEM (TTL ${f.ttl_s} s): ${p}`)),
    `load average at the end: ${os.loadavg().map((x) => x.toFixed(1)).join(", ")} on ${os.cpus().length} cores`,
  ].join("\n");
  return { text, figures };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const n = Number(process.argv[2] ?? 100);
  const ttls = process.argv.length > 3 ? process.argv.slice(3).map(Number) : [15, 3];
  const r = await run(n, ttls);
  console.log(`takeover after kill -9: ${n} running grants, replicas on one PostgreSQL database\n${r.text}`);
  process.exit(r.figures.some((f) => f.problems.length > 0) ? 1 : 0);
}
