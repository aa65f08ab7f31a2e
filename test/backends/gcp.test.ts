/**
 * GCP backend against the GCE REST fake (test/fakes/gce.ts), driven through the REAL
 * @google-cloud/compute 6.x clients with a static-token OAuth2Client: nothing contacts anything
 * but 127.0.0.1 (a guard on net.Socket#connect fails the run otherwise).
 *
 *   node --import tsx --test test/backends/gcp.test.ts
 *
 * Lifecycle cases run through GrantManager + Store + Fleet as src/daemon.ts wires them; the
 * rest call the backend directly. The fake's clock is virtual (zoneOperations.wait advances it),
 * so nothing sleeps to synchronise; poll intervals are a few milliseconds.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import http from "node:http";
import net, { type AddressInfo } from "node:net";
import path from "node:path";
import { Writable } from "node:stream";
import { after, before, describe, it } from "node:test";
import { OAuth2Client } from "google-auth-library";
import { BackendError, CapacityError, CredentialError, InvalidRequestError, QuotaError, TransientError, type BackendContext } from "../../src/backends/backend.js";
import { exitMarker, failMarker } from "../../src/backends/common/cloud-init.js";
import { GcpBackend, type GcpBackendOptions } from "../../src/backends/gcp.js";
import { deterministicUuid, GCE_LABEL_VALUE, GCE_NAME, gceNaming } from "../../src/backends/gcp/naming.js";
import { LocalBackend } from "../../src/backends/local.js";
import { OfferingCache } from "../../src/backends/offering-cache.js";
import { GcpConfig } from "../../src/config/schema.js";
import type { ComputeGrant, Envelope, ProvisionedInstance } from "../../src/domain/index.js";
import { Fleet } from "../../src/fleet/fleet.js";
import { placeholder } from "../../src/lifecycle/manager.js";
import { Store } from "../../src/store/store.js";
import { systemClock, type Clock } from "../../src/util/clock.js";
import { createLogger, type Logger } from "../../src/util/logger.js";
import { Reservations } from "../../src/fleet/reservations.js";
import { GceFake, type GceFakeOptions, type JsonObject } from "../fakes/gce.js";
import { until } from "../helpers/http.js";
import { bundleImage } from "../helpers/images.js";
import { loopbackImages, MS_ALMANAC } from "../helpers/local.js";
import { tempDir } from "../helpers/tmp.js";
import { testBridge } from "../helpers/lifecycle.js";
import { installNetworkGuard } from "../helpers/net-guard.js";

// ------------------------------------------------------------------ network guard

const refusedConnects = installNetworkGuard();
after(() => assert.deepEqual(refusedConnects, [], "only loopback may be contacted"));

// ------------------------------------------------------------------ fixtures

const PROJECT = "bridge-test-1";
const ZONES = ["us-central1-a", "us-central1-b", "europe-west4-a"];
const PROVIDER = "Test.Provider_1";
const never = new AbortController().signal;

/** A TCP server that greets like sshd: the readiness probe's target. */
let sshPort = 0;
let sshServer: net.Server;
/** Serves the workload bundle over http (the boot script and the local backend fetch it). */
let imageServer: http.Server;
let envelope: Envelope;
let imageDir: string;

before(async () => {
  sshServer = net.createServer((s) => s.end("SSH-2.0-OpenSSH_9.2p1 fake\r\n"));
  await new Promise<void>((r) => sshServer.listen(0, "127.0.0.1", r));
  sshPort = (sshServer.address() as AddressInfo).port;
  imageDir = tempDir({ after }, "cb-gcp-img-");
  const img = bundleImage(imageDir, "work", "exit 4");
  const { readFileSync } = await import("node:fs");
  const bytes = readFileSync(img.file);
  imageServer = http.createServer((_req, res) => res.end(bytes));
  await new Promise<void>((r) => imageServer.listen(0, "127.0.0.1", r));
  envelope = {
    image: { url: `http://127.0.0.1:${(imageServer.address() as AddressInfo).port}/work.tar.gz`, sha256: img.sha256, format: "bundle" },
    ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOv7yYjS8p8n4H0yJ4cQ0x1fT1d0jN1a3e0k8bQ7Ukq0 buyer@example",
  };
});
after(() => {
  sshServer.close();
  imageServer.close();
});

class LogCapture extends Writable {
  readonly lines: string[] = [];
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    this.lines.push(chunk.toString());
    cb();
  }
  get text(): string {
    return this.lines.join("");
  }
}

interface Rig {
  fake: GceFake;
  backend: GcpBackend;
  cfg: GcpConfig;
  ctx: BackendContext;
  logs: LogCapture;
  /** A second backend over the same cloud (a restarted daemon). */
  restart(): GcpBackend;
}

function authClient(token: string): OAuth2Client {
  const c = new OAuth2Client();
  c.setCredentials({ access_token: token, expiry_date: Date.now() + 365 * 864e5 });
  return c;
}

function gcpConfig(fake: GceFake | null, over: Record<string, unknown> = {}): GcpConfig {
  return GcpConfig.parse({
    project: PROJECT,
    zones: ["us-central1-a", "us-central1-b", "europe-west4-a"],
    machine_types: [
      { name: "n2-standard-4", vcpus: 4, memory_mib: 16384 },
      { name: "n2-standard-2", vcpus: 2, memory_mib: 8192 },
    ],
    tdx_machine_types: [{ name: "c3-standard-4", vcpus: 4, memory_mib: 16384 }],
    max_concurrent_instances: 20,
    image: "projects/debian-cloud/global/images/family/debian-12",
    tdx_image: "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64",
    credentials_file: "gcp-key.json",
    ...(fake ? { api_endpoint: `http://127.0.0.1:${fake.port}` } : {}),
    poll_interval_seconds: 0.01,
    ssh_port: sshPort,
    ready_timeout_seconds: 5,
    launch_timeout_seconds: 60,
    ...over,
  });
}

const FAST: GcpBackendOptions["retry"] = { attempts: 4, baseMs: 1, capMs: 5 };

async function rig(t: { after: (fn: () => unknown) => void }, o: { fake?: GceFakeOptions; cfg?: Record<string, unknown>; clock?: Clock; unavailable?: OfferingCache; token?: string } = {}): Promise<Rig> {
  const fake = await GceFake.start({ project: PROJECT, zones: ZONES, bootDelayMs: 20_000, deleteDelayMs: 5_000, ...o.fake });
  const cfg = gcpConfig(fake, o.cfg);
  const logs = new LogCapture();
  const clock = o.clock ?? systemClock;
  const dir = tempDir(t);
  const ctx: BackendContext = {
    providerId: PROVIDER,
    stateDir: dir,
    configDir: dir,
    log: createLogger("debug", logs),
    clock,
    almanac: MS_ALMANAC,
    unavailable: o.unavailable ?? new OfferingCache(60_000, clock),
  };
  const made: GcpBackend[] = [];
  const make = () => {
    const b = new GcpBackend(cfg, ctx, { authClient: authClient(o.token ?? fake.accessToken), retry: FAST, sshProbeIntervalMs: 5 });
    made.push(b);
    return b;
  };
  const backend = make();
  t.after(async () => {
    for (const b of made) await b.close();
    await fake.close();
  });
  return { fake, backend, cfg, ctx, logs, restart: make };
}

function grant(id: string, over: Partial<ComputeGrant> = {}): ComputeGrant {
  return { request_id: id, region: "us-central1", tdx_required: false, cpu_millicores: 2000, ram_mib: 4096, valid_to: Date.now() + 120_000, ...over };
}

const naming = gceNaming("compute-bridge", PROVIDER);
const nameOf = (rid: string) => naming.instanceName(rid);
const ridLabel = (rid: string) => naming.requestValue(rid);

function metadata(body: JsonObject | undefined): Record<string, string> {
  const items = ((body?.["metadata"] as JsonObject | undefined)?.["items"] ?? []) as { key: string; value: string }[];
  return Object.fromEntries(items.map((i) => [i.key, i.value]));
}

/** GrantManager + Store + Fleet, wired as in src/daemon.ts. */
async function lifecycle(t: { after: (fn: () => unknown) => void }, fleet: Fleet, stateDir: string, log: Logger = createLogger("silent")) {
  const { store, manager, close } = await testBridge(t, { stateDir, fleet, almanac: MS_ALMANAC, providerId: PROVIDER, log, persistentIdentity: true, retryBaseMs: 5, retryCapMs: 50 });
  return { store, manager, close };
}

