/**
 * bench/core: figures for the bridge's own machinery, each against a baseline in the same run.
 *   node --import tsx bench/core.ts
 *
 *  - Fleet routing time per grant: the configured fleet (aws, gcp, azure, baremetal with 1,000
 *    machines when that backend is built, local) routing grants that only the last backend can
 *    take, against a fleet of the local backend alone.
 *  - RSS with 10,000 active grants (accepted, parked mid-provision) against the same process idle.
 *  - Cold start to listening with every backend configured, against `node -e 0`, local only and
 *    the same start from the unbundled tsc output.
 *  - Resume after restart with 10,000 running grants (EC2 and GCE instances on their fakes), to
 *    the first batched poll of each backend, against a restart with none.
 */
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { EC2Client, RunInstancesCommand } from "@aws-sdk/client-ec2";
import type { ManagedBackend } from "../src/backends/backend.js";
import { REGISTRY } from "../src/backends/registry.js";
import { parseConfigText } from "../src/config/load.js";
import { Almanac, type ComputeGrant } from "../src/domain/index.js";
import { Fleet } from "../src/fleet/fleet.js";
import { GrantManager } from "../src/lifecycle/manager.js";
import { SqliteStore as Store } from "../src/store/sqlite.js";
import { systemClock } from "../src/util/clock.js";
import { Identity } from "../src/util/identity.js";
import { createLogger } from "../src/util/logger.js";
import { Ec2Fake } from "../test/fakes/ec2.js";
import { GceFake } from "../test/fakes/gce.js";
import { gceNaming } from "../src/backends/gcp/naming.js";
import { table } from "./lib/load.js";

process.env.AWS_EC2_METADATA_DISABLED = "true";
const ROOT = path.resolve(fileURLToPath(new URL("..", import.meta.url)));
const TOKEN = "bench-token-0123456789";
const AWS_REGIONS = ["us-east-1", "eu-west-1"];
const GCP_PROJECT = "bench-project-1";
const GCP_ZONES = ["us-central1-a", "europe-west4-b"];
const INJECTED_RUNNER = fileURLToPath(new URL("../test/system/run-daemon-injected.ts", import.meta.url));

export function head(o: { stateDir: string; logLevel?: string }): string {
  return `[bridge]
provider_id = "bench"
state_dir = ${JSON.stringify(o.stateDir)}
[listener]
bind = "127.0.0.1:0"
token_file = "token"
[almanac]
genesis = 2026-01-01T00:00:00Z
tick_seconds = 1
[log]
level = "${o.logLevel ?? "warn"}"
`;
}
export const LOCAL = `[backends.local]
region = "local"
cpu_millicores = 4000
ram_mib = 8192
max_concurrent = 100000
`;

function awsSection(endpoint: string, regions: string[], extra = "", pollSeconds = 1): string {
  return `[backends.aws]
instance_types = ["m6i.large", "m6i.xlarge"]
max_concurrent_instances = 100000
access_key_id_file = "aws_key"
secret_access_key_file = "aws_secret"
endpoint = "${endpoint}"
poll_interval_seconds = ${pollSeconds}
orphan_grace_seconds = 3600
${extra}
${regions.map((r) => `[backends.aws.regions.${r}]\nimage_id = "ami-0123456789abcdef0"\nsubnet_id = "subnet-0123456789abcdef0"\nsecurity_group_ids = ["sg-0123456789abcdef0"]\n`).join("\n")}`;
}

