/**
 * Burst benchmark (issue #15): N grants posted at once over HTTP to a daemon whose AWS backend
 * talks to the EC2 wire-protocol fake with EC2's request-rate limits switched on.
 *
 *   node --import tsx bench/burst.ts [N]
 *
 * Prints, in the same run:
 *  - the time from the first POST until every grant is running, against the floor the configured
 *    rate limits allow (the mutate bucket: every grant needs one RunInstances; the console bucket:
 *    one GetConsoleOutput for its host key), plus the boot delay: the ratio measured / floor;
 *  - the peak number of provision() calls in flight per region (sampled), against the bound
 *    ([fleet] provision_concurrency): a burst must never fire N create calls at once;
 *  - how many calls the fake answered RequestLimitExceeded, and how many grants did not run.
 *
 * The fake runs in a child process on the wall clock, so its SigV4/XML work does not share the
 * daemon's thread. `run()` returns the figures for the suite runner.
 */
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { Writable } from "node:stream";
import { fileURLToPath } from "node:url";
import { startDaemon } from "../src/daemon.js";
import { remoteEc2Fake } from "./lib/ec2-fake-host.js";

process.env.AWS_EC2_METADATA_DISABLED = "true";

const REGIONS = ["us-east-1", "eu-west-1"] as const;
const BOOT_DELAY_MS = 300;
const CONCURRENCY = 32;
/** The limits the fake enforces and the bridge is configured with (tokens; tokens per second). */
const LIMITS = { describe: { bucket: 100, refill_per_second: 50 }, mutate: { bucket: 100, refill_per_second: 50 }, console: { bucket: 100, refill_per_second: 50 } };
const TOKEN = "bench-token-0123456789abcdef";

export interface BurstFigures {
  grants: number;
  regions: number;
  all_running_s: number;
  floor_s: number;
  ratio: number;
  peak_in_flight: number;
  bound: number;
  rate_limited: number;
  not_running: number;
}

