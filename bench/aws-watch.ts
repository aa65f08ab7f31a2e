/**
 * AWS watch benchmark against the EC2 wire-protocol fake, real EC2Client on both sides.
 *
 *   node --import tsx bench/aws-watch.ts
 *
 * For N = 10, 100, 1000 watched instances split over 2 regions, in the same run:
 *  - API calls per minute: the backend's batched exit watch (production poll interval, 10 s,
 *    on a virtual clock advanced through one minute) against a one-call-per-instance poller
 *    (DescribeInstances with one InstanceId per call, same interval), both counted by the fake;
 *    plus the wall time one poll tick costs each way.
 *  - Bridge overhead on grant-to-SSH-ready: provision() wall time minus the fake's boot delay,
 *    for grants launched while the N instances are being watched (real clock; the fake boots
 *    each instance after BOOT_DELAY_MS and a loopback server answers with an SSH banner). This
 *    fake runs in a child process (bench/lib/ec2-fake-host.ts), so the figure is the bridge's
 *    own cost and not the fake's SigV4/XML work sharing its thread. Measured for grants one after
 *    another (per-grant overhead) and for a burst of BURST grants at once.
 *
 * `run()` returns the figures for a suite runner; executed directly it prints a table.
 */
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { DescribeInstancesCommand, EC2Client, RunInstancesCommand } from "@aws-sdk/client-ec2";
import { AwsBackend, type AwsBackendOptions } from "../src/backends/aws.js";
import type { PollEvent } from "../src/backends/common/batch-watcher.js";
import { OfferingCache } from "../src/backends/offering-cache.js";
import { AwsConfig } from "../src/config/schema.js";
import { Almanac, type ComputeGrant, type Envelope, type ProvisionedInstance } from "../src/domain/index.js";
import { systemClock, type Clock } from "../src/util/clock.js";
import { createLogger } from "../src/util/logger.js";
import { Ec2Fake } from "../test/fakes/ec2.js";
import { ManualClock } from "../test/helpers/manual-clock.js";
import { remoteEc2Fake } from "./lib/ec2-fake-host.js";

process.env.AWS_EC2_METADATA_DISABLED = "true";

const REGIONS = ["us-east-1", "eu-west-1"] as const;
const PROVIDER = "bench-provider";
const BRIDGE_TAG = "compute-bridge:bridge-id";
const POLL_MS = 10_000; // poll_interval_seconds default
const TICKS_PER_MINUTE = 60_000 / POLL_MS;
const BOOT_DELAY_MS = 300;
const READY_POLL_MS = 10;
const SEQUENTIAL = 10;
const BURST = 20;
/** Parallel requests of the naive poller (a generous implementation; serial would be slower). */
const NAIVE_CONCURRENCY = 16;
const ALMANAC = new Almanac(new Date(0), 0.001);

export interface WatchFigures {
  n: number;
  batched_calls_per_min: number;
  per_instance_calls_per_min: number;
  ratio: number;
  /** Wall time of one poll tick (both regions), ms: batched vs one call per instance. */
  batched_tick_ms: number;
  per_instance_tick_ms: number;
  /** provision() time minus the fake's boot delay, ms: grants one after another, and BURST at once. */
  ready_overhead_ms: { p50: number; p95: number; max: number };
  burst_overhead_ms: { p50: number; p95: number; max: number };
}

export interface AwsWatchBench {
  regions: number;
  poll_interval_ms: number;
  boot_delay_ms: number;
  ready_poll_ms: number;
  rows: WatchFigures[];
}


/** The benchmark's AWS config against a fake (in this process or in the fake-host child). */
function config(fake: Pick<Ec2Fake, "endpoint" | "credentials">, credDir: string, sshPort: number): AwsConfig {
  writeFileSync(path.join(credDir, "akid"), fake.credentials.accessKeyId);
  writeFileSync(path.join(credDir, "secret"), fake.credentials.secretAccessKey);
  const region = { image_id: "ami-0123456789abcdef0", subnet_id: "subnet-0123abcd", security_group_ids: ["sg-0123abcd"] };
  return AwsConfig.parse({
    regions: Object.fromEntries(REGIONS.map((r) => [r, region])),
    instance_types: ["m6i.large"],
    max_concurrent_instances: 10_000,
    access_key_id_file: path.join(credDir, "akid"),
    secret_access_key_file: path.join(credDir, "secret"),
    endpoint: fake.endpoint,
    ssh_port: sshPort,
  });
}