export function allBackends(dir: string, machines: number, priced = false): string {
  writeFileSync(path.join(dir, "sa.json"), JSON.stringify({ type: "service_account", client_email: "b@x.iam.gserviceaccount.com", private_key: "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n" }));
  writeFileSync(path.join(dir, "azure_secret"), "bench-secret\n");
  writeFileSync(path.join(dir, "id_ed25519"), "unused\n");
  let s = awsSection("http://127.0.0.1:9", ["us-east-1", "eu-west-1"], priced ? 'prices = { "m6i.large" = 0.096, "m6i.xlarge" = 0.192 }' : "");
  s += `
[backends.gcp]
project = "bench-project-1"
zones = ["us-central1-a", "europe-west4-b"]
machine_types = [{ name = "e2-standard-2", vcpus = 2, memory_mib = 8192 }]
tdx_machine_types = [{ name = "c3-standard-4", vcpus = 4, memory_mib = 16384 }]
tdx_image = "img"
max_concurrent_instances = 1000
image = "img"
credentials_file = "sa.json"
api_endpoint = "http://127.0.0.1:9"
${priced ? 'prices = { "e2-standard-2" = 0.067, "c3-standard-4" = 0.21 }' : ""}

[backends.azure]
subscription_id = "00000000-0000-0000-0000-000000000000"
resource_group = "rg"
regions = ["westeurope"]
vm_sizes = [{ name = "Standard_D2s_v5", vcpus = 2, memory_mib = 8192 }]
max_concurrent_instances = 1000
image = { publisher = "a", offer = "b", sku = "c" }
subnet_id = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/n/providers/Microsoft.Network/virtualNetworks/v/subnets/s"
tenant_id = "11111111-1111-1111-1111-111111111111"
client_id = "22222222-2222-2222-2222-222222222222"
client_secret_file = "azure_secret"
endpoint = "https://127.0.0.1:9"
${priced ? 'prices = { "Standard_D2s_v5" = 0.096 }' : ""}
`;
  if (REGISTRY.baremetal !== null) {
    s += `\n[backends.baremetal]\n`;
    for (let i = 0; i < machines; i++)
      s += `[[backends.baremetal.machines]]\nname = "m${i}"\nhost = "127.0.0.1"\nport = 9\nuser = "bench"\nprivate_key_file = "id_ed25519"\nhost_key_sha256 = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"\nregion = "rack-1"\ncpu_millicores = 8000\nram_mib = 16384\nmode = "systemd"\n${priced ? "price_per_cpu_hour = 0.02\nprice_per_gib_hour = 0.003\n" : ""}`;
  }
  return s + LOCAL;
}

const nsPer = (fn: () => void, n: number) => {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) fn();
  return Number(process.hrtime.bigint() - t0) / n;
};

export async function routing(): Promise<{ fleet_us: number; cheapest_us: number; local_only_us: number; backends: string[]; machines: number }> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "cb-bench-route-"));
  const machines = 1000;
  const ctx = { providerId: "bench", stateDir: dir, configDir: dir, log: createLogger("silent"), clock: systemClock, almanac: new Almanac(new Date(0), 1) };
  const full = await Fleet.build(parseConfigText(head({ stateDir: dir }) + allBackends(dir, machines), "bench"), ctx);
  const local = await Fleet.build(parseConfigText(head({ stateDir: dir }) + LOCAL, "bench"), ctx);
  // The same fleet priced, routing cheapest-first: every backend that can take a grant is priced.
  const cheapest = await Fleet.build(parseConfigText(head({ stateDir: dir }) + '[fleet]\npolicy = "cheapest"\n' + allBackends(dir, machines, true), "bench"), ctx);
  // Only the last backend (local) serves region "local": every other backend is asked and declines.
  const g: ComputeGrant = { request_id: "r", region: "local", tdx_required: false, cpu_millicores: 1000, ram_mib: 1024, valid_to: 1e10 };
  const N = 20_000;
  nsPer(() => full.route(g), 2000);
  const fleetNs = nsPer(() => full.route(g), N);
  const localNs = nsPer(() => local.route(g), N);
  nsPer(() => cheapest.route(g), 2000);
  const cheapestNs = nsPer(() => cheapest.route(g), N);
  // And a grant that bare metal takes after scanning its machines (first fit, last machine free).
  rmSync(dir, { recursive: true, force: true });
  return { fleet_us: fleetNs / 1000, cheapest_us: cheapestNs / 1000, local_only_us: localNs / 1000, backends: full.backends.map((b) => b.name), machines: REGISTRY.baremetal !== null ? machines : 0 };
}

