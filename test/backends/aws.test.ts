/**
 * AWS backend against the EC2 wire-protocol fake (test/fakes/ec2.ts) with the real EC2Client.
 * Run: node --import tsx --test test/backends/aws.test.ts
 *
 * Lifecycle cases go through GrantManager + Store + Fleet. A guest simulator plays the VM: once
 * the fake reports an instance running, it EXECUTES the instance's user data (the real boot
 * script: curl, sha256sum, the workload) with stand-ins for the serial console and poweroff,
 * then hands the console text to the fake as the guest powering itself off.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { gunzipSync } from "node:zlib";
import { after, before, describe, it } from "node:test";
import { EC2Client, RunInstancesCommand, type RunInstancesCommandInput } from "@aws-sdk/client-ec2";
import { ConfiguredRetryStrategy } from "@smithy/core/retry";
import { ec2ClientToken } from "../../src/backends/aws/adapter.js";
import { AwsBackend, type AwsBackendOptions } from "../../src/backends/aws.js";
import { CapacityError, CredentialError, InvalidRequestError, type BackendMetrics, type ManagedBackend } from "../../src/backends/backend.js";
import { exitMarker, HOST_KEY_MARKER, hostKeyMarker } from "../../src/backends/common/cloud-init.js";
import type { PollEvent } from "../../src/backends/common/batch-watcher.js";
import { OfferingCache } from "../../src/backends/offering-cache.js";
import { AwsConfig } from "../../src/config/schema.js";
import type { ComputeGrant, Envelope, GrantRequest, ProvisionedInstance } from "../../src/domain/index.js";
import { Fleet } from "../../src/fleet/fleet.js";
import { GrantManager } from "../../src/lifecycle/manager.js";
import { Store } from "../../src/store/store.js";
import { systemClock, type Clock } from "../../src/util/clock.js";
import { createLogger, type Logger } from "../../src/util/logger.js";
import { Reservations } from "../../src/fleet/reservations.js";
import { Ec2Fake, type Ec2FakeOptions, type FakeInstance } from "../fakes/ec2.js";
import { until } from "../helpers/http.js";
import { localBackend, loopbackImages, MS_ALMANAC } from "../helpers/local.js";
import { tempDir } from "../helpers/tmp.js";
import { ManualClock } from "../helpers/manual-clock.js";
import { testBridge } from "../helpers/lifecycle.js";

process.env.AWS_EC2_METADATA_DISABLED = "true";

const PROVIDER = "test-provider";
const AMI = "ami-0123456789abcdef0";
const BRIDGE_TAG = "compute-bridge:bridge-id";
const REQUEST_TAG = "compute-bridge:request-id";
const BANNER = "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n";
const never = new AbortController().signal;
const silent = createLogger("silent");

type T = { after: (fn: () => unknown) => void };

// ---- shared fixtures: an SSH banner server and an image server on 127.0.0.1 ----------------------

let sshPort = 0;
let sshServer: net.Server;
let imageServer: http.Server;
let imageBase = "";
const images = new Map<string, Buffer>();

function image(name: string, body: string): { url: string; sha256: string } {
  const buf = Buffer.from(body);
  images.set(`/${name}`, buf);
  return { url: `${imageBase}/${name}`, sha256: createHash("sha256").update(buf).digest("hex") };
}

before(async () => {
  sshServer = net.createServer((s) => {
    s.on("error", () => undefined);
    s.end(BANNER);
  });
  await new Promise<void>((r) => sshServer.listen(0, "127.0.0.1", r));
  sshPort = (sshServer.address() as net.AddressInfo).port;
  imageServer = http.createServer((req, res) => {
    const body = images.get(new URL(req.url ?? "/", "http://x").pathname);
    if (!body) res.writeHead(404).end();
    else res.writeHead(200, { "content-length": body.length }).end(body);
  });
  await new Promise<void>((r) => imageServer.listen(0, "127.0.0.1", r));
  imageBase = `http://127.0.0.1:${(imageServer.address() as net.AddressInfo).port}`;
});
after(async () => {
  await new Promise<void>((r) => sshServer.close(() => r()));
  imageServer.closeAllConnections();
  await new Promise<void>((r) => imageServer.close(() => r()));
});

// ---- helpers ----------------------------------------------------------------------------------

/** Virtual time for the backend; the fake can share it (`now: () => clock.now()`). */

async function startFake(t: T, opts: Ec2FakeOptions = {}): Promise<Ec2Fake> {
  const fake = await Ec2Fake.start({ seed: 7, ...opts });
  t.after(async () => {
    assert.deepEqual(fake.internalErrors, [], "the fake itself must not throw");
    await fake.close();
  });
  return fake;
}

/** The parsed [backends.aws] section, credentials in files (as an operator would configure). */
function awsConfig(t: T, fake: Ec2Fake, over: Record<string, unknown> = {}, creds = fake.credentials): AwsConfig {
  const dir = tempDir(t, "cb-aws-creds-");
  writeFileSync(path.join(dir, "akid"), `${creds.accessKeyId}\n`, { mode: 0o600 });
  writeFileSync(path.join(dir, "secret"), `${creds.secretAccessKey}\n`, { mode: 0o600 });
  return AwsConfig.parse({
    regions: {
      "us-east-1": { image_id: AMI, subnet_id: "subnet-0123abcd", security_group_ids: ["sg-0123abcd"], key_name: "ops" },
      "eu-west-1": { image_id: AMI, subnet_id: "subnet-0456abcd", security_group_ids: ["sg-0456abcd"] },
    },
    instance_types: ["m6i.xlarge", "m6i.large"],
    max_concurrent_instances: 1000,
    access_key_id_file: path.join(dir, "akid"),
    secret_access_key_file: path.join(dir, "secret"),
    endpoint: fake.endpoint,
    ssh_port: sshPort,
    poll_interval_seconds: 0.02,
    launch_timeout_seconds: 30,
    ready_timeout_seconds: 10,
    // Pacing is proven in aws-cloud-semantics.test.ts; here it must not slow hundreds of calls down.
    rate_limits: { describe: WIDE_RATE, mutate: WIDE_RATE, console: WIDE_RATE },
    ...over,
  });
}
const WIDE_RATE = { bucket: 10_000, refill_per_second: 10_000 };

function makeBackend(
  t: T,
  cfg: AwsConfig,
  ctx: { clock?: Clock; unavailable?: OfferingCache; log?: Logger; metrics?: BackendMetrics } = {},
  opts: AwsBackendOptions = {},
): AwsBackend {
  const clock = ctx.clock ?? systemClock;
  const b = new AwsBackend(
    cfg,
    { providerId: PROVIDER, stateDir: "/nonexistent", configDir: "/", log: ctx.log ?? silent, clock, almanac: MS_ALMANAC, unavailable: ctx.unavailable ?? new OfferingCache(60_000, clock), ...(ctx.metrics ? { metrics: ctx.metrics } : {}) },
    { readyPollIntervalMs: 10, sshProbeIntervalMs: 10, consoleGraceMs: 2000, ...opts },
  );
  t.after(() => b.close());
  return b;
}

