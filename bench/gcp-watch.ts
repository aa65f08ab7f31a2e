/**
 * Watching many GCE instances: the gcp backend's batched watch (one label-filtered
 * aggregatedList per project per interval, paged at 500) against polling each instance with
 * instances.get, counted on the GCE fake with the real @google-cloud/compute client.
 *
 *   node --import tsx bench/gcp-watch.ts [instances] [polls]
 */
import { setMaxListeners } from "node:events";
import { pathToFileURL } from "node:url";
import { InstancesClient } from "@google-cloud/compute";
import { OAuth2Client } from "google-auth-library";
import { OfferingCache } from "../src/backends/offering-cache.js";
import { GcpBackend } from "../src/backends/gcp.js";
import { gceNaming } from "../src/backends/gcp/naming.js";
import { GcpConfig } from "../src/config/schema.js";
import { Almanac, type ProvisionedInstance } from "../src/domain/index.js";
import { systemClock } from "../src/util/clock.js";
import { createLogger } from "../src/util/logger.js";
import { GceFake } from "../test/fakes/gce.js";

export interface WatchBenchResult {
  instances: number;
  polls: number;
  batched: { calls: number; callsPerPoll: number; ms: number };
  perInstance: { calls: number; callsPerPoll: number; ms: number };
}

const PROJECT = "bench-project-1";
const ZONES = ["us-central1-a", "us-central1-b"];

export async function run(o: { instances?: number; polls?: number } = {}): Promise<WatchBenchResult> {
  const n = o.instances ?? 200;
  const polls = o.polls ?? 10;
  const fake = await GceFake.start({ project: PROJECT, zones: ZONES, bootDelayMs: 0 });
  const auth = new OAuth2Client();
  auth.setCredentials({ access_token: fake.accessToken, expiry_date: Date.now() + 864e5 });
  const naming = gceNaming("compute-bridge", "bench");
  const insts: ProvisionedInstance[] = [];
  for (let i = 0; i < n; i++) {
    const rid = `bench-${i}`;
    const zone = ZONES[i % ZONES.length]!;
    const name = naming.instanceName(rid);
    fake.addInstance(zone, { name, machineType: `zones/${zone}/machineTypes/n2-standard-2`, labels: { [naming.bridgeKey]: naming.bridgeValue, [naming.requestKey]: naming.requestValue(rid) } });
    insts.push({ request_id: rid, backend: "gcp", instance_id: name, region: "us-central1", host: null, ssh_port: null, ssh_user: null, host_key_sha256: null, started_at: new Date().toISOString(), cpu_millicores: 1000, ram_mib: 1024, details: { zone } });
  }
  const cfg = GcpConfig.parse({
    project: PROJECT,
    zones: ZONES,
    machine_types: [{ name: "n2-standard-2", vcpus: 2, memory_mib: 8192 }],
    max_concurrent_instances: n + 1,
    image: "projects/debian-cloud/global/images/family/debian-12",
    credentials_file: "unused.json",
    api_endpoint: `http://127.0.0.1:${fake.port}`,
    poll_interval_seconds: 0.01,
  });
  const ctx = { providerId: "bench", stateDir: "/tmp", configDir: "/tmp", log: createLogger("silent"), clock: systemClock, almanac: new Almanac(new Date(0), 1), unavailable: new OfferingCache(1, systemClock) };
  const backend = new GcpBackend(cfg, ctx, { authClient: auth });
  try {
    // Batched: every instance watched at once for `polls` intervals.
    fake.resetCalls();
    const ctl = new AbortController();
    setMaxListeners(n + 16, ctl.signal); // one shared signal for every watch, unlike the daemon
    const t0 = performance.now();
    const watches = insts.map((i) => backend.watchUntilExit(i, new Date(Date.now() + 3_600_000), ctl.signal).catch(() => undefined));
    const pages = Math.max(1, Math.ceil(n / 500));
    while (fake.countCalls("aggregatedList") < polls * pages) await new Promise((r) => setTimeout(r, 2));
    const batchedMs = performance.now() - t0;
    ctl.abort();
    await Promise.all(watches);
    const batchedCalls = fake.countCalls("aggregatedList") + fake.countCalls("get");

    // Baseline: one instances.get per instance per interval.
    const client = new InstancesClient({ ...fake.clientOptions(), authClient: auth as unknown as NonNullable<ConstructorParameters<typeof InstancesClient>[0]>["authClient"] });
    fake.resetCalls();
    const t1 = performance.now();
    for (let p = 0; p < polls; p++) await Promise.all(insts.map((i) => client.get({ project: PROJECT, zone: i.details["zone"]!, instance: i.instance_id })));
    const perMs = performance.now() - t1;
    const perCalls = fake.countCalls();
    await client.close();
    return {
      instances: n,
      polls,
      batched: { calls: batchedCalls, callsPerPoll: batchedCalls / polls, ms: Math.round(batchedMs) },
      perInstance: { calls: perCalls, callsPerPoll: perCalls / polls, ms: Math.round(perMs) },
    };
  } finally {
    await backend.close();
    await fake.close();
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const n = Number(process.argv[2] ?? 200);
  const polls = Number(process.argv[3] ?? 10);
  const r = await run({ instances: n, polls });
  console.log(`gcp watch, ${r.instances} instances, ${r.polls} polls`);
  console.log(`  batched (aggregatedList):    ${r.batched.calls} calls (${r.batched.callsPerPoll}/poll), ${r.batched.ms} ms`);
  console.log(`  per instance (instances.get): ${r.perInstance.calls} calls (${r.perInstance.callsPerPoll}/poll), ${r.perInstance.ms} ms`);
}