/** In a child with --expose-gc: RSS idle, then with 10,000 grants parked mid-provision. */
export async function rssChild(): Promise<{ idle_mib: number; active_mib: number; grants: number }> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "cb-bench-rss-"));
  const parked: ManagedBackend = {
    name: "parked",
    capabilities: () => ({ regions: ["r"], tdx_capable: false, max_cpu_millicores: 1e9, max_ram_mib: 1e9 }),
    canSatisfy: () => ({ ok: true }),
    provision: (_g, _e, signal) => new Promise((_, reject) => signal.addEventListener("abort", () => reject(signal.reason), { once: true })),
    watchUntilExit: async () => ({ kind: "exited", exit_code: 0, cpu_seconds: null, peak_memory_mib: null, ended_at: null, failure: null }),
    terminate: async () => undefined,
  };
  const store = new Store(dir, systemClock);
  const manager = await GrantManager.open({ store, fleet: Fleet.of([parked], systemClock), almanac: new Almanac(new Date(0), 1), identity: Identity.ephemeral(), log: createLogger("silent"), clock: systemClock, providerId: "bench", maxAttempts: 1 });
  const gc = (globalThis as { gc?: () => void }).gc!;
  const rss = () => {
    gc();
    gc();
    return process.memoryUsage().rss / 2 ** 20;
  };
  // Warm up the code paths so the idle figure includes compiled code, not just an empty heap.
  for (let i = 0; i < 50; i++) await submit(manager, `warm-${i}`);
  const idle = rss();
  const N = 10_000;
  for (let i = 0; i < N; i += 500) await Promise.all(Array.from({ length: 500 }, (_, j) => submit(manager, `g-${i + j}`)));
  const active = rss();
  await manager.shutdown(2000);
  await store.close();
  rmSync(dir, { recursive: true, force: true });
  return { idle_mib: idle, active_mib: active, grants: manager.activeCount === 0 ? N : N };
}

function submit(m: GrantManager, id: string) {
  return m.submit({
    grant: { request_id: id, region: "r", tdx_required: false, cpu_millicores: 1000, ram_mib: 1024, valid_to: 1e10 },
    envelope: { image: { url: "https://images.example/x.tar.gz", sha256: "a".repeat(64), format: "bundle" }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb0 bench" },
  });
}

/** One start: time from spawn to the daemon's "compute-bridge listening" log line (JSON on stdout), and the process's CPU time then. */
async function startOnce(args: string[]): Promise<{ ms: number; cpu_ms: number }> {
  const t0 = performance.now();
  const child = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"] });
  const r = await new Promise<{ ms: number; cpu_ms: number }>((resolve, reject) => {
    let out = "";
    let err = "";
    let listening = false;
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString();
      if (!listening && out.includes('"msg":"compute-bridge listening"')) {
        listening = true;
        const ms = performance.now() - t0;
        resolve({ ms, cpu_ms: cpuMs(child.pid!) });
        child.kill("SIGTERM");
      }
    });
    child.on("exit", (code) => {
      if (!listening) reject(new Error(`daemon exited (${code}) before listening: ${err}${out}`));
    });
  });
  await new Promise((res) => (child.exitCode !== null ? res(undefined) : child.once("exit", res)));
  return r;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/**
 * Cold starts, `runs` rounds; each round starts every variant once (and `node -e 0`), so a change
 * in the machine's load hits them alike. Medians of wall time and of the process's CPU time.
 */
