/**
 * The AWS backend against the EC2 fake's real-EC2 semantics (issue #18, test/fakes/FIDELITY.md):
 * request-rate limits (#15 pacing), eventual consistency, the ClientToken lifecycle, shapes tried
 * within the backend, the 64 KB console window, and the guard on Intel TDX in the installed SDK.
 * Run: node --import tsx --test test/backends/aws-cloud-semantics.test.ts
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import * as ec2Sdk from "@aws-sdk/client-ec2";
import { ConfiguredRetryStrategy } from "@smithy/core/retry";
import { ec2ClientToken } from "../../src/backends/aws/adapter.js";
import { AwsBackend, type AwsBackendOptions } from "../../src/backends/aws.js";
import { BackendError, CapacityError } from "../../src/backends/backend.js";
import { OfferingCache } from "../../src/backends/offering-cache.js";
import { AwsConfig } from "../../src/config/schema.js";
import type { ComputeGrant, Envelope, ProvisionedInstance } from "../../src/domain/index.js";
import { systemClock, type Clock } from "../../src/util/clock.js";
import { createLogger, type Logger } from "../../src/util/logger.js";
import { Ec2Fake, type Ec2FakeOptions } from "../fakes/ec2.js";
import { until } from "../helpers/http.js";
import { MS_ALMANAC } from "../helpers/local.js";
import { ManualClock } from "../helpers/manual-clock.js";
import { tempDir } from "../helpers/tmp.js";

process.env.AWS_EC2_METADATA_DISABLED = "true";

const PROVIDER = "test-provider";
const AMI = "ami-0123456789abcdef0";
const REQUEST_TAG = "compute-bridge:request-id";
const never = new AbortController().signal;
const silent = createLogger("silent");
const ENV: Envelope = { image: { url: "http://127.0.0.1:9/x", sha256: "a".repeat(64), format: "bundle" }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3 k@x" };
type T = { after: (fn: () => unknown) => void };

let sshPort = 0;
let sshServer: net.Server;
before(async () => {
  sshServer = net.createServer((s) => {
    s.on("error", () => undefined);
    s.end("SSH-2.0-OpenSSH_9.2p1\r\n");
  });
  await new Promise<void>((r) => sshServer.listen(0, "127.0.0.1", r));
  sshPort = (sshServer.address() as net.AddressInfo).port;
});
after(() => new Promise<void>((r) => sshServer.close(() => r())));

async function startFake(t: T, opts: Ec2FakeOptions = {}): Promise<Ec2Fake> {
  const fake = await Ec2Fake.start({ seed: 11, ...opts });
  t.after(async () => {
    assert.deepEqual(fake.internalErrors, [], "the fake itself must not throw");
    await fake.close();
  });
  return fake;
}

function awsConfig(t: T, fake: Ec2Fake, over: Record<string, unknown> = {}): AwsConfig {
  const dir = tempDir(t, "cb-aws-sem-");
  writeFileSync(path.join(dir, "akid"), `${fake.credentials.accessKeyId}\n`, { mode: 0o600 });
  writeFileSync(path.join(dir, "secret"), `${fake.credentials.secretAccessKey}\n`, { mode: 0o600 });
  return AwsConfig.parse({
    regions: { "us-east-1": { image_id: AMI, subnet_id: "subnet-0123abcd", security_group_ids: ["sg-0123abcd"] } },
    instance_types: ["m6i.xlarge", "m6i.large"],
    max_concurrent_instances: 1000,
    access_key_id_file: path.join(dir, "akid"),
    secret_access_key_file: path.join(dir, "secret"),
    endpoint: fake.endpoint,
    ssh_port: sshPort,
    poll_interval_seconds: 0.02,
    launch_timeout_seconds: 30,
    ready_timeout_seconds: 10,
    host_key_timeout_seconds: 5,
    ...over,
  });
}

function makeBackend(t: T, cfg: AwsConfig, ctx: { clock?: Clock; unavailable?: OfferingCache; log?: Logger } = {}, opts: AwsBackendOptions = {}): AwsBackend {
  const clock = ctx.clock ?? systemClock;
  const b = new AwsBackend(
    cfg,
    { providerId: PROVIDER, stateDir: "/nonexistent", configDir: "/", log: ctx.log ?? silent, clock, almanac: MS_ALMANAC, unavailable: ctx.unavailable ?? new OfferingCache(60_000, clock) },
    { readyPollIntervalMs: 10, sshProbeIntervalMs: 10, consoleGraceMs: 100, ...opts },
  );
  t.after(() => b.close());
  return b;
}

function grant(id: string, over: Partial<ComputeGrant> = {}): ComputeGrant {
  return { request_id: id, region: "us-east-1", tdx_required: false, cpu_millicores: 1500, ram_mib: 2048, valid_to: Date.now() + 600_000, ...over };
}

function capturedLog(): { log: Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  return { log: createLogger("debug", { write: (s: string) => void lines.push(JSON.parse(s) as Record<string, unknown>) }), lines };
}

/** Settles `p`, moving `clock` by `stepMs` whenever the backend sleeps on it. */
async function drive<V>(clock: ManualClock, p: Promise<V>, stepMs: number): Promise<V> {
  let settled = false;
  const done = p.finally(() => void (settled = true));
  done.catch(() => undefined);
  for (;;) {
    await until(() => settled || clock.pending > 0, "the call to settle or sleep");
    if (settled) return done;
    clock.advance(stepMs);
  }
}