function backend(cfg: AwsConfig, clock: Clock, opts: AwsBackendOptions): AwsBackend {
  return new AwsBackend(
    cfg,
    { providerId: PROVIDER, stateDir: os.tmpdir(), configDir: "/", log: createLogger("silent"), clock, almanac: ALMANAC, unavailable: new OfferingCache(60_000, clock) },
    opts,
  );
}

/** N instances tagged for this bridge, half per region, running. */
async function launchWatched(fake: Ec2Fake, n: number): Promise<ProvisionedInstance[]> {
  for (const [k, region] of REGIONS.entries()) {
    const c = new EC2Client({ region, endpoint: fake.endpoint, credentials: fake.credentials });
    let left = Math.floor(n / REGIONS.length) + (k < n % REGIONS.length ? 1 : 0);
    while (left > 0) {
      const count = Math.min(left, 500);
      await c.send(
        new RunInstancesCommand({
          ImageId: "ami-0123456789abcdef0",
          InstanceType: "m6i.large",
          MinCount: count,
          MaxCount: count,
          TagSpecifications: [{ ResourceType: "instance", Tags: [{ Key: BRIDGE_TAG, Value: PROVIDER }] }],
        }),
      );
      left -= count;
    }
    c.destroy();
  }
  fake.bootAll();
  return fake.instances.map((i, k) => ({
    request_id: `w-${k}`,
    backend: "aws",
    instance_id: i.instanceId,
    region: i.region,
    host: null,
    ssh_port: null,
    ssh_user: null,
    host_key_sha256: null,
    started_at: i.launchTime.toISOString(),
    cpu_millicores: 1000,
    ram_mib: 1024,
    details: {},
  }));
}

/** Calls per minute of the batched exit watch, and the wall time of one tick. */
async function measureBatched(n: number, sshPort: number, credDir: string): Promise<{ callsPerMin: number; tickMs: number }> {
  const clock = new ManualClock();
  const fake = await Ec2Fake.start({ seed: 1, now: () => clock.now() });
  const polls: PollEvent[] = [];
  const waiters: { n: number; resolve: () => void }[] = [];
  const polled = (k: number) => (polls.length >= k ? Promise.resolve() : new Promise<void>((resolve) => waiters.push({ n: k, resolve })));
  const aws = backend(config(fake, credDir, sshPort), clock, {
    pollIntervalMs: POLL_MS,
    onPoll: (kind, e) => {
      if (kind !== "exit") return;
      polls.push(e);
      for (const w of waiters.filter((w) => polls.length >= w.n)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve();
      }
    },
  });
  try {
    const instances = await launchWatched(fake, n);
    const ctls = instances.map(() => new AbortController());
    const watches = instances.map((i, k) => aws.watchUntilExit(i, new Date(clock.now() + 3_600_000), ctls[k]!.signal).catch(() => undefined));
    await polled(REGIONS.length);
    fake.resetCalls();
    let tickTotal = 0;
    for (let k = 1; k <= TICKS_PER_MINUTE; k++) {
      const t0 = performance.now();
      clock.advance(POLL_MS);
      await polled(REGIONS.length * (k + 1));
      tickTotal += performance.now() - t0;
    }
    const calls = fake.countCalls("DescribeInstances");
    for (const c of ctls) c.abort();
    await Promise.all(watches);
    return { callsPerMin: calls, tickMs: tickTotal / TICKS_PER_MINUTE };
  } finally {
    await aws.close();
    await fake.close();
  }
}