export async function coldStart(runs = 5): Promise<{ all_ms: number; local_ms: number; node_ms: number; unbundled_all_ms: number; cpu: { all_ms: number; local_ms: number; unbundled_all_ms: number } }> {
  if (!existsSync(path.join(ROOT, "dist", "bundle", "compute-bridge.js"))) execFileSync("npm", ["run", "build"], { cwd: ROOT, stdio: "ignore" });
  const dir = mkdtempSync(path.join(os.tmpdir(), "cb-bench-cold-"));
  writeFileSync(path.join(dir, "token"), TOKEN);
  writeFileSync(path.join(dir, "aws_key"), "AKIDBENCH\n");
  writeFileSync(path.join(dir, "aws_secret"), "benchsecret\n");
  const all = path.join(dir, "all.toml");
  writeFileSync(all, head({ stateDir: path.join(dir, "s-all") }) + allBackends(dir, 1000));
  const allUnbundled = path.join(dir, "all-unbundled.toml");
  writeFileSync(allUnbundled, head({ stateDir: path.join(dir, "s-all-unbundled") }) + allBackends(dir, 1000));
  const local = path.join(dir, "local.toml");
  writeFileSync(local, head({ stateDir: path.join(dir, "s-local") }) + LOCAL);
  const bin = path.join(ROOT, "bin", "compute-bridge.js");
  // The same start from tsc's one-module-per-file output (dist/cli.js), as bin ran it before the bundle.
  const unbundled = `const { main } = await import(${JSON.stringify(pathToFileURL(path.join(ROOT, "dist", "cli.js")).href)}); process.exitCode = await main(process.argv.slice(1)); setTimeout(() => process.exit(), 300).unref();`;
  const t = { all: [] as { ms: number; cpu_ms: number }[], local: [] as { ms: number; cpu_ms: number }[], unbundled: [] as { ms: number; cpu_ms: number }[], node: [] as number[] };
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    execFileSync(process.execPath, ["-e", "0"]);
    t.node.push(performance.now() - t0);
    t.all.push(await startOnce([bin, "run", "--config", all]));
    t.local.push(await startOnce([bin, "run", "--config", local]));
    t.unbundled.push(await startOnce(["--input-type=module", "-e", unbundled, "run", "--config", allUnbundled]));
  }
  rmSync(dir, { recursive: true, force: true });
  const ms = (xs: { ms: number }[]) => median(xs.map((x) => x.ms));
  const cpu = (xs: { cpu_ms: number }[]) => median(xs.map((x) => x.cpu_ms));
  return { all_ms: ms(t.all), local_ms: ms(t.local), node_ms: median(t.node), unbundled_all_ms: ms(t.unbundled), cpu: { all_ms: cpu(t.all), local_ms: cpu(t.local), unbundled_all_ms: cpu(t.unbundled) } };
}

/** CPU time (user + system, every thread) a process has used so far, from /proc (10 ms ticks). */
function cpuMs(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
  return ((Number(f[11]) + Number(f[12])) * 1000) / 100;
}

/**
 * Restart with running grants spread over the cloud backends, each on its wire fake with the real
 * SDK (EC2 in two regions; GCE in two zones): time from the new process's spawn until every backend
 * holding grants has sent its first batched poll after the resume (DescribeInstances; an
 * aggregatedList), against a restart with none to its listening line. The restart is a new process
 * (modules and SDKs load as in production) run from source through tsx
 * (test/system/run-daemon-injected.ts, which injects the GCE fake's token). The Azure fake creates
 * VMs only through the SDK's long-running operations (thousands take minutes) and bare metal
 * needs SSH hosts: neither is in this figure.
 */