const TERMINAL = new Set(["completed", "failed", "expired", "cancelled"]);
async function settledRecord(store: Store, id: string, what = `grant ${id} to finish`) {
  return until(async () => {
    const r = await store.get(id);
    return r && TERMINAL.has(r.state) ? r : null;
  }, what, 20_000, 5);
}

/** Parsed log lines at `level` (pino writes one JSON object per line). */
function logged(logs: LogCapture, level: string): Record<string, unknown>[] {
  return logs.text
    .split("\n")
    .filter((l) => l.trim() !== "")
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((o) => o["level"] === level);
}

/** The core's warning (cloud/vm-backend.ts), the same on every cloud. */
const HOST_KEY_WARNING = "no SSH host key fingerprint from the guest; host_key_sha256 stays null";

// ------------------------------------------------------------------ tests

describe("gcp backend: declared capabilities and routing", () => {
  it("derives regions from zones, TDX from tdx_machine_types, and declines with machine-readable codes (no API call)", async (t) => {
    const { backend, fake } = await rig(t, { cfg: { max_concurrent_instances: 1 } });
    assert.deepEqual(backend.capabilities(), { regions: ["europe-west4", "us-central1"], tdx_capable: true, max_cpu_millicores: 4000, max_ram_mib: 16384 });
    const ledger = new Reservations();
    const code = (g: ComputeGrant) => {
      const s = backend.canSatisfy(g, ledger.held(backend.name));
      return s.ok ? "ok" : s.code;
    };
    assert.equal(code(grant("a")), "ok");
    assert.equal(code(grant("a", { region: "us-east1" })), "region_not_served");
    assert.equal(code(grant("a", { cpu_millicores: 8000 })), "too_large");
    assert.equal(code(grant("a", { tdx_required: true, ram_mib: 32768 })), "too_large");
    assert.equal(code(grant("a", { tdx_required: true })), "ok");

    const noTdx = new GcpBackend(gcpConfig(fake, { tdx_machine_types: [], tdx_image: undefined }), rigCtx(t), {});
    assert.equal(noTdx.capabilities().tdx_capable, false);
    const s = noTdx.canSatisfy(grant("a", { tdx_required: true }));
    assert.equal(s.ok === false && s.code, "tdx_not_supported");
    await noTdx.close();
    assert.equal(fake.calls.length, 0, "capabilities and canSatisfy make no API call");

    // Concurrency cap, decided from reservations: one held, then at_capacity for any other grant.
    ledger.reserve({ request_id: "cap-1", backend: backend.name, placement: null, cpu_millicores: 1000, ram_mib: 1024 });
    const inst = await backend.provision(grant("cap-1"), envelope, never);
    assert.equal(code(grant("cap-2")), "at_capacity");
    await backend.terminate(inst);
    ledger.release("cap-1");
    assert.equal(code(grant("cap-2")), "ok");
  });
});

it("capabilities() and canSatisfy() load neither the Compute SDK nor google-auth-library", () => {
  const repo = path.resolve(import.meta.dirname, "../..");
  const code = `
    import { createRequire } from "node:module";
    import { pathToFileURL } from "node:url";
    const req = createRequire(pathToFileURL(process.cwd() + "/package.json"));
    const sdk = () => Object.keys(req.cache).filter((k) => /@google-cloud[\\/]compute|google-gax|google-auth-library/.test(k)).length;
    const { createBackend } = await import(pathToFileURL(process.cwd() + "/src/backends/registry.ts").href);
    const { GcpConfig } = await import(pathToFileURL(process.cwd() + "/src/config/schema.ts").href);
    const { OfferingCache } = await import(pathToFileURL(process.cwd() + "/src/backends/offering-cache.ts").href);
    const { createLogger } = await import(pathToFileURL(process.cwd() + "/src/util/logger.ts").href);
    const { systemClock } = await import(pathToFileURL(process.cwd() + "/src/util/clock.ts").href);
    const gcp = GcpConfig.parse(${JSON.stringify({ project: PROJECT, zones: ["us-central1-a"], machine_types: [{ name: "n2-standard-2", vcpus: 2, memory_mib: 8192 }], max_concurrent_instances: 1, image: "img", credentials_file: "/nonexistent.json" })});
    const ctx = { providerId: "p", stateDir: "/tmp", configDir: "/tmp", log: createLogger("silent"), clock: systemClock, almanac: null, unavailable: new OfferingCache(1, systemClock) };
    const b = await createBackend("gcp", { backends: { gcp } }, ctx);
    const caps = b.capabilities();
    const sat = b.canSatisfy({ request_id: "r", region: "us-central1", tdx_required: false, cpu_millicores: 1000, ram_mib: 1024, valid_to: 1 });
    console.log(JSON.stringify({ loaded: sdk(), caps, sat }));
  `;
  const out = JSON.parse(execFileSync(process.execPath, ["--import", "tsx", "--input-type=module", "-e", code], { cwd: repo, encoding: "utf8" })) as { loaded: number; caps: { regions: string[] }; sat: { ok: boolean } };
  assert.equal(out.loaded, 0, "no Google module was loaded");
  assert.deepEqual(out.caps.regions, ["us-central1"]);
  assert.equal(out.sat.ok, true);
});

function rigCtx(t: { after: (fn: () => unknown) => void }): BackendContext {
  const dir = tempDir(t);
  return { providerId: PROVIDER, stateDir: dir, configDir: dir, log: createLogger("silent"), clock: systemClock, almanac: MS_ALMANAC, unavailable: new OfferingCache(1000, systemClock) };
}