/** Records what a backend reports for /metrics. */
function recorder() {
  const calls: { op: string; code: string }[] = [];
  const retries: string[] = [];
  const throttles: string[] = [];
  const orphans: string[] = [];
  const metrics: BackendMetrics = {
    apiCall: (_b, op, code) => void calls.push({ op, code }),
    retry: (_b, op) => void retries.push(op),
    throttled: (_b, op) => void throttles.push(op),
    sshSession: () => undefined,
    orphanSwept: (_b, kind) => void orphans.push(kind),
  };
  return { metrics, calls, retries, throttles, orphans };
}

/** Retry fast: the throttling backoff of the default strategy is ~1 s per retry. */
const fastRetry = () => new ConfiguredRetryStrategy(6, () => 2);

function grant(id: string, over: Partial<ComputeGrant> = {}): ComputeGrant {
  return { request_id: id, region: "us-east-1", tdx_required: false, cpu_millicores: 1500, ram_mib: 2048, valid_to: Date.now() + 120_000, ...over };
}

function rawClient(t: T, fake: Ec2Fake, region = "us-east-1"): EC2Client {
  const c = new EC2Client({ region, endpoint: fake.endpoint, credentials: fake.credentials });
  t.after(() => c.destroy());
  return c;
}

function launchInput(tags: Record<string, string>, over: Partial<RunInstancesCommandInput> = {}): RunInstancesCommandInput {
  return {
    ImageId: AMI,
    InstanceType: "m6i.large",
    MinCount: 1,
    MaxCount: 1,
    InstanceInitiatedShutdownBehavior: "terminate",
    TagSpecifications: [{ ResourceType: "instance", Tags: Object.entries(tags).map(([Key, Value]) => ({ Key, Value })) }],
    ...over,
  };
}

function instanceFor(i: FakeInstance, requestId: string): ProvisionedInstance {
  return {
    request_id: requestId,
    backend: "aws",
    instance_id: i.instanceId,
    region: i.region,
    host: "127.0.0.1",
    ssh_port: sshPort,
    ssh_user: "ec2-user",
    host_key_sha256: null,
    started_at: i.launchTime.toISOString(),
    cpu_millicores: 1000,
    ram_mib: 1024,
    details: {},
  };
}

/**
 * Plays the guest side. In "script" mode it executes each running instance's user data for real
 * (dash), with the serial console and poweroff replaced by files; in "marker" mode it powers the
 * guest off at once with the exit code `codeFor(request_id)`.
 */
class GuestSim {
  private readonly started = new Set<string>();
  private readonly timer: NodeJS.Timeout;
  readonly runs = new Map<string, { root: string; home: string }>();
  constructor(
    private readonly fake: Ec2Fake,
    private readonly dir: string,
    private readonly mode: { script: true } | { codeFor: (requestId: string) => number },
  ) {
    this.timer = setInterval(() => this.step(), 5);
  }
  stop(): void {
    clearInterval(this.timer);
  }
  private step(): void {
    for (const i of this.fake.instances) {
      if (i.state !== "running" || this.started.has(i.instanceId)) continue;
      this.started.add(i.instanceId);
      const rid = i.tags[REQUEST_TAG] ?? "";
      if ("codeFor" in this.mode) this.fake.guestPowerOff(i.instanceId, `${exitMarker(rid, this.mode.codeFor(rid))}\n`);
      else void this.boot(i);
    }
  }
  private async boot(i: FakeInstance): Promise<void> {
    const d = path.join(this.dir, i.instanceId);
    const root = path.join(d, "root");
    const home = path.join(d, "home");
    mkdirSync(root, { recursive: true });
    const consoleFile = path.join(d, "console");
    const poweroff = path.join(d, "poweroff");
    writeFileSync(poweroff, "#!/bin/sh\nexit 0\n");
    chmodSync(poweroff, 0o755);
    writeFileSync(path.join(d, "user-data"), i.userData ?? "", { mode: 0o700 });
    this.runs.set(i.instanceId, { root, home });
    await new Promise<void>((resolve) => {
      const child = spawn("/bin/sh", [path.join(d, "user-data")], {
        cwd: d,
        stdio: "ignore",
        env: { CB_CONSOLE: consoleFile, CB_POWEROFF: poweroff, CB_ROOT: root, CB_HOME: home, PATH: process.env.PATH ?? "/usr/bin:/bin" },
      });
      child.on("close", () => resolve());
      child.on("error", () => resolve());
    });
    // The fake already wrote the script's host key report when the instance booted (with a fingerprint
    // per instance); this run's own report, from whatever host key this machine has, is left out.
    const text = (existsSync(consoleFile) ? readFileSync(consoleFile, "utf8") : "")
      .split(/(?<=\n)/)
      .filter((l) => !l.startsWith(`${HOST_KEY_MARKER} `))
      .join("");
    this.fake.guestPowerOff(i.instanceId, `[   3.100] cloud-init[801]: boot\n${text}reboot: Power down\n`);
  }
}

/** GrantManager + Store + Fleet as src/daemon.ts wires them. */
function bridge(t: T, stateDir: string, backends: ManagedBackend[], unavailable: OfferingCache) {
  return testBridge(t, { stateDir, fleet: new Fleet(backends, unavailable), almanac: MS_ALMANAC, providerId: PROVIDER, log: silent, retryBaseMs: 10, retryCapMs: 100 });
}

/**
 * Settles `p`, a provision whose backend sleeps on `clock`: each time the backend is asleep after a
 * console read the clock has not yet been moved past, the clock moves `stepMs` (once SSH answered,
 * the host key wait is the only sleeper on it). Returns the result and how often the clock moved.
 */
async function driveConsoleWait<T>(clock: ManualClock, fake: Ec2Fake, p: Promise<T>, stepMs: number): Promise<{ value: T; advances: number }> {
  let settled = false;
  const done = p.finally(() => void (settled = true));
  done.catch(() => undefined);
  let seen = 0;
  let advances = 0;
  for (;;) {
    await until(() => settled || (fake.countCalls("GetConsoleOutput") > seen && clock.pending > 0), "the provision to settle or to sleep after a console read");
    if (settled) return { value: await done, advances };
    seen = fake.countCalls("GetConsoleOutput");
    clock.advance(stepMs);
    advances++;
  }
}

/** The GetConsoleOutput calls the fake saw: Latest flag, error code, virtual time. */
function consoleCalls(fake: Ec2Fake): { latest: string | undefined; code: string | undefined; at: number }[] {
  return fake.calls.filter((c) => c.action === "GetConsoleOutput").map((c) => ({ latest: c.params.Latest, code: c.code, at: c.at }));
}

/** Log lines as JSON objects, for asserting on what the backend logged. */
function capturedLog(): { log: Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  return { log: createLogger("debug", { write: (s: string) => void lines.push(JSON.parse(s) as Record<string, unknown>) }), lines };
}

async function runGrant(m: GrantManager, store: Store, req: GrantRequest) {
  const r = await m.submit(req);
  assert.equal(r.status, "created", JSON.stringify(r));
  await m.settled(req.grant.request_id);
  return { rec: (await store.get(req.grant.request_id))!, log: (await store.computeLog(req.grant.request_id))! };
}

// ---- tests ------------------------------------------------------------------------------------