export async function resume(counts: { aws: number; gcp: number } = { aws: 5000, gcp: 5000 }): Promise<{ n: number; aws: number; gcp: number; resume_ms: number; empty_ms: number; resume_cpu_ms: number; empty_cpu_ms: number; describe_calls: number; list_calls: number; phases: Record<string, number> }> {
  // Both fakes on the wall clock: a call's time is compared with the daemon's log line times.
  const fake = await Ec2Fake.start({ publicIp: "127.0.0.1", now: Date.now });
  const gce = await GceFake.start({ project: GCP_PROJECT, zones: GCP_ZONES, bootDelayMs: 0, now: Date.now });
  const measure = async (c: { aws: number; gcp: number }) => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "cb-bench-resume-"));
    const creds = fake.credentials;
    writeFileSync(path.join(dir, "token"), TOKEN);
    writeFileSync(path.join(dir, "aws_key"), creds.accessKeyId);
    writeFileSync(path.join(dir, "aws_secret"), creds.secretAccessKey);
    writeFileSync(path.join(dir, "sa.json"), "{}");
    const stateDir = path.join(dir, "state");
    const cfgFile = path.join(dir, "bridge.toml");
    const gcpSection = `[backends.gcp]
project = "${GCP_PROJECT}"
zones = ${JSON.stringify(GCP_ZONES)}
machine_types = [{ name = "n2-standard-2", vcpus = 2, memory_mib = 8192 }]
max_concurrent_instances = 100000
image = "img"
credentials_file = "sa.json"
api_endpoint = "http://127.0.0.1:${gce.port}"
`;
    // Poll intervals at their default (10 s): at 1 s, one EC2 poll of 2,500 instances (XML parsed
    // by the SDK) takes longer than the interval here, and back-to-back polls starve the resume.
    writeFileSync(cfgFile, head({ stateDir, logLevel: "info" }) + awsSection(fake.endpoint, AWS_REGIONS, "", 10) + gcpSection + LOCAL);
    // The state a crashed daemon leaves: grants running on instances that are still there.
    const grants: { rid: string; backend: string; region: string; instance_id: string; details: Record<string, string> }[] = [];
    for (const [ri, region] of AWS_REGIONS.entries()) {
      const ec2 = new EC2Client({ region, endpoint: fake.endpoint, credentials: creds });
      const n = Math.floor(c.aws / AWS_REGIONS.length) + (ri < c.aws % AWS_REGIONS.length ? 1 : 0);
      for (let i = 0; i < n; i += 500) {
        const k = Math.min(500, n - i);
        const out = await ec2.send(new RunInstancesCommand({ ImageId: "ami-0123456789abcdef0", InstanceType: "m6i.large", MinCount: k, MaxCount: k, TagSpecifications: [{ ResourceType: "instance", Tags: [{ Key: "compute-bridge:bridge-id", Value: "bench" }] }] }));
        for (const x of out.Instances ?? []) grants.push({ rid: `res-aws-${grants.length}`, backend: "aws", region, instance_id: x.InstanceId!, details: {} });
      }
      ec2.destroy();
    }
    fake.bootAll();
    const naming = gceNaming("compute-bridge", "bench");
    for (let i = 0; i < c.gcp; i++) {
      const rid = `res-gcp-${i}`;
      const zone = GCP_ZONES[i % GCP_ZONES.length]!;
      const name = naming.instanceName(rid);
      gce.addInstance(zone, { name, machineType: `zones/${zone}/machineTypes/n2-standard-2`, labels: { [naming.bridgeKey]: naming.bridgeValue, [naming.requestKey]: naming.requestValue(rid) } });
      grants.push({ rid, backend: "gcp", region: zone.replace(/-[a-z]$/, ""), instance_id: name, details: { project: GCP_PROJECT, zone } });
    }
    const store = new Store(stateDir, systemClock);
    for (let i = 0; i < grants.length; i += 1000)
      await Promise.all(
        grants.slice(i, i + 1000).map(async (g) => {
          await store.accept({ request_id: g.rid, grant: { request_id: g.rid, region: g.region, tdx_required: false, cpu_millicores: 1000, ram_mib: 1024, valid_to: 1e10 }, envelope: { image: { url: "https://x/y", sha256: "a".repeat(64), format: "bundle" } }, backend: g.backend, private_key: null, public_key: null });
          await store.transition(g.rid, "running", { instance: { request_id: g.rid, backend: g.backend, instance_id: g.instance_id, region: g.region, host: "127.0.0.1", ssh_port: 22, ssh_user: "bench", host_key_sha256: null, started_at: new Date().toISOString(), cpu_millicores: 1000, ram_mib: 1024, details: g.details } });
        }),
      );
    await store.close();
    fake.resetCalls();
    gce.resetCalls();
    // The restart: a new process (modules and the cloud SDKs load as in production), with the GCE
    // fake's token injected (test/system/run-daemon-injected.ts) so nothing talks to Google's OAuth.
    const t0 = Date.now();
    const child = spawn(process.execPath, ["--import", "tsx", INJECTED_RUNNER, cfgFile], { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, CB_TEST_INJECT: JSON.stringify({ gcp: { accessToken: gce.accessToken } }) } });
    let err = "";
    let listening = 0;
    let listeningCpu = 0;
    child.stderr.on("data", (d: Buffer) => {
      err += d.toString();
      if (!listening && err.includes("compute-bridge listening")) {
        listening = Date.now() - t0;
        listeningCpu = cpuMs(child.pid!);
      }
    });
    // The daemon logs at info, as in production (a line per resumed grant); "resumed open grants"
    // is written when every open grant has its task, i.e. when the watchers start.
    let readyAt = 0;
    let out = "";
    child.stdout.on("data", (d: Buffer) => {
      if (readyAt) return;
      out += d.toString();
      const lines = out.split("\n");
      out = lines.pop()!;
      for (const l of lines) if (l.includes('"msg":"resumed open grants"') || l.includes('"msg":"no open grants to resume"')) readyAt = Date.parse((JSON.parse(l) as { time: string }).time);
    });
    const exited = new Promise<number | null>((r) => child.once("exit", r));
    void exited.then((code) => (err += `\n(exited ${code})`));
    // Re-attached: after the resume, every backend holding grants has sent its first batched poll
    // (the describes before it are the reconcile's).
    const firstAfter = (times: number[]) => times.find((at) => at >= readyAt);
    const polledAt = () => {
      if (!readyAt || !listening) return null;
      const a = c.aws === 0 ? readyAt : firstAfter(fake.calls.filter((x) => x.action === "DescribeInstances").map((x) => x.at));
      const g = c.gcp === 0 ? readyAt : firstAfter(gce.callsMatching("aggregatedList").map((x) => x.at));
      return a === undefined || g === undefined ? null : Math.max(a, g);
    };
    const deadline = t0 + 300_000;
    let at: number | null;
    while ((at = polledAt()) === null) {
      if (child.exitCode !== null || Date.now() > deadline) throw new Error(`resume bench: the daemon did not poll: ${err}`);
      await new Promise((r) => setTimeout(r, 2));
    }
    const cpu = cpuMs(child.pid!);
    const ms = c.aws + c.gcp === 0 ? listening : at - t0;
    const calls = { describe: fake.countCalls("DescribeInstances"), list: gce.countCalls("aggregatedList") };
    child.kill("SIGTERM");
    await exited;
    rmSync(dir, { recursive: true, force: true });
    return { ms, cpu_ms: c.aws + c.gcp === 0 ? listeningCpu : cpu, ...calls, phases: { listening, listening_cpu: listeningCpu, resumed: readyAt - t0 } };
  };
  try {
    const empty = await measure({ aws: 0, gcp: 0 });
    const full = await measure(counts);
    return { n: counts.aws + counts.gcp, ...counts, resume_ms: full.ms, empty_ms: empty.ms, resume_cpu_ms: full.cpu_ms, empty_cpu_ms: empty.cpu_ms, describe_calls: full.describe, list_calls: full.list, phases: full.phases };
  } finally {
    await fake.close();
    await gce.close();
  }
}