describe("gcp backend through GrantManager + Store + Fleet", () => {
  it("plain grant: insert body, labels, metadata, SSH readiness, exit code from the serial console, instance deleted", async (t) => {
    const { fake, backend } = await rig(t);
    const { store, manager } = await lifecycle(t, Fleet.of([backend], systemClock), tempDir(t));
    const rid = "Plain.Grant_1";
    const r = await manager.submit({ grant: grant(rid), envelope });
    assert.equal(r.status, "created");
    const rec = await until(async () => (await store.get(rid))?.state === "running" && (await store.get(rid)), "running");
    const name = nameOf(rid);
    assert.match(name, /^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])$/);
    assert.equal(rec.instance?.instance_id, name);
    assert.equal(rec.instance?.host, "127.0.0.1");
    assert.equal(rec.instance?.ssh_port, sshPort);
    assert.equal(rec.instance?.details["zone"], "us-central1-a");
    assert.equal(rec.instance?.details["machine_type"], "n2-standard-2", "the smallest fitting type");
    assert.equal(rec.instance?.host_key_sha256, fake.hostKeyFingerprint(PROJECT, "us-central1-a", name), "the guest's host key report, read from its serial console");

    assert.equal(fake.createdCount, 1);
    const create = fake.creates[0]!;
    assert.equal(create.requestId, deterministicUuid("insert", PROVIDER, rid, "us-central1-a", "n2-standard-2"));
    assert.match(create.requestId!, /^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.deepEqual(create.labels, { "compute-bridge-bridge": naming.bridgeValue, "compute-bridge-rid": ridLabel(rid) });
    const body = create.body;
    assert.equal(body["confidentialInstanceConfig"], undefined);
    assert.deepEqual(body["scheduling"], { automaticRestart: false });
    assert.deepEqual(body["serviceAccounts"], undefined, "proto3 JSON drops the empty list: no service account is attached");
    const md = metadata(body);
    assert.equal(md["compute-bridge-request-id"], rid, "the exact request id travels in metadata");
    assert.match(md["startup-script"]!, /^#!\/bin\/sh/);
    assert.ok(md["startup-script"]!.includes(envelope.image.sha256));
    assert.equal(md["ssh-keys"], `compute-bridge:${envelope.ssh_public_key}`);
    assert.equal(md["block-project-ssh-keys"], "TRUE");
    const disk = (body["disks"] as JsonObject[])[0]!;
    assert.equal((disk["initializeParams"] as JsonObject)["sourceImage"], "projects/debian-cloud/global/images/family/debian-12");
    assert.equal(disk["autoDelete"], true);

    // The guest reports and powers off; the batched watch sees TERMINATED and reads the marker.
    fake.guestPowerOff(PROJECT, "us-central1-a", name, `boot noise\n${exitMarker(rid, 3, 2.5)}\nreboot: Power down\n`);
    const done = await settledRecord(store, rid);
    assert.equal(done.state, "completed");
    assert.equal(done.outcome?.exit_code, 3);
    assert.equal((await store.computeLog(rid))?.usage.cpu_seconds, 2.5, "the workload's CPU time from the marker, in the ComputeLog");
    assert.equal(fake.instancesByLabel("compute-bridge-rid", ridLabel(rid)).length, 0, "nothing billable left");
    assert.equal(fake.countCalls({ method: "delete", status: 200 }), 1);
  });

  it("TDX grant: a non-TDX backend earlier in the fleet declines it, GCP inserts a TDX C3 instance", async (t) => {
    const { fake, backend } = await rig(t);
    const dir = tempDir(t);
    const local = new LocalBackend(
      { region: "us-central1", cpu_millicores: 8000, ram_mib: 16384, max_concurrent: 10, poll_interval_ms: 20, terminate_grace_seconds: 1, max_image_bytes: 1 << 26 },
      { ...rigCtx(t), stateDir: path.join(dir, "local"), ...loopbackImages() },
    );
    const fleet = Fleet.of([local, backend], systemClock);
    const { store, manager } = await lifecycle(t, fleet, path.join(dir, "state"));
    const rid = "tdx-1";
    const g = grant(rid, { tdx_required: true });
    const declined = local.canSatisfy(g);
    assert.equal(declined.ok === false && declined.code, "tdx_not_supported");
    assert.equal((await manager.submit({ grant: g, envelope })).status, "created");
    const rec = await until(async () => (await store.get(rid))?.state === "running" && (await store.get(rid)), "running");
    assert.equal(rec.backend, "gcp");
    assert.equal(rec.instance?.details["tdx"], "true");

    const body = fake.insertBody("us-central1-a", nameOf(rid))!;
    assert.deepEqual(body["confidentialInstanceConfig"], { confidentialInstanceType: "TDX" });
    assert.deepEqual(body["scheduling"], { onHostMaintenance: "TERMINATE", automaticRestart: false });
    assert.equal(body["machineType"], "zones/us-central1-a/machineTypes/c3-standard-4");
    const disk = (body["disks"] as JsonObject[])[0]!;
    assert.equal((disk["initializeParams"] as JsonObject)["sourceImage"], "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64");
    assert.equal(fake.getInstance(PROJECT, "us-central1-a", nameOf(rid))?.["cpuPlatform"], "Intel Sapphire Rapids");

    await manager.cancel(rid);
    const done = await settledRecord(store, rid);
    assert.equal(done.state, "cancelled");
    assert.equal(fake.listInstances({ project: PROJECT }).length, 0);
  });

  it("ZONE_RESOURCE_POOL_EXHAUSTED in a DONE operation: every fitting type in every zone of the region, then failover; the offerings are cached", async (t) => {
    const dir = tempDir(t);
    const clock = systemClock;
    const unavailable = new OfferingCache(60_000, clock);
    const { fake, backend } = await rig(t, { unavailable });
    fake.faults.poolExhausted = true;
    const local = new LocalBackend(
      { region: "us-central1", cpu_millicores: 8000, ram_mib: 16384, max_concurrent: 10, poll_interval_ms: 20, terminate_grace_seconds: 1, max_image_bytes: 1 << 26 },
      { ...rigCtx(t), stateDir: path.join(dir, "local"), ...loopbackImages() },
    );
    const fleet = new Fleet([backend, local], unavailable);
    const { store, manager } = await lifecycle(t, fleet, path.join(dir, "state"));
    const rid = "pool-1";
    await manager.submit({ grant: grant(rid), envelope });
    const done = await settledRecord(store, rid);
    assert.equal(done.backend, "local", "failed over to the next backend");
    assert.equal(done.state, "completed");
    assert.equal(done.outcome?.exit_code, 4, "the bundle ran on the local backend");
    assert.deepEqual(done.attempts.map((a) => [a.backend, a.error_kind]), [["gcp", "capacity"]]);
    assert.match(done.attempts[0]!.message, /n2-standard-2: us-central1-a: .*ZONE_RESOURCE_POOL_EXHAUSTED.*n2-standard-4: us-central1-a: /);
    assert.deepEqual(fake.creates.map((c) => [c.zone, c.machineType, c.outcome]), [
      ["us-central1-a", "n2-standard-2", "ZONE_RESOURCE_POOL_EXHAUSTED"],
      ["us-central1-b", "n2-standard-2", "ZONE_RESOURCE_POOL_EXHAUSTED"],
      ["us-central1-a", "n2-standard-4", "ZONE_RESOURCE_POOL_EXHAUSTED"],
      ["us-central1-b", "n2-standard-4", "ZONE_RESOURCE_POOL_EXHAUSTED"],
    ], "both types in both zones of us-central1, europe-west4 never");
    assert.equal(unavailable.isUnavailable("gcp", "us-central1", "n2-standard-2"), true);
    assert.equal(unavailable.isUnavailable("gcp", "us-central1", "n2-standard-4"), true);
    assert.equal(fake.listInstances({ project: PROJECT }).length, 0);
  });

  it("a stock-out of the smallest type moves on to the next fitting type on GCP (no failover), each insert with its own requestId", async (t) => {
    const unavailable = new OfferingCache(60_000, systemClock);
    const { fake, backend } = await rig(t, { unavailable });
    fake.faults.poolExhausted = (ctx) => ctx.machineType === "n2-standard-2";
    const inst = await backend.provision(grant("pool-2"), envelope, never);
    assert.equal(inst.details["machine_type"], "n2-standard-4");
    assert.deepEqual(fake.creates.map((c) => [c.zone, c.machineType, c.outcome]), [
      ["us-central1-a", "n2-standard-2", "ZONE_RESOURCE_POOL_EXHAUSTED"],
      ["us-central1-b", "n2-standard-2", "ZONE_RESOURCE_POOL_EXHAUSTED"],
      ["us-central1-a", "n2-standard-4", "ok"],
    ]);
    const ids = fake.callsMatching("insert").map((c) => c.query["requestId"]);
    assert.deepEqual(ids, [
      deterministicUuid("insert", PROVIDER, "pool-2", "us-central1-a", "n2-standard-2"),
      deterministicUuid("insert", PROVIDER, "pool-2", "us-central1-b", "n2-standard-2"),
      deterministicUuid("insert", PROVIDER, "pool-2", "us-central1-a", "n2-standard-4"),
    ]);
    assert.equal(unavailable.isUnavailable("gcp", "us-central1", "n2-standard-2"), true);
    // A retried provision adopts what the earlier attempt created: no new insert.
    const again = await backend.provision(grant("pool-2"), envelope, never);
    assert.equal(again.instance_id, inst.instance_id);
    assert.equal(fake.creates.filter((c) => c.outcome === "ok").length, 1);
    await backend.terminate(inst);
  });

  it("requestId idempotency across a restart: the resumed grant adopts the in-flight insert, one instance only", async (t) => {
    // wait returns at once while the insert is pending, so provisioning sits in its wait loop.
    const { fake, backend, restart } = await rig(t, { fake: { waitTimeoutMs: 0 }, cfg: { poll_interval_seconds: 0.02 } });
    const stateDir = tempDir(t);
    const first = await lifecycle(t, Fleet.of([backend], systemClock), stateDir);
    const rid = "restart-1";
    await first.manager.submit({ grant: grant(rid), envelope });
    await until(() => fake.countCalls("wait") >= 2, "the insert to be in flight");
    assert.equal((await first.store.get(rid))?.state, "provisioning");
    await first.close(); // the daemon stops mid-provision
    await backend.close();

    const again = restart();
    fake.waitTimeoutMs = 120_000;
    const second = await lifecycle(t, Fleet.of([again], systemClock), stateDir);
    await again.reconcile(new Set([rid]));
    assert.equal(await second.manager.resumeAll(), 1);
    const rec = await until(async () => (await second.store.get(rid))?.state === "running" && (await second.store.get(rid)), "running after restart");
    assert.equal(rec.instance?.instance_id, nameOf(rid));
    const inserts = fake.callsMatching("insert");
    assert.equal(inserts.length, 2, "the insert was re-sent ...");
    assert.equal(inserts[0]!.query["requestId"], inserts[1]!.query["requestId"], "... with the same requestId");
    assert.equal(fake.createdCount, 1, "... and GCE created one instance");
    assert.equal(fake.createsByRequestId(inserts[0]!.query["requestId"]!), 1);

    fake.guestPowerOff(PROJECT, "us-central1-a", nameOf(rid), `${exitMarker(rid, 0)}\n`);
    const done = await settledRecord(second.store, rid);
    assert.equal(done.state, "completed");
    assert.equal(done.outcome?.exit_code, 0);
  });

  it("credential errors: a refused token fails the grant as `credential`, no token in errors or logs, cleanup resumes once credentials work", async (t) => {
    const { fake, backend, logs } = await rig(t, { token: "wrong-secret-token-123456" });
    const log = createLogger("debug", logs);
    const { store, manager } = await lifecycle(t, Fleet.of([backend], systemClock), tempDir(t), log);
    const rid = "cred-1";
    await manager.submit({ grant: grant(rid), envelope });
    await until(async () => (await store.get(rid))?.state === "terminating", "provisioning to fail");
    const rec = (await store.get(rid))!;
    assert.equal(rec.outcome?.error_kind, "credential");
    assert.match(rec.outcome?.error_message ?? "", /HTTP 401.*credentials_file/);
    const s = backend.canSatisfy(grant("cred-2"));
    assert.equal(s.ok === false && s.code, "backend_unavailable", "new grants go elsewhere while credentials are refused");
    assert.equal(fake.createdCount, 0);
    const doctor = await backend.check();
    assert.equal(doctor[0]?.ok, false, "doctor reports the refused credentials");
    assert.ok(!JSON.stringify(doctor).includes("wrong-secret-token-123456"));
    // terminate cannot confirm without credentials: it keeps retrying, then succeeds once GCP accepts them.
    await until(() => fake.countCalls({ status: 401 }) >= 3, "terminate retries");
    fake.accessToken = "wrong-secret-token-123456";
    const done = await settledRecord(store, rid);
    assert.equal(done.state, "failed");
    assert.equal(done.error_kind, "credential");
    assert.equal(backend.canSatisfy(grant("cred-2")).ok, true, "a successful call clears the refusal");
    assert.ok(!logs.text.includes("wrong-secret-token-123456"), "the token never reaches a log line");
    assert.ok(!JSON.stringify((await store.get(rid))).includes("wrong-secret-token-123456"));
  });

  it("valid_to is enforced: the watch reports expired and the instance is deleted", async (t) => {
    const { fake, backend } = await rig(t);
    const { store, manager } = await lifecycle(t, Fleet.of([backend], systemClock), tempDir(t));
    const rid = "expire-1";
    // Long enough to be provisioned on a loaded machine (1.5 s was not: valid_to then aborted the
    // provisioning, and no instance was ever created), so that the watch is what meets valid_to.
    await manager.submit({ grant: grant(rid, { valid_to: Date.now() + 8000 }), envelope });
    const running = await until(async () => {
      const r = await store.get(rid);
      return (r?.state === "running" || TERMINAL.has(r?.state ?? "")) && r;
    }, "running");
    assert.equal(running.state, "running", `provisioned before valid_to: ${JSON.stringify(running)}`);
    const done = await settledRecord(store, rid);
    assert.equal(done.state, "expired", JSON.stringify(done));
    assert.equal(fake.createdCount, 1, JSON.stringify(done));
    assert.equal(fake.listInstances({ project: PROJECT }).length, 0);
  });
});