describe("aws backend: declared capabilities and routing (no SDK, no I/O)", () => {
  it("capabilities, canSatisfy, the smallest fitting type and the unavailable cache", async (t) => {
    const fake = await startFake(t);
    const unavailable = new OfferingCache(60_000, systemClock);
    const b = makeBackend(t, awsConfig(t, fake, { max_concurrent_instances: 3 }), { unavailable });
    assert.deepEqual(b.capabilities(), { regions: ["eu-west-1", "us-east-1"], tdx_capable: false, max_cpu_millicores: 3 * 4000, max_ram_mib: 3 * 16384 });
    assert.deepEqual(b.canSatisfy(grant("a")), { ok: true, shape: "m6i.large" }, "the smallest fitting type prices it");
    assert.equal((b.canSatisfy(grant("a", { tdx_required: true })) as { code: string }).code, "tdx_not_supported");
    assert.equal((b.canSatisfy(grant("a", { region: "ap-south-1" })) as { code: string }).code, "region_not_served");
    assert.equal((b.canSatisfy(grant("a", { cpu_millicores: 4001 })) as { code: string }).code, "too_large");
    assert.equal((b.canSatisfy(grant("a", { ram_mib: 16385 })) as { code: string }).code, "too_large");
    unavailable.markUnavailable("aws", "us-east-1", "m6i.large");
    assert.deepEqual(b.canSatisfy(grant("a")), { ok: true, shape: "m6i.xlarge" }, "m6i.xlarge still fits");
    unavailable.markUnavailable("aws", "us-east-1", "m6i.xlarge");
    assert.equal((b.canSatisfy(grant("a")) as { code: string }).code, "offering_unavailable");
    assert.deepEqual(b.canSatisfy(grant("a", { region: "eu-west-1" })), { ok: true, shape: "m6i.large" }, "per region");
    assert.equal(b.stats().sdk_loaded, false, "nothing so far needed the SDK");
    assert.equal(fake.countCalls(), 0);
    // Offline uses (check-config, card) never touch the secrets: a missing key file surfaces on first use.
    const offline = makeBackend(t, awsConfig(t, fake, { access_key_id_file: "/nonexistent/akid", secret_access_key_file: "/nonexistent/secret" }));
    assert.equal(offline.canSatisfy(grant("a")).ok, true);
    const [c1] = await offline.check();
    assert.equal(c1?.ok, false);
    assert.match(c1?.detail ?? "", /backends\.aws\.access_key_id_file: cannot read \/nonexistent\/akid: ENOENT/);
    await assert.rejects(offline.provision(grant("a"), { image: { url: "http://127.0.0.1:9/x", sha256: "a".repeat(64), format: "bundle" } }, never), CredentialError);
    assert.equal(fake.countCalls(), 0);
    assert.deepEqual(b.status(), { active: 0, max_concurrent_instances: 3 }, "the card's status: stable values only");
    assert.equal(fake.countCalls(), 0);
    assert.throws(() => makeBackend(t, awsConfig(t, fake, { instance_types: ["m6i.large", "zz9.huge"] })), /zz9\.huge.*not in compute-bridge's instance type table/);
  });
});

describe("aws backend with the EC2 fake", () => {
  it("happy path through GrantManager: ClientToken, tags, shutdown behaviour, the boot script really runs, ComputeLog has the exit code", async (t) => {
    const dir = tempDir(t);
    const fake = await startFake(t);
    const unavailable = new OfferingCache(60_000, systemClock);
    const aws = makeBackend(t, awsConfig(t, fake), { unavailable });
    const guest = new GuestSim(fake, dir, { script: true });
    t.after(() => guest.stop());
    const { store, manager } = await bridge(t, path.join(dir, "state"), [aws], unavailable);

    const img = image("exit3", '#!/bin/sh\n[ "$GREETING" = hello ] || exit 99\nexit 3\n');
    const { rec, log } = await runGrant(manager, store, { grant: grant("happy-1"), envelope: { image: { ...img, format: "bundle" }, env: { GREETING: "hello" } } });
    assert.equal(rec.state, "completed", JSON.stringify(rec));
    assert.equal(log.exit_reason, "exited");
    assert.equal(log.exit_code, 3);
    assert.equal(log.backend, "aws");
    assert.equal(log.partial, false);

    const [inst] = fake.instances;
    assert.ok(inst);
    assert.equal(fake.createdCount, 1);
    assert.equal(log.instance_id, inst.instanceId);
    assert.equal(inst.instanceType, "m6i.large", "the smallest configured type that fits");
    assert.equal(inst.state, "terminated");
    assert.equal(inst.shutdownBehavior, "terminate");
    assert.deepEqual(inst.securityGroupIds, ["sg-0123abcd"]);
    assert.equal(inst.subnetId, "subnet-0123abcd");
    assert.equal(inst.keyName, "ops");
    assert.equal(inst.tags[BRIDGE_TAG], PROVIDER);
    assert.equal(inst.tags[REQUEST_TAG], "happy-1");
    assert.equal(inst.clientToken, ec2ClientToken(PROVIDER, "happy-1", "m6i.large"));
    assert.deepEqual(
      Object.keys(inst.launchParams).filter((k) => k.endsWith(".ResourceType")).map((k) => inst.launchParams[k]),
      ["instance"],
      "tags on the instance only: CreateTags in the documented IAM policy covers instance/* at launch",
    );
    assert.equal(inst.launchParams["MetadataOptions.HttpTokens"], "required", "IMDSv2 only");
    assert.match(inst.clientToken ?? "", /^[0-9a-f]{64}$/);
    assert.equal(fake.createsByToken.get(inst.clientToken!), 1);
    // The per-grant key the manager generated reached the login user's authorized_keys.
    assert.ok(rec.public_key && inst.userData?.includes(rec.public_key));
    const home = guest.runs.get(inst.instanceId)!.home;
    assert.equal(readFileSync(path.join(home, ".ssh/authorized_keys"), "utf8"), `${rec.public_key}\n`);
    assert.equal(rec.instance?.host, "127.0.0.1");
    assert.equal(rec.instance?.ssh_port, sshPort);
    assert.equal(rec.instance?.ssh_user, "ec2-user");
    // The guest's host key, as its boot script reported it on the live console, pinned in the grant.
    assert.equal(rec.instance?.host_key_sha256, fake.hostKeyFingerprint(inst.instanceId));
    assert.match(rec.instance?.host_key_sha256 ?? "", /^SHA256:[A-Za-z0-9+/]{43}$/);
    assert.equal(fake.countCalls("RunInstances"), 1);
    assert.deepEqual(consoleCalls(fake).map((c) => c.latest), ["true", undefined], "one live read for the host key at provision, one buffered read for the exit code");
  });

  it("hash mismatch: the guest runs nothing, the grant fails with error kind image_verification", async (t) => {
    const dir = tempDir(t);
    const fake = await startFake(t);
    const unavailable = new OfferingCache(60_000, systemClock);
    const aws = makeBackend(t, awsConfig(t, fake), { unavailable });
    const guest = new GuestSim(fake, dir, { script: true });
    t.after(() => guest.stop());
    const { store, manager } = await bridge(t, path.join(dir, "state"), [aws], unavailable);
    const canary = path.join(dir, "canary");
    const img = image("evil", `#!/bin/sh\ntouch ${canary}\n`);
    const { rec, log } = await runGrant(manager, store, { grant: grant("bad-hash-1"), envelope: { image: { url: img.url, sha256: "0".repeat(64), format: "bundle" } } });
    assert.equal(rec.state, "failed");
    assert.equal(rec.error_kind, "image_verification");
    assert.match(rec.error_message ?? "", /sha256 mismatch/);
    assert.equal(log.exit_reason, "failed");
    assert.equal(log.error_kind, "image_verification");
    assert.equal(log.exit_code, null);
    assert.equal(existsSync(canary), false);
    assert.equal(fake.instances[0]?.state, "terminated");
  });

  it("InsufficientInstanceCapacity: the next fitting type is tried on AWS first (own ClientToken each); only when every type fails does the grant fail over, with the offering recorded", async (t) => {
    const dir = tempDir(t);
    const fake = await startFake(t, { faults: { capacity: new Set(["m6i.large"]) } });
    const unavailable = new OfferingCache(60_000, systemClock);
    const aws = makeBackend(t, awsConfig(t, fake), { unavailable });
    const local = localBackend(path.join(dir, "local-state"), { region: "us-east-1" }, loopbackImages());
    const guest = new GuestSim(fake, dir, { script: true });
    t.after(() => guest.stop());
    const { store, manager, fleet } = await bridge(t, path.join(dir, "state"), [aws, local], unavailable);

    const img = image("exit5", "#!/bin/sh\nexit 5\n");
    const env: Envelope = { image: { ...img, format: "bundle" } };
    const first = await runGrant(manager, store, { grant: grant("cap-1"), envelope: env });
    assert.equal(first.rec.state, "completed", JSON.stringify(first.rec));
    assert.equal(first.rec.backend, "aws", "the second fitting type ran it, no failover");
    assert.equal(first.log.exit_code, 5);
    assert.deepEqual(first.rec.attempts, []);
    assert.equal(fleet.unavailable.isUnavailable("aws", "us-east-1", "m6i.large"), true);
    const runs = fake.calls.filter((c) => c.action === "RunInstances");
    assert.deepEqual(runs.map((c) => [c.params.InstanceType, c.code]), [["m6i.large", "InsufficientInstanceCapacity"], ["m6i.xlarge", undefined]], "a capacity error is not retried by the SDK");
    assert.deepEqual(runs.map((c) => c.params.ClientToken), [ec2ClientToken(PROVIDER, "cap-1", "m6i.large"), ec2ClientToken(PROVIDER, "cap-1", "m6i.xlarge")]);
    assert.equal(fake.instances[0]?.instanceType, "m6i.xlarge");

    // No type has capacity: the cached one is skipped, the other fails, the grant fails over to local.
    fake.faults.capacity = new Set(["m6i.large", "m6i.xlarge"]);
    fake.resetCalls();
    const second = await runGrant(manager, store, { grant: grant("cap-2"), envelope: env });
    assert.equal(second.rec.state, "completed", JSON.stringify(second.rec));
    assert.equal(second.rec.backend, "local");
    assert.equal(second.log.exit_code, 5);
    assert.equal(second.rec.attempts.length, 1);
    assert.equal(second.rec.attempts[0]?.backend, "aws");
    assert.equal(second.rec.attempts[0]?.error_kind, "capacity");
    assert.match(second.rec.attempts[0]?.message ?? "", /m6i\.large: no capacity reported recently.*m6i\.xlarge.*InsufficientInstanceCapacity/);
    assert.deepEqual(fake.calls.filter((c) => c.action === "RunInstances").map((c) => c.params.InstanceType), ["m6i.xlarge"]);
    assert.equal(fleet.unavailable.isUnavailable("aws", "us-east-1", "m6i.xlarge"), true);
    assert.equal(fake.createdCount, 1);
  });

  it("restart mid-provision: the resumed grant adopts the same instance, never a second one", async (t) => {
    const dir = tempDir(t);
    const stateDir = path.join(dir, "state");
    // Instances stay pending until the test boots them.
    const fake = await startFake(t, { faults: { bootDelayMs: 3_600_000 } });
    const guest = new GuestSim(fake, dir, { script: true });
    t.after(() => guest.stop());
    const img = image("exit0", "#!/bin/sh\nexit 0\n");
    const req: GrantRequest = { grant: grant("restart-1"), envelope: { image: { ...img, format: "bundle" } } };

    // First life: the instance is launched, then the daemon goes away mid-provision.
    const u1 = new OfferingCache(60_000, systemClock);
    const aws1 = makeBackend(t, awsConfig(t, fake), { unavailable: u1 });
    const life1 = await bridge(t, stateDir, [aws1], u1);
    assert.equal((await life1.manager.submit(req)).status, "created");
    await until(() => fake.createdCount === 1 && aws1.stats().booting === 1, "the instance to be launched and waited for");
    await life1.close();
    await aws1.close();
    const first = fake.instances[0]!;
    assert.equal(first.state, "pending");

    // Second life: resume, adopt, finish.
    const u2 = new OfferingCache(60_000, systemClock);
    const aws2 = makeBackend(t, awsConfig(t, fake), { unavailable: u2 });
    const life2 = await bridge(t, stateDir, [aws2], u2);
    assert.equal((await life2.store.get("restart-1"))?.state, "provisioning");
    assert.equal(await life2.manager.resumeAll(), 1);
    await until(() => aws2.stats().booting === 1, "the resumed provision to wait for boot");
    fake.bootAll();
    await life2.manager.settled("restart-1");
    const rec = (await life2.store.get("restart-1"))!;
    assert.equal(rec.state, "completed", JSON.stringify(rec));
    assert.equal((await life2.store.computeLog("restart-1"))?.exit_code, 0);
    assert.equal(rec.instance?.instance_id, first.instanceId);
    assert.equal(fake.createdCount, 1);
    assert.equal(fake.createsByToken.get(ec2ClientToken(PROVIDER, "restart-1", "m6i.large")), 1);
    assert.equal(fake.countCalls("RunInstances"), 1, "the second life adopted by tag without launching");
    assert.deepEqual([...fake.duplicateTagValues(REQUEST_TAG)], []);
  });

  it("a RunInstances reply lost on every attempt is healed by the ClientToken; a token reused with other parameters adopts the earlier launch", async (t) => {
    const fake = await startFake(t, { faults: { bootDelayMs: 0 } });
    // The instance adopted below was launched without the bridge's boot script, so no host key report ever
    // comes: the console is read once (host_key_timeout_seconds 0) instead of for two minutes.
    const aws = makeBackend(t, awsConfig(t, fake, { host_key_timeout_seconds: 0 }), {}, { retryStrategy: () => new ConfiguredRetryStrategy(3, () => 2), maxAttempts: 3 });
    const img = image("lost", "#!/bin/sh\nexit 0\n");
    const env: Envelope = { image: { ...img, format: "bundle" }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3 k@x" };

    // The launch commits, then every reply is lost: the SDK gives up, the manager would retry provision.
    fake.failNext("RunInstances", "InternalError", 500, { afterCommit: true, times: 3 });
    await assert.rejects(aws.provision(grant("lost-1"), env, never), (e: unknown) => (e as Error).name === "TransientError");
    assert.equal(fake.countCalls("RunInstances"), 3);
    assert.equal(fake.createdCount, 1);
    const inst = await aws.provision(grant("lost-1"), env, never);
    assert.equal(inst.instance_id, fake.instances[0]?.instanceId);
    assert.equal(fake.createdCount, 1);
    assert.equal(fake.createsByToken.get(ec2ClientToken(PROVIDER, "lost-1", "m6i.large")), 1);

    // Same token, different parameters and no tags visible (as if the tags had not propagated yet).
    const c = rawClient(t, fake);
    const prior = await c.send(new RunInstancesCommand(launchInput({ unrelated: "x" }, { ClientToken: ec2ClientToken(PROVIDER, "tok-2", "m6i.large"), InstanceType: "m6i.xlarge" })));
    const adopted = await aws.provision(grant("tok-2"), env, never);
    assert.equal(adopted.instance_id, prior.Instances?.[0]?.InstanceId);
    assert.equal(adopted.host_key_sha256, null, "no boot script, no report");
    assert.equal(inst.host_key_sha256, fake.hostKeyFingerprint(inst.instance_id));
    assert.equal(fake.createdCount, 2);
    assert.ok(fake.calls.some((x) => x.action === "RunInstances" && x.code === "IdempotentParameterMismatch"));
    await aws.terminate(inst);
    await aws.terminate(adopted);
  });

  it("40 grants provisioning at once (e.g. resumed after a restart) ask EC2 once per region whether their instances exist", async (t) => {
    const fake = await startFake(t);
    const aws = makeBackend(t, awsConfig(t, fake));
    const img = image("many", "#!/bin/sh\nexit 0\n");
    const env: Envelope = { image: { ...img, format: "bundle" }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3 k@x" };
    await aws.provision(grant("warm-1"), env, never); // SDK loaded, clients up
    fake.resetCalls();
    const grants = Array.from({ length: 40 }, (_, i) => grant(`many-${i}`, { region: i % 2 ? "eu-west-1" : "us-east-1" }));
    const insts = await Promise.all(grants.map((g) => aws.provision(g, env, never)));
    const lookups = fake.calls.filter((c) => c.action === "DescribeInstances" && c.params["Filter.1.Name"] === `tag:${REQUEST_TAG}`);
    assert.equal(lookups.length, 2, "one adopt check per region");
    assert.equal(fake.countCalls("RunInstances"), 40);
    assert.equal(new Set(insts.map((i) => i.instance_id)).size, 40);
    // The same 40 again (a restart): all adopted, nothing launched.
    fake.resetCalls();
    const again = await Promise.all(grants.map((g) => aws.provision(g, env, never)));
    assert.deepEqual(again.map((i) => i.instance_id), insts.map((i) => i.instance_id));
    assert.equal(fake.countCalls("RunInstances"), 0);
    assert.equal(fake.calls.filter((c) => c.params["Filter.1.Name"] === `tag:${REQUEST_TAG}`).length, 2);
    await Promise.all(insts.map((i) => aws.terminate(i)));
    assert.equal(fake.createdCount, 41);
  });

  it("throttling storm (30% RequestLimitExceeded + 5% InternalError on every call): every grant still ends right, once", async (t) => {
    const dir = tempDir(t);
    const fake = await startFake(t, { faults: { throttleRate: 0.3, serverErrorRate: 0.05 } });
    const unavailable = new OfferingCache(60_000, systemClock);
    const rec = recorder();
    const aws = makeBackend(t, awsConfig(t, fake), { unavailable, metrics: rec.metrics }, { retryStrategy: fastRetry, maxAttempts: 6, consoleGraceMs: 200 });
    const codes = new Map<string, number>();
    const guest = new GuestSim(fake, dir, { codeFor: (rid) => codes.get(rid) ?? 255 });
    t.after(() => guest.stop());
    const { store, manager } = await bridge(t, path.join(dir, "state"), [aws], unavailable);
    // One launch whose reply is lost after it committed, on top of the storm.
    fake.failNext("RunInstances", "InternalError", 500, { afterCommit: true });

    const img = image("storm", "#!/bin/sh\nexit 0\n");
    const ids = Array.from({ length: 32 }, (_, i) => `storm-${i}`);
    ids.forEach((id, i) => codes.set(id, i * 7));
    for (const id of ids) assert.equal((await manager.submit({ grant: grant(id), envelope: { image: { ...img, format: "bundle" } } })).status, "created");
    await Promise.all(ids.map((id) => manager.settled(id)));

    for (const id of ids) {
      const rec = (await store.get(id))!;
      assert.equal(rec.state, "completed", `${id}: ${JSON.stringify(rec.outcome)} ${rec.error_message}`);
      assert.equal((await store.computeLog(id))?.exit_code, codes.get(id));
    }
    assert.equal(fake.createdCount, ids.length, "exactly one instance per grant");
    assert.deepEqual([...fake.duplicateTagValues(REQUEST_TAG)], []);
    assert.ok(fake.instances.every((i) => i.state === "terminated"), "nothing left running");
    const throttled = fake.calls.filter((c) => c.code === "RequestLimitExceeded").length;
    const errors = fake.calls.filter((c) => c.code === "InternalError").length;
    assert.ok(throttled > 30 && errors > 0, `the storm happened (${throttled} throttled, ${errors} 5xx of ${fake.calls.length} calls)`);
    // /metrics saw every attempt the fake saw, with its code, and the retries and throttles.
    assert.equal(rec.calls.length, fake.calls.length);
    assert.equal(rec.calls.filter((c) => c.code === "RequestLimitExceeded").length, throttled);
    assert.equal(rec.throttles.length, throttled);
    assert.equal(rec.retries.length, fake.calls.filter((c) => (c.attempt ?? 1) > 1).length);
    assert.ok(rec.calls.some((c) => c.op === "RunInstances" && c.code === "ok"));
  });

  it("orphan sweep: terminates this bridge's untracked instances older than the grace, logs each, leaves the rest; throttled to reconcile_interval_seconds", async (t) => {
    const clock = new ManualClock();
    const fake = await startFake(t, { now: () => clock.now() });
    const lines: Record<string, unknown>[] = [];
    const log = createLogger("debug", { write: (s: string) => void lines.push(JSON.parse(s) as Record<string, unknown>) });
    const rec = recorder();
    const aws = makeBackend(t, awsConfig(t, fake, { orphan_grace_seconds: 600, reconcile_interval_seconds: 300 }), { clock, log, metrics: rec.metrics });
    const east = rawClient(t, fake);
    const west = rawClient(t, fake, "eu-west-1");
    const launch = async (c: EC2Client, tags: Record<string, string>) => (await c.send(new RunInstancesCommand(launchInput(tags)))).Instances![0]!.InstanceId!;

    const orphanOld = await launch(east, { [BRIDGE_TAG]: PROVIDER, [REQUEST_TAG]: "gone-1" });
    const orphanWest = await launch(west, { [BRIDGE_TAG]: PROVIDER, [REQUEST_TAG]: "gone-3" });
    const liveOne = await launch(east, { [BRIDGE_TAG]: PROVIDER, [REQUEST_TAG]: "live-1" });
    const otherBridge = await launch(east, { [BRIDGE_TAG]: "someone-else", [REQUEST_TAG]: "gone-4" });
    const untagged = await launch(east, { team: "ml" });
    clock.advance(601_000);
    const orphanYoung = await launch(east, { [BRIDGE_TAG]: PROVIDER, [REQUEST_TAG]: "gone-2" });

    await aws.reconcile(new Set(["live-1"]));
    const state = (id: string) => fake.getInstance(id)?.state;
    assert.equal(state(orphanOld), "terminated");
    assert.equal(state(orphanWest), "terminated", "every configured region is swept");
    assert.equal(state(liveOne), "running", "a live grant's instance is left to the grant");
    assert.equal(state(orphanYoung), "running", "younger than orphan_grace_seconds");
    assert.equal(state(otherBridge), "running", "another bridge's instance is not ours");
    assert.equal(state(untagged), "running");
    const swept = lines.filter((l) => l.msg === "deleting an orphaned resource (this bridge's, no live grant owns it)");
    assert.deepEqual(swept.map((l) => [l.id, l.request_id, l.level]).sort(), [[orphanOld, "gone-1", "warn"], [orphanWest, "gone-3", "warn"]].sort());
    assert.equal(aws.status().active, 1, "the live grant's instance counts toward max_concurrent_instances");
    assert.deepEqual(rec.orphans, ["instance", "instance"]);

    // Called again a minute later (as the daemon does): skipped, no API calls.
    fake.resetCalls();
    clock.advance(60_000);
    await aws.reconcile(new Set(["live-1"]));
    assert.equal(fake.countCalls(), 0);
    // After reconcile_interval_seconds, and once the young one has aged past the grace too.
    clock.advance(600_000);
    await aws.reconcile(new Set(["live-1"]));
    assert.equal(state(orphanYoung), "terminated");
    assert.equal(state(liveOne), "running");
  });

  it("orphan sweep never takes an instance this backend holds, even one whose grant is newer than the store's snapshot", async (t) => {
    const fake = await startFake(t, { faults: { bootDelayMs: 0 } });
    const aws = makeBackend(t, awsConfig(t, fake, { orphan_grace_seconds: 0 }));
    const img = image("held", "#!/bin/sh\nexit 0\n");
    const inst = await aws.provision(grant("held-1"), { image: { ...img, format: "bundle" }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3 k@x" }, never);
    const stray = (await rawClient(t, fake).send(new RunInstancesCommand(launchInput({ [BRIDGE_TAG]: PROVIDER, [REQUEST_TAG]: "gone-1" })))).Instances![0]!.InstanceId!;
    await aws.reconcile(new Set()); // the snapshot predates held-1
    assert.equal(fake.getInstance(inst.instance_id)?.state, "running", "held by the backend: not an orphan");
    assert.equal(fake.getInstance(stray)?.state, "terminated", "grace 0: a real orphan goes at once");
    await aws.terminate(inst);
  });

  it("500 watched instances in 2 regions: one DescribeInstances per region per interval, exit codes from the console markers", async (t) => {
    const clock = new ManualClock();
    // shutting-down lasts a (virtual) minute, as on EC2, so exits are seen by the same batched call.
    const fake = await startFake(t, { now: () => clock.now(), faults: { terminateDelayMs: 60_000 } });
    const polls: PollEvent[] = [];
    const waiters: { n: number; resolve: () => void }[] = [];
    const onPoll = (kind: "launch" | "exit", e: PollEvent) => {
      if (kind !== "exit") return;
      polls.push(e);
      for (const w of waiters.filter((w) => polls.length >= w.n)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve();
      }
    };
    const polled = (n: number) => (polls.length >= n ? Promise.resolve() : new Promise<void>((resolve) => waiters.push({ n, resolve })));
    const POLL = 10_000;
    const aws = makeBackend(t, awsConfig(t, fake), { clock }, { pollIntervalMs: POLL, onPoll });

    const instances: ProvisionedInstance[] = [];
    for (const region of ["us-east-1", "eu-west-1"]) {
      const c = rawClient(t, fake, region);
      for (const n of [100, 100, 50]) await c.send(new RunInstancesCommand(launchInput({ [BRIDGE_TAG]: PROVIDER }, { MinCount: n, MaxCount: n })));
    }
    fake.bootAll();
    fake.instances.forEach((i, k) => instances.push(instanceFor(i, `w-${k}`)));
    assert.equal(instances.length, 500);
    // Some noise the sweep returns too: another bridge's instances are not ours to watch.
    await rawClient(t, fake).send(new RunInstancesCommand(launchInput({ [BRIDGE_TAG]: "someone-else" }, { MinCount: 20, MaxCount: 20 })));
    fake.resetCalls();

    const validTo = new Date(clock.now() + 3_600_000);
    // Each watch gets its own signal, as the manager gives it.
    const results = instances.map((i) => aws.watchUntilExit(i, validTo, new AbortController().signal));
    await polled(2);
    assert.equal(aws.stats().watched, 500);
    assert.equal(fake.countCalls("DescribeInstances"), 2, "the first poll: one call per region");
    const INTERVALS = 5;
    for (let k = 1; k <= INTERVALS; k++) {
      clock.advance(POLL);
      await polled(2 + 2 * k);
    }
    const describes = fake.countCalls("DescribeInstances");
    assert.equal(describes, 2 * (INTERVALS + 1), `O(regions) per interval: ${describes} calls for 500 instances over ${INTERVALS + 1} polls (one call per instance would be ${500 * (INTERVALS + 1)})`);
    assert.equal(fake.countCalls(), describes, "and nothing else while they run");

    // Every guest finishes with its own exit code; one more interval reports them all.
    instances.forEach((inst, k) => fake.guestPowerOff(inst.instance_id, `${exitMarker(inst.request_id, k % 256)}\n`));
    fake.resetCalls();
    clock.advance(POLL);
    const obs = await Promise.all(results);
    obs.forEach((o, k) => {
      assert.equal(o.kind, "exited");
      assert.equal(o.exit_code, k % 256);
      assert.equal(o.failure, null);
    });
    assert.equal(fake.countCalls("DescribeInstances"), 2, "the exits were seen by the same two batched calls");
    assert.equal(fake.countCalls("GetConsoleOutput"), 500, "one console read per exit");
    assert.equal(aws.stats().watched, 0);
  });

  it("valid_to is enforced: a workload still running at valid_to is reported expired; terminate is idempotent and finds placeholders by tag", async (t) => {
    const fake = await startFake(t);
    const aws = makeBackend(t, awsConfig(t, fake));
    const img = image("forever", "#!/bin/sh\nsleep 600\n");
    const env: Envelope = { image: { ...img, format: "bundle" }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3 k@x" };
    const g = grant("exp-1", { valid_to: Date.now() + 60_000 });
    const inst = await aws.provision(g, env, never);
    assert.equal(aws.status().active, 1);
    const obs = await aws.watchUntilExit(inst, new Date(Date.now() + 150), never);
    assert.equal(obs.kind, "expired");
    assert.equal(fake.getInstance(inst.instance_id)?.state, "running");

    await aws.terminate(inst);
    assert.equal(fake.getInstance(inst.instance_id)?.state, "terminated");
    await aws.terminate(inst); // already gone: fine
    assert.equal(aws.status().active, 0);

    // A placeholder (no instance id) finds what a create left behind by its request tag.
    const g2 = grant("exp-2");
    const inst2 = await aws.provision(g2, env, never);
    await aws.terminate({ ...inst2, instance_id: "" });
    assert.equal(fake.getInstance(inst2.instance_id)?.state, "terminated");
    // An id EC2 does not know, launched long ago (a NotFound soon after launch is asked again: aws-cloud-semantics.test.ts).
    await aws.terminate({ ...inst2, instance_id: "i-0123456789abcdef0", started_at: new Date(Date.now() - 3_600_000).toISOString() });

    // Aborting a watch rejects with an AbortError and leaves no waiter behind.
    const ctl = new AbortController();
    const inst3 = await aws.provision(grant("exp-3"), env, never);
    const w = aws.watchUntilExit(inst3, new Date(Date.now() + 60_000), ctl.signal);
    setImmediate(() => ctl.abort());
    await assert.rejects(w, (e: unknown) => (e as Error).name === "AbortError");
    await until(() => aws.stats().watched === 0, "the aborted waiter to be removed");
    await aws.terminate(inst3);
  });

  it("a region whose DescribeInstances keeps failing is retried every interval, counted, and shown in the card status until it recovers", async (t) => {
    const fake = await startFake(t);
    const aws = makeBackend(t, awsConfig(t, fake), {}, { retryStrategy: () => new ConfiguredRetryStrategy(2, () => 1), maxAttempts: 2 });
    const img = image("ok", "#!/bin/sh\nexit 0\n");
    const inst = await aws.provision(grant("flaky-1"), { image: { ...img, format: "bundle" }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3 k@x" }, never);
    fake.faults.rateFaultActions = ["DescribeInstances"];
    fake.faults.throttleRate = 1;
    const watch = aws.watchUntilExit(inst, new Date(Date.now() + 60_000), new AbortController().signal);
    await until(() => aws.stats().poll_errors >= 3, "several failed polls");
    assert.deepEqual(aws.status().failing_scopes, ["us-east-1"]);
    fake.clearFaults();
    fake.guestPowerOff(inst.instance_id, `${exitMarker("flaky-1", 0, 1.25)}\n`);
    const obs = await watch;
    assert.equal(obs.exit_code, 0);
    assert.equal(obs.cpu_seconds, 1.25, "the workload's CPU time from the marker");
    assert.equal(aws.status().failing_scopes, undefined);
    await aws.terminate(inst);
  });

  it("refuses grants it cannot run: disk images, oversized user data, max_concurrent_instances", async (t) => {
    const fake = await startFake(t);
    const aws = makeBackend(t, awsConfig(t, fake, { max_concurrent_instances: 1 }));
    const img = image("x", "#!/bin/sh\nexit 0\n");
    await assert.rejects(aws.provision(grant("disk-1"), { image: { ...img, format: "disk" } }, never), InvalidRequestError);
    const random: Record<string, string> = {};
    for (let i = 0; i < 40; i++) random[`V${i}`] = randomBytes(750).toString("base64");
    await assert.rejects(aws.provision(grant("big-1"), { image: { ...img, format: "bundle" }, env: random }, never), /at most 16384/);
    assert.equal(fake.countCalls("RunInstances"), 0);
    // 60 KB of compressible env fits once gzip-compressed (cloud-init inflates gzip user data).
    const inst = await aws.provision(grant("one-1"), { image: { ...img, format: "bundle" }, env: { BIG: "0123456789".repeat(6000) } }, never);
    const ud = Buffer.from(fake.getInstance(inst.instance_id)?.userDataBase64 ?? "", "base64");
    assert.ok(ud.length <= 16384 && ud[0] === 0x1f && ud[1] === 0x8b, "gzip user data");
    assert.match(gunzipSync(ud).toString(), /^#!\/bin\/sh\n/);
    // Capacity is decided at admission from what the backend holds (the Fleet's reservations).
    const ledger = new Reservations();
    ledger.reserve({ request_id: "one-1", backend: aws.name, placement: null, cpu_millicores: 1000, ram_mib: 1024 });
    assert.equal((aws.canSatisfy(grant("two-1"), ledger.held(aws.name)) as { code: string }).code, "at_capacity");
    await aws.terminate(inst);
    ledger.release("one-1");
    assert.equal(aws.canSatisfy(grant("two-1"), ledger.held(aws.name)).ok, true);
    assert.equal(fake.createdCount, 1);
  });

  it("refused credentials surface as CredentialError with a clear message and no secret in it", async (t) => {
    const fake = await startFake(t);
    const wrongKey = { accessKeyId: "AKIAUNKNOWNKEY000000", secretAccessKey: "wrong/secret/value/0000000000000000000000" };
    const aws = makeBackend(t, awsConfig(t, fake, {}, wrongKey));
    const img = image("y", "#!/bin/sh\nexit 0\n");
    const env: Envelope = { image: { ...img, format: "bundle" } };
    await assert.rejects(aws.provision(grant("auth-1"), env, never), (e: unknown) => {
      assert.ok(e instanceof CredentialError, String(e));
      assert.match(e.message, /AuthFailure/);
      assert.match(e.message, /access_key_id_file\/secret_access_key_file/);
      assert.ok(!e.message.includes(wrongKey.secretAccessKey));
      return true;
    });
    // Right key id, wrong secret: the signature does not match.
    const badSecret = makeBackend(t, awsConfig(t, fake, {}, { accessKeyId: fake.credentials.accessKeyId, secretAccessKey: "not/the/right/secret/000000000000000000000" }));
    await assert.rejects(badSecret.provision(grant("auth-2"), env, never), (e: unknown) => e instanceof CredentialError && /SignatureDoesNotMatch/.test(e.message) && !e.message.includes("not/the/right/secret"));
    assert.equal(fake.createdCount, 0);
    assert.equal(fake.calls.filter((c) => c.status === 401 || c.status === 403).length, 2, "auth failures are not retried");

    // A named profile is read from the shared credentials file (fromIni), nothing else.
    const ini = tempDir(t, "cb-aws-ini-");
    writeFileSync(path.join(ini, "credentials"), `[bridge]\naws_access_key_id = ${fake.credentials.accessKeyId}\naws_secret_access_key = ${fake.credentials.secretAccessKey}\n`);
    writeFileSync(path.join(ini, "config"), "");
    const saved = { c: process.env.AWS_SHARED_CREDENTIALS_FILE, f: process.env.AWS_CONFIG_FILE };
    process.env.AWS_SHARED_CREDENTIALS_FILE = path.join(ini, "credentials");
    process.env.AWS_CONFIG_FILE = path.join(ini, "config");
    t.after(() => {
      for (const [k, v] of [["AWS_SHARED_CREDENTIALS_FILE", saved.c], ["AWS_CONFIG_FILE", saved.f]] as const) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    });
    const profileCfg = (profile: string) => {
      const { access_key_id_file: _a, secret_access_key_file: _s, ...rest } = awsConfig(t, fake);
      return AwsConfig.parse({ ...rest, profile });
    };
    assert.deepEqual((await makeBackend(t, profileCfg("bridge")).check()).map((c) => c.ok), [true, true]);
    const missing = await makeBackend(t, profileCfg("nope")).check();
    assert.equal(missing[0]?.ok, false);
    assert.match(missing[0]?.detail ?? "", /profile "nope"/);

    // `compute-bridge doctor`: one read-only check per region.
    const bad = await aws.check();
    assert.deepEqual(bad.map((c) => [c.check, c.ok]), [["credentials and DescribeInstances in eu-west-1", false], ["credentials and DescribeInstances in us-east-1", false]]);
    assert.match(bad[0]!.detail, /AuthFailure/);
    const good = await makeBackend(t, awsConfig(t, fake)).check();
    assert.deepEqual(good.map((c) => c.ok), [true, true]);
    assert.match(good[1]!.detail, /^0 instances tagged compute-bridge:bridge-id=test-provider$/);
    assert.equal(fake.countCalls("RunInstances"), 0, "checks never provision");
  });
});

describe("aws backend: the guest's SSH host key (host_key_sha256)", () => {
  const POLL = 5_000;
  const key: Envelope = { image: { url: "http://127.0.0.1:9/unused", sha256: "a".repeat(64), format: "bundle" }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3 k@x" };

  /** Backend and fake on one ManualClock; nothing moves it but driveConsoleWait. */
  async function setup(t: T, faults: Ec2FakeOptions["faults"] = {}, over: Record<string, unknown> = {}, opts: AwsBackendOptions = {}) {
    const clock = new ManualClock();
    const fake = await startFake(t, { now: () => clock.now(), faults: { bootDelayMs: 0, ...faults } });
    const { log, lines } = capturedLog();
    const aws = makeBackend(t, awsConfig(t, fake, over), { clock, log }, { pollIntervalMs: POLL, ...opts });
    const warned = () => lines.filter((l) => l.level === "warn" && l.msg === "no SSH host key fingerprint from the guest; host_key_sha256 stays null");
    return { clock, fake, aws, warned };
  }

  it("the fingerprint the guest reported on its live console is the grant's host_key_sha256, read at once", { timeout: 30_000 }, async (t) => {
    const { clock, fake, aws, warned } = await setup(t);
    const start = clock.now();
    const { value: inst, advances } = await driveConsoleWait(clock, fake, aws.provision(grant("hk-1"), key, never), POLL);
    assert.equal(inst.host_key_sha256, fake.hostKeyFingerprint(inst.instance_id));
    assert.notEqual(fake.hostKeyFingerprint(inst.instance_id), fake.hostKeyFingerprint("i-0123456789abcdef0"), "per instance");
    assert.equal(advances, 0);
    assert.deepEqual(consoleCalls(fake), [{ latest: "true", code: undefined, at: start }]);
    assert.deepEqual(warned(), []);
    await aws.terminate(inst);
  });

  it("a guest without an ed25519 host key reports none: null at once, still provisioned, a warning names the instance and why", { timeout: 30_000 }, async (t) => {
    const { clock, fake, aws, warned } = await setup(t, { hostKeyReport: "none" });
    const { value: inst, advances } = await driveConsoleWait(clock, fake, aws.provision(grant("hk-none"), key, never), POLL);
    assert.equal(inst.host_key_sha256, null);
    assert.equal(inst.host, "127.0.0.1", "provisioned all the same: the grant goes on");
    assert.equal(fake.getInstance(inst.instance_id)?.state, "running");
    assert.match(fake.getInstance(inst.instance_id)?.consoleOutput ?? "", new RegExp(`^${hostKeyMarker("hk-none", null)}$`, "m"));
    assert.equal(advances, 0, "no waiting for a report that came");
    assert.equal(consoleCalls(fake).length, 1);
    const [w, ...more] = warned();
    assert.deepEqual(more, []);
    assert.equal(w?.request_id, "hk-none");
    assert.equal(w?.instance_id, inst.instance_id);
    assert.match(String(w?.reason), /no ed25519 SSH host key/);
    await aws.terminate(inst);
  });

  it("a guest that never reports: the live console is read every poll interval until host_key_timeout_seconds, then null; still provisioned", { timeout: 30_000 }, async (t) => {
    const { clock, fake, aws, warned } = await setup(t, { hostKeyReport: "never" }, { host_key_timeout_seconds: 20 });
    const start = clock.now();
    const { value: inst, advances } = await driveConsoleWait(clock, fake, aws.provision(grant("hk-never"), key, never), POLL);
    assert.equal(inst.host_key_sha256, null);
    assert.equal(fake.getInstance(inst.instance_id)?.state, "running");
    assert.equal(advances, 4, "20 s of 5 s intervals");
    assert.deepEqual(consoleCalls(fake), [0, 1, 2, 3, 4].map((k) => ({ latest: "true", code: undefined, at: start + k * POLL })));
    assert.equal(warned().length, 1);
    assert.match(String(warned()[0]?.reason), /within 20 s/);
    await aws.terminate(inst);
  });

  it("an instance type without a live console (not Nitro, UnsupportedOperation): null after one read, no waiting", { timeout: 30_000 }, async (t) => {
    // Every family in the bridge's type table is on Nitro; the fake is told m6i.large is not.
    const { clock, fake, aws, warned } = await setup(t, { nonNitroTypes: ["m6i.large"] });
    const { value: inst, advances } = await driveConsoleWait(clock, fake, aws.provision(grant("hk-xen"), key, never), POLL);
    assert.equal(inst.host_key_sha256, null);
    assert.equal(inst.details.instance_type, "m6i.large");
    assert.equal(advances, 0);
    assert.deepEqual(consoleCalls(fake), [{ latest: "true", code: "UnsupportedOperation", at: clock.now() }], "one call: a 400 is not retried, and the wait stops");
    assert.match(String(warned()[0]?.reason), /UnsupportedOperation/);
    await aws.terminate(inst);
  });

  it("throttled console reads are retried (by the SDK, then by the wait) and the fingerprint still comes", { timeout: 30_000 }, async (t) => {
    const { clock, fake, aws, warned } = await setup(t, {}, {}, { retryStrategy: () => new ConfiguredRetryStrategy(2, () => 1), maxAttempts: 2 });
    fake.failNext("GetConsoleOutput", "RequestLimitExceeded", undefined, { times: 3 });
    const { value: inst, advances } = await driveConsoleWait(clock, fake, aws.provision(grant("hk-throttle"), key, never), POLL);
    assert.equal(inst.host_key_sha256, fake.hostKeyFingerprint(inst.instance_id));
    assert.deepEqual(consoleCalls(fake).map((c) => c.code), ["RequestLimitExceeded", "RequestLimitExceeded", "RequestLimitExceeded", undefined]);
    // The first read failed after its SDK retries; the next interval's read got through. Each throttle answer also
    // pauses the region's console bucket for one refill interval, on the same clock: two more moves.
    assert.equal(advances, 3);
    assert.deepEqual(warned(), []);
    await aws.terminate(inst);
  });

  it("a guest that powered itself off before SSH answered: no console wait, host_key_sha256 null", { timeout: 30_000 }, async (t) => {
    // An SSH port nobody listens on (taken and released on the loopback), so SSH never answers.
    const probe = net.createServer();
    await new Promise<void>((r) => probe.listen(0, "127.0.0.1", r));
    const closedPort = (probe.address() as net.AddressInfo).port;
    await new Promise<void>((r) => probe.close(() => r()));
    const fake = await startFake(t, { faults: { bootDelayMs: 0 } });
    const aws = makeBackend(t, awsConfig(t, fake, { ssh_port: closedPort }));
    const p = aws.provision(grant("hk-ended"), key, never);
    const running = await until(() => fake.instances.find((i) => i.state === "running"), "the instance to run");
    // Its report is on the console, yet nobody can connect any more: nothing to pin.
    assert.match(running.consoleOutput, new RegExp(`^${hostKeyMarker("hk-ended", fake.hostKeyFingerprint(running.instanceId)).replace(/[+/]/g, "\\$&")}$`, "m"));
    fake.guestPowerOff(running.instanceId, `${exitMarker("hk-ended", 0)}\n`);
    const inst = await p;
    assert.equal(inst.instance_id, running.instanceId);
    assert.equal(inst.host_key_sha256, null);
    assert.equal(fake.countCalls("GetConsoleOutput"), 0);
  });
});