// ---- #15: pacing to EC2's request-rate limits --------------------------------------------------

describe("aws backend: API calls paced to EC2's request-rate buckets (backends.aws.rate_limits)", () => {
  // Small buckets so the burst outruns them many times over; the fake refills on the wall clock, as EC2 does.
  const limits = { describe: { bucket: 10, refillPerSecond: 40 }, mutate: { bucket: 4, refillPerSecond: 25 }, console: { bucket: 4, refillPerSecond: 25 } };
  // The bridge's buckets one token and 20% under the account's: network jitter (the first calls also open
  // connections) must not turn a call that left on time into one that arrives early.
  const asConfig = Object.fromEntries(Object.entries(limits).map(([k, v]) => [k, { bucket: v.bucket - 1, refill_per_second: v.refillPerSecond * 0.8 }]));

  it("a burst of 40 launches against the rate-limited fake reaches every instance without a single RequestLimitExceeded", { timeout: 60_000 }, async (t) => {
    const fake = await startFake(t, { now: () => Date.now(), faults: { rateLimits: limits } });
    const aws = makeBackend(t, awsConfig(t, fake, { rate_limits: asConfig }));
    const grants = Array.from({ length: 40 }, (_, i) => grant(`burst-${i}`));
    const t0 = Date.now();
    const insts = await Promise.all(grants.map((g) => aws.provision(g, ENV, never)));
    const elapsed = Date.now() - t0;
    assert.equal(new Set(insts.map((i) => i.instance_id)).size, 40);
    assert.equal(fake.createdCount, 40);
    assert.equal(fake.rateLimited, 0, `no request was over the fake's limit: ${JSON.stringify(fake.calls.filter((c) => c.code !== undefined).map((c) => c.action))}`);
    assert.deepEqual(fake.calls.filter((c) => c.code !== undefined).map((c) => `${c.action} ${c.code}`), []);
    // The floor the bridge's mutate bucket allows: 40 launches = 3 at once + 37 at 20/s.
    assert.ok(elapsed >= ((40 - 3) / 20) * 1000 * 0.95, `paced, not fired at once (${elapsed} ms)`);
    assert.ok(insts.every((i) => i.host_key_sha256 === fake.hostKeyFingerprint(i.instance_id)));
  });

  it("control: the same 40 launches fired at once are throttled by the fake (its limit is real)", async (t) => {
    // The fake's clock stands still: its buckets do not refill during the burst, however slowly it arrives.
    const t0 = Date.now();
    const fake = await startFake(t, { now: () => t0, faults: { rateLimits: limits } });
    const c = new ec2Sdk.EC2Client({ region: "us-east-1", endpoint: fake.endpoint, credentials: fake.credentials, maxAttempts: 1 });
    t.after(() => c.destroy());
    const results = await Promise.allSettled(Array.from({ length: 40 }, () => c.send(new ec2Sdk.RunInstancesCommand({ ImageId: AMI, InstanceType: "m6i.large", MinCount: 1, MaxCount: 1 }))));
    assert.ok(fake.rateLimited >= 20, `throttled: ${fake.rateLimited}`);
    assert.ok(results.some((r) => r.status === "rejected" && (r.reason as Error).name === "RequestLimitExceeded"));
  });

  it("EC2's resource buckets: launches are paced one token per instance, under the request-rate buckets", { timeout: 60_000 }, async (t) => {
    // Request buckets that never bind; a launch bucket of 4 refilled at 10 per s (EC2: 1000 / 2 per s).
    const fake = await startFake(t, { now: () => Date.now(), faults: { resourceLimits: { RunInstances: { bucket: 4, refillPerSecond: 10 } } } });
    const aws = makeBackend(t, awsConfig(t, fake, { rate_limits: { launched_instances: { bucket: 3, refill_per_second: 8 } } }));
    const t0 = Date.now();
    const insts = await Promise.all(Array.from({ length: 12 }, (_, i) => aws.provision(grant(`res-${i}`), ENV, never)));
    const elapsed = Date.now() - t0;
    assert.equal(new Set(insts.map((i) => i.instance_id)).size, 12);
    assert.equal(fake.resourceLimited, 0, "no launch was over the fake's resource bucket");
    assert.ok(elapsed >= ((12 - 3) / 8) * 1000 * 0.95, `paced by the launch bucket (${elapsed} ms)`);
  });

  it("control: launches fired at once outrun a resource bucket the request buckets allow (its limit is real)", async (t) => {
    const t0 = Date.now();
    const fake = await startFake(t, { now: () => t0, faults: { resourceLimits: { RunInstances: { bucket: 4, refillPerSecond: 10 }, TerminateInstances: { bucket: 2, refillPerSecond: 10 } } } });
    const c = new ec2Sdk.EC2Client({ region: "us-east-1", endpoint: fake.endpoint, credentials: fake.credentials, maxAttempts: 1 });
    t.after(() => c.destroy());
    const results = await Promise.allSettled(Array.from({ length: 10 }, () => c.send(new ec2Sdk.RunInstancesCommand({ ImageId: AMI, InstanceType: "m6i.large", MinCount: 1, MaxCount: 1 }))));
    assert.equal(results.filter((r) => r.status === "fulfilled").length, 4);
    assert.equal(fake.resourceLimited, 6);
    // One call for three instances takes three tokens: more than the termination bucket holds.
    const ids = fake.instances.map((i) => i.instanceId).slice(0, 3);
    await assert.rejects(c.send(new ec2Sdk.TerminateInstancesCommand({ InstanceIds: ids })), (e: Error) => e.name === "RequestLimitExceeded");
    await c.send(new ec2Sdk.TerminateInstancesCommand({ InstanceIds: ids.slice(0, 2) }));
  });

  it("a throttling answer empties the client's bucket: the next call waits a refill interval instead of hammering", async (t) => {
    const clock = new ManualClock(Date.now());
    const fake = await startFake(t, { now: () => clock.now() });
    const aws = makeBackend(t, awsConfig(t, fake, { rate_limits: { describe: { bucket: 50, refill_per_second: 2 }, mutate: { bucket: 50, refill_per_second: 5 }, console: { bucket: 50, refill_per_second: 5 } } }), { clock }, { maxAttempts: 1 });
    fake.failNext("DescribeInstances", "RequestLimitExceeded");
    await assert.rejects(aws.check().then((r) => (r[0]!.ok ? r : Promise.reject(new Error(r[0]!.detail)))), /RequestLimitExceeded/);
    const before = fake.countCalls("DescribeInstances");
    let done = false;
    const second = aws.check().then(() => void (done = true));
    await until(() => clock.pending > 0, "the call to wait for its token");
    clock.advance(499);
    await new Promise((r) => setImmediate(r));
    assert.equal(done, false);
    assert.equal(fake.countCalls("DescribeInstances"), before, "nothing sent during the pause");
    clock.advance(1);
    await second;
    assert.equal(done, true);
    assert.equal(fake.countCalls("DescribeInstances"), before + 1);
  });
});