describe("gcp backend: direct", () => {
  it("quota: a DONE operation with QUOTA_EXCEEDED and a synchronous 403 both become QuotaError with the offering", async (t) => {
    const { fake, backend } = await rig(t);
    fake.faults.quotaExceeded = "operation";
    const e1 = await backend.provision(grant("q-1"), envelope, never).catch((e: unknown) => e);
    assert.ok(e1 instanceof QuotaError, String(e1));
    assert.deepEqual(e1.offering, { region: "us-central1", shape: "n2-standard-2" });
    assert.equal(fake.creates.length, 1, "quota is regional: no second zone tried");
    fake.faults.quotaExceeded = "http";
    const e2 = await backend.provision(grant("q-2"), envelope, never).catch((e: unknown) => e);
    assert.ok(e2 instanceof QuotaError, String(e2));
    assert.deepEqual(e2.offering, { region: "us-central1", shape: "n2-standard-2" });
    await backend.terminate(placeholder(grant("q-1"), "gcp"));
    await backend.terminate(placeholder(grant("q-2"), "gcp"));
  });

  it("retries 429/5xx with a bounded budget; a lost insert response is replayed with the same requestId", async (t) => {
    const { fake, backend } = await rig(t);
    fake.failNext("insert", 503, "backendError", { afterCommit: true });
    fake.failNext("aggregatedList", 429, "rateLimitExceeded", { times: 2 });
    const inst = await backend.provision(grant("retry-1"), envelope, never);
    assert.equal(fake.createdCount, 1);
    assert.equal(fake.countCalls("insert"), 2);
    assert.equal(fake.countCalls({ method: "aggregatedList", status: 429 }), 2);
    await backend.terminate(inst);

    fake.failNext("aggregatedList", 503, "backendError", { times: 10 });
    const err = await backend.provision(grant("retry-2"), envelope, never).catch((e: unknown) => e);
    assert.ok(err instanceof TransientError, String(err));
    assert.equal(fake.countCalls({ method: "aggregatedList", status: 503 }), 4, "retry.attempts bounds the calls");
    fake.clearFailures();
  });

  it("batched watch: one aggregatedList per poll for all watched instances, serial output read once per exit", async (t) => {
    const { fake, backend } = await rig(t, { cfg: { poll_interval_seconds: 0.02 } });
    const N = 6;
    const grants = Array.from({ length: N }, (_, i) => grant(`watch-${i}`));
    const insts = await Promise.all(grants.map((g) => backend.provision(g, envelope, never)));
    fake.resetCalls();
    const ctl = new AbortController();
    const watches = insts.map((inst, i) => backend.watchUntilExit(inst, new Date(grants[i]!.valid_to), ctl.signal));
    await until(() => fake.countCalls("aggregatedList") >= 5, "five polls");
    const polls = fake.countCalls("aggregatedList");
    assert.equal(fake.countCalls("get"), 0, "no per-instance get");
    assert.equal(fake.countCalls("serialPort"), 0, "no serial reads while running");
    assert.ok(polls < 5 + 2, `one list call per poll for ${N} instances (got ${polls})`);
    for (const [i, inst] of insts.entries()) fake.guestPowerOff(PROJECT, inst.details["zone"]!, inst.instance_id, `${exitMarker(inst.request_id, 10 + i)}\n`);
    const obs = await Promise.all(watches);
    assert.deepEqual(obs.map((o) => o.exit_code), [10, 11, 12, 13, 14, 15]);
    assert.ok(obs.every((o) => o.kind === "exited" && o.failure === null));
    assert.equal(fake.countCalls("serialPort"), N, "one serial read per exit");
    assert.equal(fake.countCalls("get"), 0);
    for (const inst of insts) await backend.terminate(inst);
  });

  it("watch: guest failure markers, a stop without a marker and a vanished instance", async (t) => {
    const { fake, backend } = await rig(t);
    const [a, b, c] = await Promise.all(["wf-a", "wf-b", "wf-c"].map((id) => backend.provision(grant(id), envelope, never)));
    const deadline = new Date(Date.now() + 60_000);
    fake.guestPowerOff(PROJECT, a!.details["zone"]!, a!.instance_id, `${failMarker("wf-a", "image_verification", "image sha256 mismatch: nothing was run")}\n${exitMarker("someone-else", 0)}\n`);
    fake.guestPowerOff(PROJECT, b!.details["zone"]!, b!.instance_id);
    const [oa, ob] = await Promise.all([backend.watchUntilExit(a!, deadline, never), backend.watchUntilExit(b!, deadline, never)]);
    assert.deepEqual(oa.failure, { kind: "image_verification", message: "image sha256 mismatch: nothing was run" });
    assert.equal(ob.kind, "lost");
    assert.match(ob.failure?.message ?? "", /TERMINATED and reported no exit code/);
    // Deleted behind the bridge's back: lost once it is missing from consecutive polls.
    await backend.terminate({ ...c!, instance_id: c!.instance_id });
    const oc = await backend.watchUntilExit(c!, deadline, never);
    assert.equal(oc.kind, "lost");
    await backend.terminate(a!);
    await backend.terminate(b!);
  });

  it("timeouts: launch_timeout_seconds and ready_timeout_seconds fail provisioning with clear errors; a workload that ends before SSH answers is fine", async (t) => {
    const closed = net.createServer();
    await new Promise<void>((r) => closed.listen(0, "127.0.0.1", r));
    const deadPort = (closed.address() as AddressInfo).port;
    await new Promise<void>((r) => closed.close(() => r()));

    const slow = await rig(t, { fake: { waitTimeoutMs: 0, bootDelayMs: 3_600_000 }, cfg: { launch_timeout_seconds: 1, poll_interval_seconds: 0.05 } });
    const e1 = await slow.backend.provision(grant("slow-1"), envelope, never).catch((e: unknown) => e);
    assert.ok(e1 instanceof BackendError && !(e1 instanceof TransientError), String(e1));
    assert.match(e1.message, /not created within launch_timeout_seconds \(1 s/);
    slow.fake.waitTimeoutMs = 120_000; // let the delete operation's wait advance the virtual clock
    await slow.backend.terminate(placeholder(grant("slow-1"), "gcp"));
    assert.equal(slow.fake.listInstances().length, 0);

    const { fake, backend } = await rig(t, { cfg: { ready_timeout_seconds: 1, ssh_port: deadPort, poll_interval_seconds: 0.05 } });
    const e2 = await backend.provision(grant("nossh-1"), envelope, never).catch((e: unknown) => e);
    assert.ok(e2 instanceof BackendError, String(e2));
    assert.match(e2.message, /no SSH banner from 127\.0\.0\.1:\d+ within 1 s.*ready_timeout_seconds = 1/);
    await backend.terminate(placeholder(grant("nossh-1"), "gcp"));

    // The guest finishes and powers off while the SSH probe still fails: provisioning succeeds.
    const g = grant("quick-1");
    const p = backend.provision(g, envelope, never);
    await until(() => fake.countCalls({ method: "get", status: 200 }) >= 2, "the instance to be RUNNING");
    fake.guestPowerOff(PROJECT, "us-central1-a", nameOf("quick-1"), `${exitMarker("quick-1", 9)}\n`);
    const inst = await p;
    assert.equal(inst.host, null);
    assert.equal(inst.host_key_sha256, null, "a guest that powered off before SSH answered has no host key to pin");
    assert.equal(fake.countCalls("serialPort"), 0, "... and its console is not read for one");
    const obs = await backend.watchUntilExit(inst, new Date(g.valid_to), never);
    assert.equal(obs.exit_code, 9);
    await backend.terminate(inst);
  });

  it("terminate: by placeholder finds the instance by label; twice is fine; 404 counts as done", async (t) => {
    const { fake, backend } = await rig(t);
    const g = grant("term-1");
    await backend.provision(g, envelope, never);
    await backend.terminate(placeholder(g, "gcp"));
    assert.equal(fake.listInstances().length, 0);
    assert.equal(fake.countCalls({ method: "delete", status: 200 }), 1);
    await backend.terminate(placeholder(g, "gcp"));
    const inst: ProvisionedInstance = { ...placeholder(g, "gcp"), instance_id: nameOf("term-1"), details: { zone: "us-central1-a", gce_id: "1" } };
    await backend.terminate(inst);
    assert.equal(fake.countCalls({ method: "delete", status: 404 }), 1);
  });

  it("orphan sweep by label: old orphans of this bridge only; live grants re-attached; throttled", async (t) => {
    let fakeRef: GceFake | null = null;
    // The backend reads time from the fake's clock, so ages compare against creationTimestamp.
    const clock: Clock = { now: () => fakeRef!.now(), sleep: systemClock.sleep };
    const { fake, backend } = await rig(t, { clock, cfg: { orphan_grace_seconds: 600, reconcile_interval_seconds: 300 } });
    fakeRef = fake;
    const vm = (name: string, labels: Record<string, string>, rid?: string): JsonObject => ({
      name,
      machineType: "zones/us-central1-b/machineTypes/n2-standard-2",
      labels,
      metadata: { items: rid ? [{ key: "compute-bridge-request-id", value: rid }] : [] },
    });
    const ours = (rid: string) => ({ [naming.bridgeKey]: naming.bridgeValue, [naming.requestKey]: ridLabel(rid) });
    fake.addInstance("us-central1-b", vm(nameOf("Old.Orphan"), ours("Old.Orphan"), "Old.Orphan"));
    fake.addInstance("us-central1-b", vm(nameOf("Live_Grant"), ours("Live_Grant"), "Live_Grant"));
    fake.addInstance("us-central1-b", vm("other-bridge-vm", { [naming.bridgeKey]: gceNaming("compute-bridge", "another").bridgeValue, [naming.requestKey]: "x" }));
    fake.addInstance("us-central1-b", vm("unrelated-vm", { team: "data" }));
    fake.advance(601_000);
    fake.addInstance("us-central1-b", vm(nameOf("Young.Orphan"), ours("Young.Orphan"), "Young.Orphan"));

    await backend.reconcile(new Set(["Live_Grant"]));
    const deletes = fake.callsMatching("delete");
    assert.deepEqual(deletes.map((c) => c.path.split("/").pop()), [nameOf("Old.Orphan")]);
    assert.equal(backend.status()["active"], 1, "the live grant's instance counts against the cap after a restart");
    assert.equal(fake.countCalls("aggregatedList"), 1, "one label-filtered list for the whole project");

    await backend.reconcile(new Set(["Live_Grant"]));
    assert.equal(fake.countCalls("aggregatedList"), 1, "a second call within reconcile_interval_seconds is skipped");
    fake.advance(600_000);
    await backend.reconcile(new Set(["Live_Grant"]));
    assert.deepEqual(fake.callsMatching("delete").map((c) => c.path.split("/").pop()), [nameOf("Old.Orphan"), nameOf("Young.Orphan")]);
    assert.ok(fake.getInstance(PROJECT, "us-central1-b", "other-bridge-vm"), "another bridge's instance is never touched");
    assert.ok(fake.getInstance(PROJECT, "us-central1-b", "unrelated-vm"));
  });

  it("orphan sweep never takes an instance this backend holds, even one whose grant is newer than the store's snapshot", async (t) => {
    const { fake, backend } = await rig(t, { cfg: { orphan_grace_seconds: 0 }, fake: { bootDelayMs: 0 } });
    const inst = await backend.provision(grant("Held.1"), envelope, never);
    const ours = { [naming.bridgeKey]: naming.bridgeValue, [naming.requestKey]: ridLabel("Gone.1") };
    fake.addInstance("us-central1-b", { name: nameOf("Gone.1"), machineType: "zones/us-central1-b/machineTypes/n2-standard-2", labels: ours, metadata: { items: [] } });
    await backend.reconcile(new Set()); // the snapshot predates Held.1
    assert.deepEqual(fake.callsMatching("delete").map((c) => c.path.split("/").pop()), [nameOf("Gone.1")], "only the real orphan goes (grace 0)");
    await backend.terminate(inst);
  });

  it("credentials: a missing, malformed or wrong-type key file is a CredentialError naming the file, never its contents", async (t) => {
    const fake = await GceFake.start({ project: PROJECT, zones: ZONES });
    t.after(() => fake.close());
    const dir = tempDir(t);
    const ctx: BackendContext = { ...rigCtx(t), configDir: dir };
    const secret = "-----BEGIN PRIVATE KEY-----\\nMIIEsecretsecretsecret\\n-----END PRIVATE KEY-----\\n";
    const cases: [string, string | null, RegExp][] = [
      ["missing.json", null, /cannot read .*missing\.json \(ENOENT\)/],
      ["garbage.json", "not json at all " + secret, /is not JSON/],
      ["user.json", JSON.stringify({ type: "authorized_user", client_id: "x", client_secret: "topsecretvalue", refresh_token: "refreshsecret" }), /expected a service-account key/],
      ["partial.json", JSON.stringify({ type: "service_account", private_key: secret }), /lacks client_email or private_key/],
    ];
    for (const [file, content, want] of cases) {
      if (content !== null) writeFileSync(path.join(dir, file), content);
      const b = new GcpBackend(gcpConfig(fake, { credentials_file: file }), ctx, { retry: FAST });
      const err = await b.provision(grant("k-1"), envelope, never).catch((e: unknown) => e);
      assert.ok(err instanceof CredentialError, `${file}: ${String(err)}`);
      assert.match(err.message, want);
      assert.match(err.message, /backends\.gcp\.credentials_file/);
      for (const s of ["MIIEsecret", "topsecretvalue", "refreshsecret"]) assert.ok(!err.message.includes(s), `${file}: secret in message`);
      const s = b.canSatisfy(grant("k-2"));
      assert.equal(s.ok === false && s.code, "backend_unavailable");
      await b.close();
    }
    assert.equal(fake.calls.length, 0, "nothing reached the API");
  });

  it("403 without quota is a CredentialError with a role hint; the envelope must be fetchable by a VM", async (t) => {
    const { fake, backend } = await rig(t);
    fake.failNext("aggregatedList", 403, "forbidden", { message: "Required 'compute.instances.list' permission for 'projects/bridge-test-1'" });
    const err = await backend.provision(grant("perm-1"), envelope, never).catch((e: unknown) => e);
    assert.ok(err instanceof CredentialError, String(err));
    assert.match(err.message, /compute\.instances\.list.*Compute Instance Admin/);
    const bad = await backend.provision(grant("file-1"), { ...envelope, image: { ...envelope.image, url: "file:///etc/passwd" } }, never).catch((e: unknown) => e);
    assert.ok(bad instanceof InvalidRequestError, String(bad));
    // A startup-script over GCE's 256 KB metadata value limit is refused before any insert.
    const big = await backend.provision(grant("big-1"), { ...envelope, env: Object.fromEntries(Array.from({ length: 9 }, (_, i) => [`BIG_${i}`, "x".repeat(32768)])) }, never).catch((e: unknown) => e);
    assert.ok(big instanceof InvalidRequestError, String(big));
    assert.match(big.message, /startup-script; GCE accepts at most 262144 bytes/);
    assert.equal(fake.createdCount, 0);
  });

  it("instance names and label values are GCE-safe for any request id, and distinct per provider", () => {
    const ids = ["A", "a", "UPPER.case_and-dots", "x".repeat(64), "..a", "-_."];
    const names = new Set<string>();
    for (const id of ids) {
      const n = nameOf(id);
      assert.match(n, GCE_NAME);
      assert.match(ridLabel(id), GCE_LABEL_VALUE);
      assert.match(naming.bridgeValue, GCE_LABEL_VALUE);
      names.add(n);
    }
    assert.equal(names.size, ids.length, "case matters: A and a are different grants");
    assert.notEqual(gceNaming("compute-bridge", "other").instanceName("A"), nameOf("A"));
    const u = deterministicUuid("insert", PROVIDER, "A", "us-central1-a", "n2-standard-2");
    assert.equal(u, deterministicUuid("insert", PROVIDER, "A", "us-central1-a", "n2-standard-2"));
    assert.notEqual(u, deterministicUuid("insert", PROVIDER, "A", "us-central1-b", "n2-standard-2"));
  });
});

describe("gcp backend: the guest's SSH host key (host_key_sha256) from serial port 1", () => {
  it("a provisioned instance carries the fingerprint its guest reported; one read of port 1 from byte 0", async (t) => {
    const { fake, backend, logs } = await rig(t);
    const inst = await backend.provision(grant("Key.Grant_1"), envelope, never);
    const want = fake.hostKeyFingerprint(PROJECT, "us-central1-a", nameOf("Key.Grant_1"));
    assert.equal(inst.host_key_sha256, want);
    assert.match(inst.host_key_sha256 ?? "", /^SHA256:[A-Za-z0-9+/]{43}$/);
    const reads = fake.callsMatching("serialPort");
    assert.equal(reads.length, 1, "the report is there once SSH answers: one read");
    assert.equal(reads[0]!.path, `/compute/v1/projects/${PROJECT}/zones/us-central1-a/instances/${nameOf("Key.Grant_1")}/serialPort`);
    assert.equal(reads[0]!.query["port"], "1");
    assert.ok((reads[0]!.query["start"] ?? "0") === "0", "from the start of the console");
    assert.deepEqual(logged(logs, "warn").filter((o) => o["msg"] === HOST_KEY_WARNING), []);
    await backend.terminate(inst);
  });

  it("a guest that reports no host key: null at once, a warning, the instance still provisioned", async (t) => {
    const { fake, backend, logs } = await rig(t, { fake: { guestHostKey: "none" }, cfg: { host_key_timeout_seconds: 30 } });
    const rid = "NoKey.1";
    const inst = await backend.provision(grant(rid), envelope, never);
    assert.equal(inst.host_key_sha256, null);
    assert.equal(inst.host, "127.0.0.1", "provisioned all the same");
    assert.equal(inst.ssh_port, sshPort);
    assert.equal(fake.getInstance(PROJECT, "us-central1-a", nameOf(rid))?.["status"], "RUNNING");
    assert.equal(fake.countCalls("serialPort"), 1, "a 'none' report is final: no second read");
    const warn = logged(logs, "warn").filter((o) => o["msg"] === HOST_KEY_WARNING);
    assert.equal(warn.length, 1);
    assert.equal(warn[0]!["request_id"], rid);
    assert.equal(warn[0]!["instance_id"], nameOf(rid));
    assert.match(String(warn[0]!["reason"]), /no ed25519 SSH host key/);
    await backend.terminate(inst);
  });

  it("a guest that never reports: null after host_key_timeout_seconds of reads, the instance still provisioned", async (t) => {
    const { fake, backend, logs } = await rig(t, { fake: { guestHostKey: "never" }, cfg: { host_key_timeout_seconds: 0.3, poll_interval_seconds: 0.02 } });
    const rid = "Silent.1";
    const t0 = Date.now();
    const inst = await backend.provision(grant(rid), envelope, never);
    const elapsed = Date.now() - t0;
    assert.equal(inst.host_key_sha256, null);
    assert.equal(inst.host, "127.0.0.1");
    const reads = fake.callsMatching("serialPort");
    assert.ok(elapsed >= 300, `kept reading for host_key_timeout_seconds (${elapsed} ms)`);
    assert.ok(reads.length >= 3, `read again at the poll interval (${reads.length} reads)`);
    assert.ok(reads.every((c) => c.status === 200));
    const warn = logged(logs, "warn").filter((o) => o["msg"] === HOST_KEY_WARNING);
    assert.equal(warn.length, 1);
    assert.equal(warn[0]!["request_id"], rid);
    assert.match(String(warn[0]!["reason"]), /reported no SSH host key on its serial console within \d+ s/);
    await backend.terminate(inst);
  });

  it("429 and 503 on the first serial reads are retried (inside call(), then at the next interval); the fingerprint is still found", async (t) => {
    const { fake, backend, logs } = await rig(t, { cfg: { host_key_timeout_seconds: 30 } });
    // FAST allows 4 attempts per call: the first call fails all of them, the next read succeeds on its second.
    fake.failNext("serialPort", 429, "rateLimitExceeded", { times: 2 });
    fake.failNext("serialPort", 503, "backendError", { times: 3 });
    const rid = "Flaky.Console_1";
    const inst = await backend.provision(grant(rid), envelope, never);
    assert.equal(inst.host_key_sha256, fake.hostKeyFingerprint(PROJECT, "us-central1-a", nameOf(rid)));
    assert.equal(fake.countCalls({ method: "serialPort", injected: true }), 5);
    assert.equal(fake.countCalls({ method: "serialPort", status: 200 }), 1);
    assert.deepEqual(logged(logs, "warn").filter((o) => o["msg"] === HOST_KEY_WARNING), []);
    await backend.terminate(inst);
  });

  it("a console that can never be read (403: no compute.instances.getSerialPortOutput; 404): null without waiting, credentials not flagged", async (t) => {
    const { fake, backend, logs } = await rig(t, { cfg: { host_key_timeout_seconds: 30 } });
    fake.faults.serialPortDenied = true;
    const inst = await backend.provision(grant("Denied.1"), envelope, never);
    assert.equal(inst.host_key_sha256, null);
    assert.equal(inst.host, "127.0.0.1", "provisioned all the same");
    assert.equal(fake.countCalls({ method: "serialPort", status: 403 }), 1, "one read: a missing permission is not retried");
    assert.equal(backend.canSatisfy(grant("Other.1")).ok, true, "the credentials still work for everything else: new grants are not declined");
    assert.equal(backend.status()["credentials"], undefined);
    const warn = logged(logs, "warn").filter((o) => o["msg"] === HOST_KEY_WARNING);
    assert.equal(warn.length, 1);
    assert.equal(warn[0]!["request_id"], "Denied.1");
    assert.match(String(warn[0]!["reason"]), /serial console cannot be read: .*Required 'compute\.instances\.getSerialPortOutput' permission/);
    assert.deepEqual(logged(logs, "error"), [], "not reported as refused credentials");
    fake.faults.serialPortDenied = false;

    fake.failNext("serialPort", 404, "notFound", { times: 10 });
    const gone = await backend.provision(grant("Gone.1"), envelope, never);
    assert.equal(gone.host_key_sha256, null);
    assert.equal(fake.countCalls({ method: "serialPort", status: 404 }), 1, "an instance the API does not know is not read again");
    fake.clearFailures();
    await backend.terminate(inst);
    await backend.terminate(gone);
  });
});

describe("gcp backend: cloud semantics the fake models (issue #18 items 1, 6, 7, 8)", () => {
  it("the boot disk is boot_disk_type (pd-balanced by default) in the instance's zone; C3 (TDX) boots, where GCE's default pd-standard is refused", async (t) => {
    const { fake, backend } = await rig(t);
    const inst = await backend.provision(grant("disk-1", { tdx_required: true }), envelope, never);
    const body = fake.creates[0]!.body as { disks: { initializeParams: { diskType?: string } }[] };
    assert.equal(body.disks[0]!.initializeParams.diskType, "zones/us-central1-a/diskTypes/pd-balanced");
    await backend.terminate(inst);
    // The fake refuses what GCE refuses: the same C3 insert without a disk type (pd-standard).
    const { InstancesClient } = await import("@google-cloud/compute");
    const raw = new InstancesClient({ apiEndpoint: "127.0.0.1", port: fake.port, protocol: "http", fallback: true, authClient: authClient(fake.accessToken) as never });
    t.after(() => raw.close());
    const noType = { ...body, name: "disk-raw", disks: [{ boot: true, initializeParams: { sourceImage: "projects/x/global/images/y" } }] };
    await assert.rejects(raw.insert({ project: PROJECT, zone: "us-central1-a", requestId: deterministicUuid("raw"), instanceResource: noType as never }), /pd-standard disk type cannot be used by c3-standard-4/);
  });

  it("boot_disk_type is checked against every configured machine series at config time", () => {
    const bad = GcpConfig.safeParse({ ...gcpConfig(null), boot_disk_type: "pd-standard" });
    assert.equal(bad.success, false);
    assert.match(JSON.stringify(bad.error?.issues), /tdx_machine_types.*c3-standard-4.*cannot boot from boot_disk_type \\"pd-standard\\"/);
    const c4 = GcpConfig.safeParse({ ...gcpConfig(null), machine_types: [{ name: "c4-standard-4", vcpus: 4, memory_mib: 15360 }] });
    assert.equal(c4.success, false, "C4 boots from Hyperdisk only");
    assert.equal(GcpConfig.safeParse({ ...gcpConfig(null), boot_disk_type: "pd-ssd" }).success, true);
    assert.equal(gcpConfig(null).boot_disk_type, "pd-balanced");
  });

  it("a zone that does not offer the machine type (400) moves on to the next zone instead of ending the grant", async (t) => {
    const { fake, backend } = await rig(t);
    fake.faults.machineTypesByZone = { "us-central1-a": ["n2-standard-4"], "us-central1-b": ["n2-standard-2", "n2-standard-4"] };
    const inst = await backend.provision(grant("place-1"), envelope, never);
    assert.equal(inst.details["zone"], "us-central1-b");
    assert.equal(inst.details["machine_type"], "n2-standard-2");
    assert.deepEqual(fake.callsMatching("insert").map((c) => [c.path.split("/")[6], c.status]), [["us-central1-a", 400], ["us-central1-b", 200]]);
    await backend.terminate(inst);
  });

  it("TDX: a zone without TDX moves on; an image without TDX_CAPABLE fails over at once with the reason, after one insert", async (t) => {
    const { fake, backend } = await rig(t);
    fake.faults.tdxZones = ["us-central1-b"];
    const inst = await backend.provision(grant("tdx-zone", { tdx_required: true }), envelope, never);
    assert.equal(inst.details["zone"], "us-central1-b");
    await backend.terminate(inst);
    fake.faults.tdxZones = undefined;
    fake.faults.tdxCapableImages = [];
    const before = fake.countCalls("insert");
    await assert.rejects(backend.provision(grant("tdx-image", { tdx_required: true }), envelope, never), (e: Error) => e instanceof CapacityError && /backends\.gcp\.tdx_image.*TDX_CAPABLE/.test(e.message));
    assert.equal(fake.countCalls("insert") - before, 1, "no zone or type can help a wrong image");
  });

  it("no double retries: the Compute client itself does not retry a 503 on get/getSerialPortOutput, only call() does (bounded)", async (t) => {
    const { fake, backend } = await rig(t);
    const inst = await backend.provision(grant("retry-1"), envelope, never);
    fake.failNext("getSerialPortOutput", 503, "backendError", { times: 2 });
    const before = fake.countCalls("getSerialPortOutput");
    fake.guestPowerOff(PROJECT, inst.details["zone"]!, inst.instance_id, `${exitMarker("retry-1", 0)}\n`);
    const obs = await backend.watchUntilExit(inst, new Date(Date.now() + 60_000), never);
    assert.equal(obs.exit_code, 0);
    // Two 503s and one success: three HTTP calls, all of them call()'s attempts (FAST.attempts = 4).
    assert.equal(fake.countCalls("getSerialPortOutput") - before, 3);
    await backend.terminate(inst);
  });
});

describe("gcp backend: TDX attestation evidence from serial port 1", () => {
  // The instance's boot script runs for real (the fake's bootSerial hook) with a stand-in
  // configfs-tsm that hands out a real TD quote; its console output is the instance's serial port.
  // Its image URL has no server: the script reports the evidence first, then fails the fetch.
  const tdxEnvelope = (nonce: string): Envelope => ({ image: { url: "http://127.0.0.1:9/none", sha256: "0".repeat(64), format: "bundle" }, attestation_nonce: nonce });

  it("the guest's quote, bound to (request_id, nonce, host key), collected at provision", async (t) => {
    const dir = tempDir(t);
    const nonce = "7a".repeat(32);
    const rid = "tdx-ev-1";
    const { fakeTsm, runGuestScriptSync } = await import("../attestation/guest-run.js");
    const { bindingDigest } = await import("../../src/attestation/binding.js");
    const tsm = fakeTsm(dir, rid);
    const { fake, backend } = await rig(t, {
      fake: { guestHostKey: "none", bootSerial: (inst) => runGuestScriptSync(path.join(dir, "guest"), metadata((inst as unknown as { body: JsonObject }).body)["startup-script"] ?? "", { CB_TSM: tsm.root }) },
    });
    const inst = await backend.provision(grant(rid, { tdx_required: true }), tdxEnvelope(nonce), never);
    const ev = inst.attestation;
    assert.ok(ev && ev.status === "present", JSON.stringify(ev));
    assert.equal(ev.platform, "gcp");
    assert.equal(ev.nonce, nonce);
    assert.equal(ev.binding.digest, bindingDigest(rid, nonce, null).toString("hex"));
    assert.equal((await import("node:fs")).readFileSync(path.join(tsm.entry, "inblob")).toString("hex"), ev.binding.digest, "REPORTDATA the guest wrote");
    const { GCE_QUOTE } = await import("../attestation/guest-run.js");
    assert.deepEqual(Buffer.from(ev.blobs.td_quote!, "base64"), GCE_QUOTE);
    await backend.terminate(inst);
    assert.ok(fake.countCalls("serialPort") >= 1);
  });

  it("a guest without configfs-tsm: absent with its reason, at once; a plain grant carries none", async (t) => {
    const { backend } = await rig(t, { cfg: { host_key_timeout_seconds: 20 } });
    const t0 = Date.now();
    const inst = await backend.provision(grant("tdx-ev-2", { tdx_required: true }), tdxEnvelope("7b".repeat(16)), never);
    assert.ok(Date.now() - t0 < 15_000, "the guest's none report ends the wait");
    assert.deepEqual(inst.attestation, { status: "absent", platform: "gcp", nonce: "7b".repeat(16), reason: "the guest produced no evidence: this guest kernel has no configfs-tsm" });
    const plain = await backend.provision(grant("plain-ev"), envelope, never);
    assert.equal(plain.attestation, undefined);
    await backend.terminate(inst);
    await backend.terminate(plain);
  });

  it("a TDX guest that powers off before SSH answers: its evidence report is read once from the console", async (t) => {
    const closed = net.createServer();
    await new Promise<void>((r) => closed.listen(0, "127.0.0.1", r));
    const deadPort = (closed.address() as AddressInfo).port;
    await new Promise<void>((r) => closed.close(() => r()));
    const { fake, backend } = await rig(t, { cfg: { ready_timeout_seconds: 30, ssh_port: deadPort, poll_interval_seconds: 0.05 } });
    const rid = "tdx-ev-off";
    const p = backend.provision(grant(rid, { tdx_required: true }), tdxEnvelope("7c".repeat(16)), never);
    await until(() => fake.countCalls({ method: "get", status: 200 }) >= 1, "the instance to be RUNNING", 60_000, 5);
    fake.guestPowerOff(PROJECT, "us-central1-a", nameOf(rid));
    const inst = await p;
    assert.equal(inst.host, null);
    assert.equal(inst.host_key_sha256, null);
    assert.deepEqual(inst.attestation, { status: "absent", platform: "gcp", nonce: "7c".repeat(16), reason: "the guest produced no evidence: this guest kernel has no configfs-tsm" });
    await backend.terminate(inst);
  });
});

describe("gcp backend: doctor's read-only placement checks (zones, machine types, images)", () => {
  /** check() as doctor runs it; nothing may be created or changed: every call a GET, no insert. */
  async function doctor(backend: GcpBackend, fake: GceFake) {
    const results = await backend.check();
    assert.equal(fake.countCalls("insert"), 0, "doctor inserts nothing");
    assert.equal(fake.createdCount, 0);
    assert.deepEqual(fake.calls.filter((c) => c.httpMethod !== "GET").map((c) => `${c.httpMethod} ${c.path}`), [], "read-only calls only");
    return { results, line: (check: string) => results.find((r) => r.check === check) ?? assert.fail(`no line ${check}: ${JSON.stringify(results)}`) };
  }

  it("a good config: every line ok, one GET per zone, per (type, zone) and per image", async (t) => {
    const { backend, fake } = await rig(t);
    const { results } = await doctor(backend, fake);
    assert.deepEqual(
      results.map((r) => [r.check, r.ok]),
      [
        ["credentials and Compute API reachable", true],
        ["zone us-central1-a", true],
        ["zone us-central1-b", true],
        ["zone europe-west4-a", true],
        ["machine type n2-standard-4", true],
        ["machine type n2-standard-2", true],
        ["tdx machine type c3-standard-4", true],
        ["image", true],
        ["tdx_image", true],
      ],
      JSON.stringify(results),
    );
    assert.match(results[1]!.detail, /^UP \(region us-central1\)$/);
    assert.equal(results[4]!.detail, "offered in us-central1-a, us-central1-b, europe-west4-a");
    assert.equal(results[7]!.detail, "projects/debian-cloud/global/images/family/debian-12 -> debian-12-v20250101 READY");
    assert.match(results[8]!.detail, /ubuntu-2404-lts-amd64 -> .* READY, TDX_CAPABLE$/);
    assert.equal(fake.countCalls("zones.get"), 3);
    assert.equal(fake.countCalls("machineTypes.get"), 9);
    assert.equal(fake.countCalls("images.getFromFamily"), 2);
  });

  it("a DOWN zone and a zone that does not exist fail, naming backends.gcp.zones; types are not looked for in the missing zone", async (t) => {
    const { backend, fake } = await rig(t, { cfg: { zones: ["us-central1-a", "us-central1-b", "us-east1-b"] } });
    fake.faults.downZones = ["us-central1-b"];
    const { results, line } = await doctor(backend, fake);
    assert.equal(line("zone us-central1-a").ok, true);
    assert.equal(line("zone us-central1-b").ok, false);
    assert.match(line("zone us-central1-b").detail, /status DOWN.*backends\.gcp\.zones/);
    assert.equal(line("zone us-east1-b").ok, false);
    assert.match(line("zone us-east1-b").detail, /GCE has no such zone \(404\); fix backends\.gcp\.zones/);
    assert.equal(line("machine type n2-standard-4").detail, "offered in us-central1-a, us-central1-b");
    assert.equal(fake.countCalls({ method: "machineTypes.get", path: /us-east1-b/ }), 0);
    assert.equal(results.filter((r) => !r.ok).length, 2, JSON.stringify(results));
  });

  it("a machine type offered in no zone fails naming its key; one offered in some zones is usable, the others named", async (t) => {
    const { backend, fake } = await rig(t);
    fake.faults.machineTypesByZone = {
      "us-central1-a": ["n2-standard-4"],
      "us-central1-b": ["c3-standard-4"],
      "europe-west4-a": ["c3-standard-4"],
    };
    const { line } = await doctor(backend, fake);
    assert.deepEqual(line("machine type n2-standard-4"), {
      check: "machine type n2-standard-4",
      ok: true,
      detail: "offered in us-central1-a; not offered in us-central1-b, europe-west4-a (an insert there moves on to the next zone)",
    });
    const none = line("machine type n2-standard-2");
    assert.equal(none.ok, false);
    assert.match(none.detail, /offered in none of the configured zones \(not in us-central1-a, us-central1-b, europe-west4-a\); fix backends\.gcp\.machine_types or backends\.gcp\.zones/);
    const tdx = line("tdx machine type c3-standard-4");
    assert.equal(tdx.ok, true);
    assert.match(tdx.detail, /^offered in us-central1-b, europe-west4-a; not offered in us-central1-a/);

    fake.faults.machineTypesByZone = { "us-central1-a": ["n2-standard-4", "n2-standard-2"] };
    const again = await doctor(backend, fake);
    assert.equal(again.line("tdx machine type c3-standard-4").ok, false);
    assert.match(again.line("tdx machine type c3-standard-4").detail, /fix backends\.gcp\.tdx_machine_types or backends\.gcp\.zones/);
  });

  it("a configured size larger than GCE's machine type fails naming the key (grants would not fit the VM)", async (t) => {
    const { backend, fake } = await rig(t, { cfg: { machine_types: [{ name: "n2-standard-2", vcpus: 2, memory_mib: 16384 }] } });
    const { line } = await doctor(backend, fake);
    assert.equal(line("machine type n2-standard-2").ok, false);
    assert.match(line("machine type n2-standard-2").detail, /2 vCPUs \/ 16384 MiB, GCE's n2-standard-2 has 2 vCPUs \/ 8192 MiB.*backends\.gcp\.machine_types/);
  });

  it("a missing image fails naming backends.gcp.image; images.get for a named image, getFromFamily for a family", async (t) => {
    const { backend, fake } = await rig(t, { cfg: { image: "projects/debian-cloud/global/images/debian-12-bookworm-v20250101" } });
    fake.faults.images = ["projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64"];
    const { line } = await doctor(backend, fake);
    assert.equal(line("image").ok, false);
    assert.match(line("image").detail, /debian-12-bookworm-v20250101: no such image .*; fix backends\.gcp\.image$/);
    assert.equal(line("tdx_image").ok, true);
    assert.equal(fake.countCalls("images.get"), 1);
    assert.equal(fake.countCalls("images.getFromFamily"), 1);

    fake.faults.images = undefined;
    assert.equal((await doctor(backend, fake)).line("image").ok, true);
  });

  it("a tdx_image without the TDX_CAPABLE guest OS feature fails naming backends.gcp.tdx_image; an unparseable image is named too", async (t) => {
    const { backend, fake } = await rig(t, { cfg: { image: "debian-12" } });
    fake.faults.tdxCapableImages = [];
    const { line } = await doctor(backend, fake);
    assert.equal(line("tdx_image").ok, false);
    assert.match(line("tdx_image").detail, /ubuntu-2404-lts-amd64 -> \S+ lacks the TDX_CAPABLE guest OS feature.*fix backends\.gcp\.tdx_image/);
    assert.equal(line("image").ok, false);
    assert.match(line("image").detail, /"debian-12" is not an image GCE can boot from .*fix backends\.gcp\.image$/);
  });

  it("a 403 on a catalogue read fails that line only and does not make the backend decline grants", async (t) => {
    const { backend, fake } = await rig(t);
    fake.failNext("zones.get", 403, "forbidden", { message: "Required 'compute.zones.get' permission for 'projects/bridge-test-1/zones/us-central1-a'" });
    const { results } = await doctor(backend, fake);
    const bad = results.filter((r) => !r.ok);
    assert.equal(bad.length, 1, JSON.stringify(results));
    assert.match(bad[0]!.detail, /could not read it: .*compute\.zones\.get/);
    assert.equal(backend.canSatisfy(grant("after-403")).ok, true, "credentials not flagged as refused");
  });
});
