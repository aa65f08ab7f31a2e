/**
 * bench/listener: accepted grants/s and p50/p99 latency of POST /v1/grants (validation, routing,
 * fsync-durable group commit) against a bare fastify route, in the same run. It measures the
 * compiled build (dist/, rebuilt first if the source changed), which is what the daemon runs.
 *   node --import tsx bench/listener.ts [seconds per route] [connections] [rounds]
 * BENCH_STATE_PARENT=/dev/shm puts the state database on tmpfs (fsync free): the difference to a
 * run on disk is what the disk costs.
 */
import Fastify from "fastify";
import { closeSync, fsyncSync, mkdtempSync, openSync, rmSync, writeSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import type { ManagedBackend } from "../src/backends/backend.js";
import { fromDist } from "./lib/dist.js";
import { LoadClient, table, type LoadJob, type LoadResult } from "./lib/load.js";
import { cpuByGroup, threadCpuMs } from "./lib/threads.js";
import { cardConfigToml } from "./lib/card-config.js";

// The accept path as the daemon runs it: the compiled build, not the source under tsx (whose
// transform and loader add 10-15% to the CPU per request).
const { Almanac } = await fromDist<typeof import("../src/domain/index.js")>("domain/index.js");
const { buildCard } = await fromDist<typeof import("../src/fleet/card.js")>("fleet/card.js");
const { Fleet } = await fromDist<typeof import("../src/fleet/fleet.js")>("fleet/fleet.js");
const { GrantManager } = await fromDist<typeof import("../src/lifecycle/manager.js")>("lifecycle/manager.js");
const { buildListener } = await fromDist<typeof import("../src/listener/server.js")>("listener/server.js");
const { SqliteStore: Store } = await fromDist<typeof import("../src/store/sqlite.js")>("store/sqlite.js");
const { systemClock } = await fromDist<typeof import("../src/util/clock.js")>("util/clock.js");
const { Identity } = await fromDist<typeof import("../src/util/identity.js")>("util/identity.js");
const { createLogger } = await fromDist<typeof import("../src/util/logger.js")>("util/logger.js");
const { parseConfigText } = await fromDist<typeof import("../src/config/load.js")>("config/load.js");

const TOKEN = "bench-token-0123456789";

/** Accepts every grant and parks it: the bench measures the accept path, not workloads. */
function parkedBackend(): ManagedBackend {
  return {
    name: "parked",
    capabilities: () => ({ regions: ["bench-1"], tdx_capable: false, max_cpu_millicores: 1e9, max_ram_mib: 1e9 }),
    canSatisfy: () => ({ ok: true }),
    provision: (_g, _e, signal) => new Promise((_, reject) => signal.addEventListener("abort", () => reject(signal.reason), { once: true })),
    watchUntilExit: async () => ({ kind: "exited", exit_code: 0, cpu_seconds: null, peak_memory_mib: null, ended_at: null, failure: null }),
    terminate: async () => undefined,
  };
}

const CFG = cardConfigToml("bench-1");

export async function run(seconds = 8, connections = 32, rounds = 10): Promise<{ bare: LoadResult; bridge: LoadResult; text: string }> {
  const dir = mkdtempSync(path.join(process.env.BENCH_STATE_PARENT ?? os.tmpdir(), "cb-bench-"));
  const log = createLogger("silent");
  const sample = (i: number) =>
    JSON.stringify({
      grant: { request_id: `bench-${process.pid}-${i}`, region: "bench-1", tdx_required: false, cpu_millicores: 1000, ram_mib: 512, valid_to: 10_000_000_000 },
      envelope: { image: { url: "https://images.example/x.tar.gz", sha256: "a".repeat(64), format: "bundle" }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb0 bench" },
    });

  // Baseline: a bare fastify route parsing the same JSON body.
  const bare = Fastify();
  bare.post("/v1/grants", async (_req, reply) => reply.code(202).send({ request_id: "x", state: "accepted", backend: "bare" }));
  await bare.listen({ host: "127.0.0.1", port: 0 });
  const bareUrl = `http://127.0.0.1:${(bare.server.address() as { port: number }).port}/v1/grants`;

  // The bridge's accept path with a durable store.
  const threadsBefore = new Set(threadCpuMs().keys());
  const store = new Store(dir, systemClock);
  // The writer's group commits (transaction + fsync of the WAL), as cb_store_write_seconds sees them.
  const commits: number[] = [];
  store.onWrite = (_op, ms) => commits.push(ms);
  const fleet = Fleet.of([parkedBackend()], systemClock);
  const identity = Identity.ephemeral();
  const manager = await GrantManager.open({ store, fleet, almanac: new Almanac(new Date("2026-01-01T00:00:00Z"), 1), identity, log, clock: systemClock, providerId: "bench", maxAttempts: 1 });
  const cfg = parseConfigText(CFG, "bench");
  const l = buildListener({ manager, store, card: () => buildCard(cfg, fleet, identity), token: TOKEN, log, bodyLimit: 1 << 20 });
  await l.app.listen({ host: "127.0.0.1", port: 0 });
  const bridgeUrl = `http://127.0.0.1:${(l.app.server.address() as { port: number }).port}/v1/grants`;

  const headers = { authorization: `Bearer ${TOKEN}` };
  const template = sample(0).replace(`bench-${process.pid}-0`, `bench-${process.pid}-__I__`);
  const client = new LoadClient();
  // Warm-up (JIT, the writer thread, connection pools), not measured.
  await client.run({ url: bareUrl, connections, seconds: 1, template });
  const warm = await client.run({ url: bridgeUrl, connections, seconds: 1, headers, template, offset: 2_000_000_000 });
  // The threads that came with the store are its writer's (the only ones the accept path starts).
  const writerThreads = new Set([...threadCpuMs().keys()].filter((t) => !threadsBefore.has(t)));
  type Thread = "main" | "writer" | "other";
  const classify = (tid: string): Thread => (tid === String(process.pid) ? "main" : writerThreads.has(tid) ? "writer" : "other");
  // Short alternating rounds, so a noisy neighbour hits both routes alike; figures are medians.
  const bareRounds: LoadResult[] = [];
  const bridgeRounds: LoadResult[] = [];
  // Server CPU per request counts every thread of this process (the store's writer included),
  // and by thread: the event loop, the store's writer, the rest (V8's GC helpers, libuv's pool).
  const serverCpu = { bare: 0, bridge: 0 };
  const byThread = { bare: new Map<Thread, number>(), bridge: new Map<Thread, number>() };
  const measured = async (route: "bare" | "bridge", job: LoadJob) => {
    const c0 = process.cpuUsage();
    const t0 = threadCpuMs();
    const res = await client.run(job);
    const c = process.cpuUsage(c0);
    serverCpu[route] += (c.user + c.system) / 1000;
    for (const [g, ms] of cpuByGroup(t0, threadCpuMs(), classify)) byThread[route].set(g, (byThread[route].get(g) ?? 0) + ms);
    return res;
  };
  for (let r = 0; r < rounds; r++) {
    bareRounds.push(await measured("bare", { url: bareUrl, connections, seconds: seconds / rounds, template }));
    bridgeRounds.push(await measured("bridge", { url: bridgeUrl, connections, seconds: seconds / rounds, headers, template, offset: r * 100_000_000 }));
  }
  client.close();
  // The generator counts for itself: every 202 it saw must be a grant in the store, and no more.
  const answered202 = [warm, ...bridgeRounds].reduce((a, r) => a + (r.statuses[202] ?? 0), 0);
  const stored = Object.values(store.countByState()).reduce((a, n) => a + n, 0);
  if (stored !== answered202) throw new Error(`the load generator saw ${answered202} grants accepted, the store holds ${stored}`);
  const bareRes = medianOf(bareRounds);
  const bridgeRes = medianOf(bridgeRounds);
  const ratios = bridgeRounds.map((b, i) => b.rps / bareRounds[i]!.rps);
  const p99Ratios = bridgeRounds.map((b, i) => b.p99 / bareRounds[i]!.p99);

  // The disk's own floor: one durable accept waits for at least one WAL fsync.
  const fsyncMs = measureFsync(dir);
  await manager.shutdown(1000);
  await l.app.close();
  await bare.close();
  await store.close();
  rmSync(dir, { recursive: true, force: true });

  const text = table([
    ["route", "req/s", "p50 ms", "p99 ms", "non-2xx"],
    ["bare fastify POST (baseline)", bareRes.rps, bareRes.p50, bareRes.p99, bareRes.requests - (bareRes.statuses[202] ?? 0)],
    ["POST /v1/grants (durable accept)", bridgeRes.rps, bridgeRes.p50, bridgeRes.p99, bridgeRes.requests - (bridgeRes.statuses[202] ?? 0)],
    ["ratio bridge / bare", median(ratios), bridgeRes.p50 / bareRes.p50, median(p99Ratios), ""],
  ]);
  const cpuPer = (ms: number, rs: LoadResult[]) => (ms * 1000) / rs.reduce((a, r) => a + r.requests, 0);
  const clientPer = (rs: LoadResult[]) => cpuPer(rs.reduce((a, r) => a + (r.clientCpuMs ?? 0), 0), rs);
  const cpuLine = `CPU per request (µs): server ${cpuPer(serverCpu.bare, bareRounds).toFixed(0)} bare vs ${cpuPer(serverCpu.bridge, bridgeRounds).toFixed(0)} bridge; load generator ${clientPer(bareRounds).toFixed(0)} vs ${clientPer(bridgeRounds).toFixed(0)}`;
  const roundsOf = { bare: bareRounds, bridge: bridgeRounds };
  /** µs per request on one group of threads, for `route`. */
  const onThreads = (route: "bare" | "bridge", g: Thread) => cpuPer(byThread[route].get(g) ?? 0, roundsOf[route]).toFixed(0);
  const threadLine =
    byThread.bridge.size === 0
      ? ""
      : `\n  by thread (/proc, 10 ms ticks): event loop ${onThreads("bare", "main")} vs ${onThreads("bridge", "main")}; store writer ${onThreads("bridge", "writer")}; other threads (GC helpers, libuv) ${onThreads("bare", "other")} vs ${onThreads("bridge", "other")}`;
  const perRound = `per round (bridge/bare): throughput ${ratios.map((x) => x.toFixed(2)).join(", ")}; p99 ${p99Ratios.map((x) => x.toFixed(2)).join(", ")}`;
  commits.sort((a, b) => a - b);
  const cq = (p: number) => (commits[Math.min(commits.length - 1, Math.floor(p * commits.length))] ?? NaN).toFixed(2);
  const note = [
    `group commits under load (transaction + WAL fsync, ${commits.length}): p50 ${cq(0.5)} ms, p90 ${cq(0.9)} ms, p99 ${cq(0.99)} ms; an fsync of a 4 KiB append on the idle disk: ${fsyncMs.toFixed(2)} ms (median of 50)`,
    `the load generator shares the machine's ${os.cpus().length} cores with the server`,
  ].join("\n");
  return { bare: bareRes, bridge: bridgeRes, text: `${text}\n${perRound}\n${cpuLine}${threadLine}\n${note}` };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

/** Per-figure medians of several rounds (requests and seconds summed). */
function medianOf(rs: LoadResult[]): LoadResult {
  const statuses: Record<number, number> = {};
  for (const r of rs) for (const [k, v] of Object.entries(r.statuses)) statuses[Number(k)] = (statuses[Number(k)] ?? 0) + v;
  return {
    requests: rs.reduce((a, r) => a + r.requests, 0),
    errors: rs.reduce((a, r) => a + r.errors, 0),
    seconds: rs.reduce((a, r) => a + r.seconds, 0),
    rps: median(rs.map((r) => r.rps)),
    p50: median(rs.map((r) => r.p50)),
    p99: median(rs.map((r) => r.p99)),
    statuses,
  };
}

/** Median time of an append + fsync on the state disk. */
function measureFsync(dir: string): number {
  const fd = openSync(path.join(dir, "fsync-probe"), "a");
  const buf = Buffer.alloc(4096, 1);
  const times: number[] = [];
  for (let i = 0; i < 50; i++) {
    const t0 = performance.now();
    writeSync(fd, buf);
    fsyncSync(fd);
    times.push(performance.now() - t0);
  }
  closeSync(fd);
  times.sort((a, b) => a - b);
  return times[25]!;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const [seconds, connections, rounds] = [Number(process.argv[2] ?? 8), Number(process.argv[3] ?? 32), Number(process.argv[4] ?? 10)];
  const r = await run(seconds, connections, rounds);
  console.log(`listener accept path: ${rounds} alternating rounds of ${(seconds / rounds).toFixed(1)} s per route, ${connections} connections\n${r.text}`);
}