// ---- #18 item 7: every fitting shape, each with its own token, adoption across attempts ----------

describe("aws backend: shapes within the backend (issue #18 item 7)", () => {
  it("a launch whose reply was lost on the second shape is adopted by the retry, never launched twice", async (t) => {
    const fake = await startFake(t, { faults: { capacity: new Set(["m6i.large"]) } });
    const unavailable = new OfferingCache(60_000, systemClock);
    const aws = makeBackend(t, awsConfig(t, fake), { unavailable }, { retryStrategy: () => new ConfiguredRetryStrategy(2, () => 2), maxAttempts: 2 });
    fake.failNext("RunInstances", "InternalError", 500, { afterCommit: true, times: 2 });
    await assert.rejects(aws.provision(grant("lost-2nd"), ENV, never), (e: Error) => e.name === "TransientError");
    assert.equal(fake.createdCount, 1);
    assert.equal(fake.instances[0]?.instanceType, "m6i.xlarge");
    const inst = await aws.provision(grant("lost-2nd"), ENV, never);
    assert.equal(inst.instance_id, fake.instances[0]?.instanceId);
    assert.equal(inst.details["client_token"], ec2ClientToken(PROVIDER, "lost-2nd", "m6i.xlarge"));
    assert.equal(fake.createdCount, 1);
    assert.deepEqual([...fake.duplicateTagValues(REQUEST_TAG)], []);
  });

  it("a shape whose token is bound to a failed call with other parameters (IdempotentParameterMismatch, nothing to adopt) is skipped for the next shape", async (t) => {
    const fake = await startFake(t, { faults: { capacity: new Set(["m6i.large"]) } });
    // First life: m6i.large has no capacity, m6i.xlarge is not configured.
    const first = makeBackend(t, awsConfig(t, fake, { instance_types: ["m6i.large"] }));
    await assert.rejects(first.provision(grant("bound"), ENV, never), CapacityError);
    // Second life, other subnet (other parameters for the same token), capacity back.
    fake.faults.capacity = undefined;
    const cfg = awsConfig(t, fake);
    cfg.regions["us-east-1"]!.subnet_id = "subnet-0999abcd";
    const second = makeBackend(t, cfg);
    const inst = await second.provision(grant("bound"), ENV, never);
    assert.equal(inst.details["instance_type"], "m6i.xlarge");
    assert.deepEqual(
      fake.calls.filter((c) => c.action === "RunInstances").map((c) => [c.params.InstanceType, c.code ?? "ok"]),
      [["m6i.large", "InsufficientInstanceCapacity"], ["m6i.large", "IdempotentParameterMismatch"], ["m6i.xlarge", "ok"]],
    );
    assert.equal(fake.createdCount, 1);
  });

  it("the token of a terminated instance (IdempotentInstanceTerminated): its end is reported, no second launch; once EC2 forgets it, a clear refusal", async (t) => {
    const fake = await startFake(t);
    const aws = makeBackend(t, awsConfig(t, fake, { instance_types: ["m6i.large"] }));
    // One grant for every call: its valid_to is part of the user data EC2 binds the token to.
    const g = grant("gone");
    const inst = await aws.provision(g, ENV, never);
    fake.reclaim(inst.instance_id);
    fake.settleAll();
    await assert.rejects(aws.provision(g, ENV, never), (e: Error) => e instanceof BackendError && /terminated \(Server\.InternalError.*before it became ready/.test(e.message));
    assert.ok(fake.calls.some((c) => c.action === "RunInstances" && c.code === "IdempotentInstanceTerminated"), JSON.stringify(fake.calls.map((c) => [c.action, c.code])));
    fake.faults.terminatedVisibleMs = 0;
    await assert.rejects(aws.provision(g, ENV, never), /IdempotentInstanceTerminated\); not launching a second one/);
    assert.equal(fake.createdCount, 1);
  });
});