/** The same minute with one DescribeInstances per instance per interval. */
async function measurePerInstance(n: number): Promise<{ callsPerMin: number; tickMs: number }> {
  const fake = await Ec2Fake.start({ seed: 1 });
  const clients = new Map(REGIONS.map((r) => [r as string, new EC2Client({ region: r, endpoint: fake.endpoint, credentials: fake.credentials })]));
  try {
    const instances = await launchWatched(fake, n);
    fake.resetCalls();
    let tickTotal = 0;
    for (let k = 1; k <= TICKS_PER_MINUTE; k++) {
      const t0 = performance.now();
      let next = 0;
      const worker = async () => {
        while (next < instances.length) {
          const i = instances[next++]!;
          await clients.get(i.region)!.send(new DescribeInstancesCommand({ InstanceIds: [i.instance_id] }));
        }
      };
      await Promise.all(Array.from({ length: Math.min(NAIVE_CONCURRENCY, instances.length) }, worker));
      tickTotal += performance.now() - t0;
    }
    return { callsPerMin: fake.countCalls("DescribeInstances"), tickMs: tickTotal / TICKS_PER_MINUTE };
  } finally {
    for (const c of clients.values()) c.destroy();
    await fake.close();
  }
}

function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!;
}

function stats(xs: number[]): { p50: number; p95: number; max: number } {
  return { p50: percentile(xs, 50), p95: percentile(xs, 95), max: Math.max(...xs) };
}

/** Grant-to-SSH-ready minus the boot delay, for grants launched while N instances are watched. */
async function measureReady(n: number, sshPort: number, credDir: string): Promise<{ sequential: ReturnType<typeof stats>; burst: ReturnType<typeof stats> }> {
  const fake = await remoteEc2Fake(2, { bootDelayMs: BOOT_DELAY_MS });
  const cfg = config(fake, credDir, sshPort);
  const aws = backend(cfg, systemClock, { pollIntervalMs: POLL_MS, readyPollIntervalMs: READY_POLL_MS, sshProbeIntervalMs: READY_POLL_MS });
  const watches: Promise<unknown>[] = [];
  const ctls: AbortController[] = [];
  try {
    // N watched instances in the background, as in production.
    for (const [k, r] of REGIONS.entries()) {
      const c = new EC2Client({ region: r, endpoint: fake.endpoint, credentials: fake.credentials });
      const count = Math.floor(n / REGIONS.length) + (k < n % REGIONS.length ? 1 : 0);
      const out = await c.send(
        new RunInstancesCommand({ ImageId: "ami-0123456789abcdef0", InstanceType: "m6i.large", MinCount: count, MaxCount: count, TagSpecifications: [{ ResourceType: "instance", Tags: [{ Key: BRIDGE_TAG, Value: PROVIDER }] }] }),
      );
      c.destroy();
      for (const i of out.Instances ?? []) {
        const ctl = new AbortController();
        ctls.push(ctl);
        const inst: ProvisionedInstance = { request_id: `w-${i.InstanceId}`, backend: "aws", instance_id: i.InstanceId!, region: r, host: null, ssh_port: null, ssh_user: null, host_key_sha256: null, started_at: new Date().toISOString(), cpu_millicores: 1000, ram_mib: 1024, details: {} };
        watches.push(aws.watchUntilExit(inst, new Date(Date.now() + 3_600_000), ctl.signal).catch(() => undefined));
      }
    }
    await fake.bootAll();
    const img = Buffer.from("#!/bin/sh\nexit 0\n");
    const envelope: Envelope = {
      image: { url: "http://127.0.0.1:9/image", sha256: createHash("sha256").update(img).digest("hex"), format: "bundle" },
      ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3 bench@x",
    };
    const grant = (id: string, k: number): ComputeGrant => ({ request_id: id, region: REGIONS[k % REGIONS.length]!, tdx_required: false, cpu_millicores: 1000, ram_mib: 1024, valid_to: Date.now() + 3_600_000 });
    const one = async (id: string, k: number) => {
      const t0 = performance.now();
      await aws.provision(grant(id, k), envelope, new AbortController().signal);
      return performance.now() - t0 - BOOT_DELAY_MS;
    };
    // Warm-up (SDK import, connections, JIT); not counted.
    for (let k = 0; k < 3; k++) await one(`warm-${n}-${k}`, k);
    const sequential: number[] = [];
    for (let k = 0; k < SEQUENTIAL; k++) sequential.push(await one(`s-${n}-${k}`, k));
    const burst = await Promise.all(Array.from({ length: BURST }, (_, k) => one(`b-${n}-${k}`, k)));
    return { sequential: stats(sequential), burst: stats(burst) };
  } finally {
    for (const c of ctls) c.abort();
    await Promise.all(watches);
    await aws.close();
    await fake.close();
  }
}