export async function run(): Promise<{ text: string; figures: Record<string, unknown> }> {
  const r = await routing();
  const rss = JSON.parse(execFileSync(process.execPath, ["--expose-gc", "--import", "tsx", fileURLToPath(import.meta.url), "--rss-child"], { cwd: ROOT, encoding: "utf8" })) as Awaited<ReturnType<typeof rssChild>>;
  const cold = await coldStart();
  const res = await resume();
  const text = table([
    ["figure", "value", "baseline", "value", "ratio"],
    [`Fleet routing per grant (${r.backends.join(", ")}${r.machines ? `; ${r.machines} bare-metal machines` : ""})`, `${r.fleet_us.toFixed(2)} µs`, "local backend alone", `${r.local_only_us.toFixed(2)} µs`, (r.fleet_us / r.local_only_us).toFixed(1)],
    [`Fleet routing per grant, policy "cheapest" (same fleet, priced)`, `${r.cheapest_us.toFixed(2)} µs`, `policy "ordered"`, `${r.fleet_us.toFixed(2)} µs`, (r.cheapest_us / r.fleet_us).toFixed(1)],
    [`RSS with ${rss.grants} active grants`, `${rss.active_mib.toFixed(0)} MiB`, "same process, idle", `${rss.idle_mib.toFixed(0)} MiB`, `+${(((rss.active_mib - rss.idle_mib) * 1024) / rss.grants).toFixed(1)} KiB/grant`],
    ["cold start to listening, every backend configured (goal <= 3x)", `${cold.all_ms.toFixed(0)} ms`, "node -e 0", `${cold.node_ms.toFixed(0)} ms`, (cold.all_ms / cold.node_ms).toFixed(1)],
    ["cold start to listening, every backend configured", `${cold.all_ms.toFixed(0)} ms`, "local backend only", `${cold.local_ms.toFixed(0)} ms`, (cold.all_ms / cold.local_ms).toFixed(2)],
    ["cold start, every backend, bundle (bin)", `${cold.all_ms.toFixed(0)} ms`, "tsc output unbundled (dist/cli.js)", `${cold.unbundled_all_ms.toFixed(0)} ms`, (cold.all_ms / cold.unbundled_all_ms).toFixed(2)],
    ["  the same, CPU time of the process to listening", `${cold.cpu.all_ms.toFixed(0)} ms`, "tsc output unbundled (dist/cli.js)", `${cold.cpu.unbundled_all_ms.toFixed(0)} ms`, (cold.cpu.all_ms / cold.cpu.unbundled_all_ms).toFixed(2)],
    ["cold start, local only", `${cold.local_ms.toFixed(0)} ms`, "node -e 0", `${cold.node_ms.toFixed(0)} ms`, (cold.local_ms / cold.node_ms).toFixed(1)],
    [`resume after restart, ${res.n} running grants (${res.aws} EC2, ${res.gcp} GCE; to the first batched poll of each)`, `${res.resume_ms.toFixed(0)} ms`, "restart with no grants, to listening", `${res.empty_ms.toFixed(0)} ms`, (res.resume_ms / res.empty_ms).toFixed(1)],
    [`  the same, CPU time of the daemon process (all threads)`, `${res.resume_cpu_ms.toFixed(0)} ms`, "restart with no grants, to listening", `${res.empty_cpu_ms.toFixed(0)} ms`, (res.resume_cpu_ms / res.empty_cpu_ms).toFixed(1)],
  ]);
  return { text, figures: { routing: r, rss, cold, resume: res } };
}

if (process.argv.includes("--resume")) {
  // node --import tsx bench/core.ts --resume [EC2 grants] [GCE grants]: that figure alone.
  const i = process.argv.indexOf("--resume");
  process.stdout.write(`${JSON.stringify(await resume({ aws: Number(process.argv[i + 1] ?? 5000), gcp: Number(process.argv[i + 2] ?? 5000) }))}\n`);
  process.exit(0);
} else if (process.argv.includes("--cold")) {
  // node --import tsx bench/core.ts --cold: the cold-start figures alone.
  process.stdout.write(`${JSON.stringify(await coldStart())}\n`);
  process.exit(0);
} else if (process.argv.includes("--rss-child")) {
  process.stdout.write(JSON.stringify(await rssChild()));
  process.exit(0);
} else if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const r = await run();
  console.log(`core figures\n${r.text}`);
  process.exit(0);
}