// ---- #18 items 2 and 8 ---------------------------------------------------------------------------

describe("aws backend: eventual consistency and the console window (issue #18 items 2, 8)", () => {
  it("terminate right after launch: InvalidInstanceID.NotFound is asked again until EC2 sees the instance and confirms; an old unknown id is done at once", async (t) => {
    const clock = new ManualClock(Date.now());
    const fake = await startFake(t, { now: () => clock.now(), faults: { consistencyDelayMs: 2000 } });
    const aws = makeBackend(t, awsConfig(t, fake), { clock });
    const c = new ec2Sdk.EC2Client({ region: "us-east-1", endpoint: fake.endpoint, credentials: fake.credentials });
    t.after(() => c.destroy());
    const out = await c.send(new ec2Sdk.RunInstancesCommand({ ImageId: AMI, InstanceType: "m6i.large", MinCount: 1, MaxCount: 1 }));
    const id = out.Instances![0]!.InstanceId!;
    const inst: ProvisionedInstance = {
      request_id: "ec-1", backend: "aws", instance_id: id, region: "us-east-1", host: null, ssh_port: null, ssh_user: null,
      host_key_sha256: null, started_at: new Date(clock.now()).toISOString(), cpu_millicores: 1000, ram_mib: 1024, details: {},
    };
    await drive(clock, aws.terminate(inst), 250);
    assert.equal(fake.getInstance(id)?.state, "terminated");
    const calls = fake.calls.filter((x) => x.action === "TerminateInstances");
    assert.equal(calls[0]?.code, "InvalidInstanceID.NotFound");
    assert.equal(calls.at(-1)?.code, undefined);

    // Launched long ago and unknown: gone (terminated over an hour ago), nothing to wait for.
    fake.resetCalls();
    await aws.terminate({ ...inst, instance_id: "i-0123456789abcdef0", started_at: new Date(clock.now() - 3_600_000).toISOString() });
    assert.equal(fake.countCalls("TerminateInstances"), 1);
  });

  it("still not visible after the retries: a retryable error, never a false 'terminated'", async (t) => {
    const clock = new ManualClock(Date.now());
    const fake = await startFake(t, { now: () => clock.now(), faults: { consistencyDelayMs: 3_600_000 } });
    const aws = makeBackend(t, awsConfig(t, fake), { clock });
    const c = new ec2Sdk.EC2Client({ region: "us-east-1", endpoint: fake.endpoint, credentials: fake.credentials });
    t.after(() => c.destroy());
    const id = (await c.send(new ec2Sdk.RunInstancesCommand({ ImageId: AMI, InstanceType: "m6i.large", MinCount: 1, MaxCount: 1 }))).Instances![0]!.InstanceId!;
    const inst: ProvisionedInstance = {
      request_id: "ec-2", backend: "aws", instance_id: id, region: "us-east-1", host: null, ssh_port: null, ssh_user: null,
      host_key_sha256: null, started_at: new Date(clock.now()).toISOString(), cpu_millicores: 1000, ram_mib: 1024, details: {},
    };
    await assert.rejects(drive(clock, aws.terminate(inst), 50), (e: Error) => e.name === "TransientError" && /eventual consistency/.test(e.message));
    assert.equal(fake.getInstance(id)?.state, "running");
  });

  it("a host key report that scrolled out of EC2's 64 KB console window: null after one read, with the reason, no waiting", async (t) => {
    const fake = await startFake(t);
    fake.faults.hostKeyReport = (i) => {
      // Boot chatter after the report, before the bridge's first read.
      queueMicrotask(() => fake.appendConsole(i.instanceId, `${"cloud-init: chatter\n".repeat(4000)}`));
      return "key";
    };
    const { log, lines } = capturedLog();
    const aws = makeBackend(t, awsConfig(t, fake, { host_key_timeout_seconds: 600 }), { log });
    const inst = await aws.provision(grant("chatty"), ENV, never);
    assert.equal(inst.host_key_sha256, null);
    assert.equal(fake.countCalls("GetConsoleOutput"), 1);
    assert.ok(lines.some((l) => /scrolled out of the last 64 KB/.test(String(l.reason))), "the warning says why");
  });
});

// ---- #18: revisit tdx_capable when EC2 gains Intel TDX -------------------------------------------

describe("guard: the installed @aws-sdk/client-ec2 has no Intel TDX processor feature", () => {
  it("SupportedAdditionalProcessorFeature lists no TDX, and no EC2 enum mentions TDX (else revisit tdx_capable: false in src/backends/aws.ts)", () => {
    const features = Object.values(ec2Sdk.SupportedAdditionalProcessorFeature);
    assert.ok(features.includes("amd-sev-snp"), "the enum the guard reads still exists");
    assert.deepEqual(features.filter((f) => /tdx/i.test(f)), []);
    const tdx: string[] = [];
    for (const [name, v] of Object.entries(ec2Sdk))
      if (v && typeof v === "object" && !Array.isArray(v))
        for (const [k, x] of Object.entries(v as Record<string, unknown>)) if (typeof x === "string" && (/\btdx\b|intel-tdx|intel_tdx/i.test(x) || /^(INTEL_)?TDX$/.test(k))) tdx.push(`${name}.${k}=${x}`);
    assert.deepEqual(tdx, [], "EC2 gained an Intel TDX option: revisit capabilities().tdx_capable for AWS");
  });
});