export async function run(sizes: readonly number[] = [10, 100, 1000]): Promise<AwsWatchBench> {
  const credDir = mkdtempSync(path.join(os.tmpdir(), "cb-bench-aws-"));
  const ssh = net.createServer((s) => {
    s.on("error", () => undefined);
    s.end("SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n");
  });
  await new Promise<void>((r) => ssh.listen(0, "127.0.0.1", r));
  const sshPort = (ssh.address() as net.AddressInfo).port;
  try {
    const rows: WatchFigures[] = [];
    for (const n of sizes) {
      const batched = await measureBatched(n, sshPort, credDir);
      const naive = await measurePerInstance(n);
      const ready = await measureReady(n, sshPort, credDir);
      rows.push({
        n,
        batched_calls_per_min: batched.callsPerMin,
        per_instance_calls_per_min: naive.callsPerMin,
        ratio: naive.callsPerMin / batched.callsPerMin,
        batched_tick_ms: batched.tickMs,
        per_instance_tick_ms: naive.tickMs,
        ready_overhead_ms: ready.sequential,
        burst_overhead_ms: ready.burst,
      });
    }
    return { regions: REGIONS.length, poll_interval_ms: POLL_MS, boot_delay_ms: BOOT_DELAY_MS, ready_poll_ms: READY_POLL_MS, rows };
  } finally {
    await new Promise<void>((r) => ssh.close(() => r()));
    rmSync(credDir, { recursive: true, force: true });
  }
}

function table(b: AwsWatchBench): string {
  const head = ["N watched", "calls/min batched", "calls/min 1-per-inst", "ratio", "tick ms batched", "tick ms 1-per-inst", "ready overhead p50/p95/max ms", `burst of ${BURST} p50/p95/max ms`];
  const rows = b.rows.map((r) => [
    String(r.n),
    String(r.batched_calls_per_min),
    String(r.per_instance_calls_per_min),
    `${r.ratio.toFixed(0)}x`,
    r.batched_tick_ms.toFixed(1),
    r.per_instance_tick_ms.toFixed(1),
    `${r.ready_overhead_ms.p50.toFixed(1)} / ${r.ready_overhead_ms.p95.toFixed(1)} / ${r.ready_overhead_ms.max.toFixed(1)}`,
    `${r.burst_overhead_ms.p50.toFixed(1)} / ${r.burst_overhead_ms.p95.toFixed(1)} / ${r.burst_overhead_ms.max.toFixed(1)}`,
  ]);
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padStart(w[i]!)).join("  ");
  return [
    `AWS watch: ${b.regions} regions, poll interval ${b.poll_interval_ms / 1000} s, fake boot delay ${b.boot_delay_ms} ms, readiness poll ${b.ready_poll_ms} ms; ready overhead over ${SEQUENTIAL} grants one after another, then ${BURST} at once`,
    line(head),
    line(head.map((_, i) => "-".repeat(w[i]!))),
    ...rows.map(line),
  ].join("\n");
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const b = await run();
  console.log(table(b));
  const big = b.rows.find((r) => r.n === 1000);
  if (big) {
    console.log(`\ntarget: >= 100x fewer calls at 1000 instances in 2 regions: ${big.ratio.toFixed(0)}x ${big.ratio >= 100 ? "OK" : "MISSED"}`);
    const worst = Math.max(...b.rows.map((r) => r.ready_overhead_ms.p95));
    console.log(`target: grant-to-SSH-ready overhead < 50 ms beyond the boot delay (per grant): worst p95 ${worst.toFixed(1)} ms ${worst < 50 ? "OK" : "MISSED"}`);
  }
}