export async function run(n = 1000): Promise<BurstFigures> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "cb-bench-burst-"));
  const ssh = net.createServer((s) => {
    s.on("error", () => undefined);
    s.end("SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n");
  });
  await new Promise<void>((r) => ssh.listen(0, "127.0.0.1", r));
  const sshPort = (ssh.address() as net.AddressInfo).port;
  const rateLimits = Object.fromEntries(Object.entries(LIMITS).map(([k, v]) => [k, { bucket: v.bucket, refillPerSecond: v.refill_per_second }]));
  const fake = await remoteEc2Fake(3, { bootDelayMs: BOOT_DELAY_MS, rateLimits });
  writeFileSync(path.join(dir, "token"), TOKEN);
  writeFileSync(path.join(dir, "akid"), fake.credentials.accessKeyId);
  writeFileSync(path.join(dir, "secret"), fake.credentials.secretAccessKey);
  const limits = Object.entries(LIMITS)
    .map(([k, v]) => `[backends.aws.rate_limits.${k}]\nbucket = ${v.bucket}\nrefill_per_second = ${v.refill_per_second}\n`)
    .join("");
  writeFileSync(
    path.join(dir, "bridge.toml"),
    `[bridge]\nprovider_id = "bench-burst"\nstate_dir = ${JSON.stringify(path.join(dir, "state"))}\nimage_allow_cidrs = ["127.0.0.0/8"]\n` +
      `[listener]\nbind = "127.0.0.1:0"\ntoken_file = "token"\n[almanac]\ngenesis = 2026-01-01T00:00:00Z\ntick_seconds = 1\n[log]\nlevel = "error"\n` +
      `[fleet]\nprovision_concurrency = ${CONCURRENCY}\n` +
      `[backends.aws]\ninstance_types = ["m6i.large"]\nmax_concurrent_instances = ${n}\naccess_key_id_file = "akid"\nsecret_access_key_file = "secret"\nendpoint = ${JSON.stringify(fake.endpoint)}\n` +
      `ssh_port = ${sshPort}\nhost_key_timeout_seconds = 0\npoll_interval_seconds = 1\n${limits}` +
      REGIONS.map((r) => `[backends.aws.regions.${r}]\nimage_id = "ami-0123456789abcdef0"\nsubnet_id = "subnet-0123abcd"\nsecurity_group_ids = ["sg-0123abcd"]\n`).join(""),
  );
  const sink = new Writable({ write: (_c, _e, cb) => cb() });
  const d = await startDaemon({ configFile: path.join(dir, "bridge.toml"), logDestination: sink, backendOptions: { aws: { readyPollIntervalMs: 100, sshProbeIntervalMs: 50 } } });
  await d.ready;
  let peak = 0;
  const sampler = setInterval(() => {
    for (const q of d.manager.queueStats()) peak = Math.max(peak, q.running);
  }, 2);
  try {
    const img = Buffer.from("#!/bin/sh\nexit 0\n");
    const validTo = Math.floor((Date.now() - Date.parse("2026-01-01T00:00:00Z")) / 1000) + 3600;
    const body = (k: number) =>
      JSON.stringify({
        grant: { request_id: `burst-${k}`, region: REGIONS[k % REGIONS.length], tdx_required: false, cpu_millicores: 1000, ram_mib: 1024, valid_to: validTo },
        envelope: { image: { url: "http://127.0.0.1:9/w", sha256: createHash("sha256").update(img).digest("hex"), format: "bundle" }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3 bench@x" },
      });
    const t0 = performance.now();
    const posts = await Promise.all(
      Array.from({ length: n }, (_, k) => fetch(`${d.url}/v1/grants`, { method: "POST", headers: { authorization: `Bearer ${TOKEN}`, "content-type": "application/json" }, body: body(k) }).then((r) => r.status)),
    );
    const accepted = posts.filter((s) => s === 202).length;
    if (accepted !== n) throw new Error(`only ${accepted} of ${n} grants were accepted (statuses ${[...new Set(posts)].join(", ")})`);
    // Every grant running (or ended: a failure counts as not running).
    for (;;) {
      const c = d.store.countByState();
      const open = (c["provisioning|aws"] ?? 0) + (c["terminating|aws"] ?? 0);
      if (open === 0) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    const allRunningS = (performance.now() - t0) / 1000;
    const notRunning = n - (d.store.countByState()["running|aws"] ?? 0);
    // One RunInstances and one GetConsoleOutput per grant, each class paced by its bucket; then a boot.
    const perRegion = n / REGIONS.length;
    const floorS = Math.max(0, (perRegion - LIMITS.mutate.bucket) / LIMITS.mutate.refill_per_second, (perRegion - LIMITS.console.bucket) / LIMITS.console.refill_per_second) + BOOT_DELAY_MS / 1000;
    return { grants: n, regions: REGIONS.length, all_running_s: allRunningS, floor_s: floorS, ratio: allRunningS / floorS, peak_in_flight: peak, bound: CONCURRENCY, rate_limited: await fake.rateLimited(), not_running: notRunning };
  } finally {
    clearInterval(sampler);
    await d.close();
    await fake.close();
    ssh.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const f = await run(Number(process.argv[2] ?? 1000));
  console.log(`| figure | value | baseline | value | ratio |\n|---|---|---|---|---|`);
  console.log(`| ${f.grants} grants posted at once (${f.regions} regions), until all running | ${f.all_running_s.toFixed(1)} s | floor of the rate limits + boot | ${f.floor_s.toFixed(1)} s | ${f.ratio.toFixed(2)} |`);
  console.log(`| peak provision() calls in flight per region | ${f.peak_in_flight} | bound (provision_concurrency) | ${f.bound} | ${(f.peak_in_flight / f.bound).toFixed(2)} |`);
  console.log(`RequestLimitExceeded answered by the fake: ${f.rate_limited}; grants not running: ${f.not_running}`);
  process.exit(0);
}
