/**
 * Proves test/fakes/ec2.ts against the REAL EC2Client from @aws-sdk/client-ec2 (no mocks between them).
 * Run: npx tsx --test test/fakes/ec2.test.ts
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { gzipSync } from "node:zlib";
import { after, before, describe, it } from "node:test";
import {
  DescribeInstancesCommand,
  EC2Client,
  EC2ServiceException,
  GetConsoleOutputCommand,
  type Instance,
  paginateDescribeInstances,
  RunInstancesCommand,
  type RunInstancesCommandInput,
  TerminateInstancesCommand,
  waitUntilInstanceRunning,
} from "@aws-sdk/client-ec2";
import { Ec2Fake, type Ec2FakeOptions, FAKE_EC2_CREDENTIALS } from "./ec2.js";

process.env.AWS_EC2_METADATA_DISABLED = "true";

const AMI = "ami-0123456789abcdef0";

function client(fake: Ec2Fake, extra: Partial<ConstructorParameters<typeof EC2Client>[0]> = {}): EC2Client {
  return new EC2Client({ endpoint: fake.endpoint, region: "us-east-1", credentials: fake.credentials, ...extra });
}

function runInput(over: Partial<RunInstancesCommandInput> = {}, tags: Record<string, string> = { grant: "g-1" }): RunInstancesCommandInput {
  return {
    ImageId: AMI,
    InstanceType: "t3.micro",
    MinCount: 1,
    MaxCount: 1,
    TagSpecifications: [{ ResourceType: "instance", Tags: Object.entries(tags).map(([Key, Value]) => ({ Key, Value })) }],
    InstanceInitiatedShutdownBehavior: "terminate",
    SubnetId: "subnet-0123abcd",
    SecurityGroupIds: ["sg-0123abcd"],
    KeyName: "bridge",
    ...over,
  };
}

/** Awaits `p`, which must reject with an SDK service exception, and returns it. */
async function sdkError(p: Promise<unknown>): Promise<EC2ServiceException> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof EC2ServiceException, `expected an EC2ServiceException, got ${String(e)}`);
    return e;
  }
  assert.fail("expected the call to fail");
}

async function describeOne(ec2: EC2Client, id: string): Promise<Instance> {
  const out = await ec2.send(new DescribeInstancesCommand({ InstanceIds: [id] }));
  const inst = out.Reservations?.[0]?.Instances?.[0];
  assert.ok(inst, "instance in reply");
  return inst;
}

/** One fake + one client per test, torn down afterwards. */
async function withFake(opts: Ec2FakeOptions, fn: (fake: Ec2Fake, ec2: EC2Client) => Promise<void>): Promise<void> {
  const fake = await Ec2Fake.start({ seed: 42, ...opts });
  const ec2 = client(fake);
  try {
    await fn(fake, ec2);
    assert.deepEqual(fake.internalErrors, [], "the fake itself must not throw");
  } finally {
    ec2.destroy();
    await fake.close();
  }
}

describe("Ec2Fake with the real EC2Client", () => {
  it("RunInstances then DescribeInstances by id returns what was launched", () =>
    withFake({}, async (fake, ec2) => {
      const userData = '#!/bin/sh\necho "grant $GRANT up"\n';
      const run = await ec2.send(
        new RunInstancesCommand(runInput({ ClientToken: "tok-1", UserData: Buffer.from(userData).toString("base64") }, { grant: "g-1", role: "worker" })),
      );
      assert.match(run.ReservationId ?? "", /^r-[0-9a-f]{17}$/);
      assert.equal(run.OwnerId, "123456789012");
      const launched = run.Instances?.[0];
      assert.ok(launched?.InstanceId);
      assert.match(launched.InstanceId, /^i-[0-9a-f]{17}$/);
      assert.deepEqual(launched.State, { Code: 0, Name: "pending" });
      assert.equal(launched.PublicIpAddress, undefined, "no public IP while pending");
      assert.equal(launched.ClientToken, "tok-1");
      assert.equal(launched.InstanceType, "t3.micro");
      assert.equal(launched.Placement?.AvailabilityZone, "us-east-1a");
      assert.ok(launched.LaunchTime instanceof Date);

      const got = await describeOne(ec2, launched.InstanceId);
      assert.equal(got.InstanceId, launched.InstanceId);
      assert.equal(got.ImageId, AMI);
      assert.equal(got.KeyName, "bridge");
      assert.equal(got.SubnetId, "subnet-0123abcd");
      assert.match(got.PrivateIpAddress ?? "", /^10\.\d+\.\d+\.\d+$/);
      assert.deepEqual(
        Object.fromEntries((got.Tags ?? []).map((t) => [t.Key, t.Value])),
        { grant: "g-1", role: "worker" },
      );

      // The fake keeps the launch as the daemon sent it, UserData decoded and executable.
      const inst = fake.getInstance(launched.InstanceId);
      assert.ok(inst);
      assert.equal(inst.userData, userData);
      assert.equal(inst.shutdownBehavior, "terminate");
      assert.deepEqual(inst.securityGroupIds, ["sg-0123abcd"]);
      assert.equal(inst.launchParams.InstanceInitiatedShutdownBehavior, "terminate");
      const out = execFileSync("/bin/sh", ["-c", inst.userData ?? ""], { env: { GRANT: "g-1", PATH: process.env.PATH } }).toString();
      assert.equal(out, "grant g-1 up\n");

      assert.equal(fake.countCalls("RunInstances"), 1);
      assert.equal(fake.countCalls("DescribeInstances"), 1);
      const call = fake.calls[0];
      assert.equal(call?.region, "us-east-1");
      assert.equal(call?.accessKeyId, fake.credentials.accessKeyId);
      assert.equal(call?.params["TagSpecification.1.ResourceType"], "instance");
      fake.resetCalls();
      assert.equal(fake.countCalls(), 0);
    }));

  it("DescribeInstances filters by tag and paginates 250 instances with MaxResults 100", () =>
    withFake({}, async (fake, ec2) => {
      for (const n of [100, 100, 50]) await ec2.send(new RunInstancesCommand(runInput({ MinCount: n, MaxCount: n }, { pool: "bulk" })));
      await ec2.send(new RunInstancesCommand(runInput({ MinCount: 7, MaxCount: 7 }, { pool: "other" })));
      assert.equal(fake.createdCount, 257);

      const Filters = [{ Name: "tag:pool", Values: ["bulk"] }];
      const pageSizes: number[] = [];
      const seen = new Set<string>();
      let NextToken: string | undefined;
      do {
        const page = await ec2.send(new DescribeInstancesCommand({ Filters, MaxResults: 100, NextToken }));
        const ids = (page.Reservations ?? []).flatMap((r) => (r.Instances ?? []).map((i) => i.InstanceId ?? ""));
        pageSizes.push(ids.length);
        for (const id of ids) seen.add(id);
        NextToken = page.NextToken;
      } while (NextToken);
      assert.deepEqual(pageSizes, [100, 100, 50]);
      assert.equal(seen.size, 250);
      assert.deepEqual([...seen].sort(), fake.instancesByTag("pool", "bulk").map((i) => i.instanceId).sort());

      // The SDK's own paginator follows nextToken too.
      let viaPaginator = 0;
      for await (const page of paginateDescribeInstances({ client: ec2, pageSize: 100 }, { Filters })) {
        viaPaginator += (page.Reservations ?? []).reduce((n, r) => n + (r.Instances?.length ?? 0), 0);
      }
      assert.equal(viaPaginator, 250);

      // Wildcards, tag-key, state filters; several values OR, several filters AND.
      const count = async (f: { Name: string; Values: string[] }[]) =>
        ((await ec2.send(new DescribeInstancesCommand({ Filters: f }))).Reservations ?? []).reduce((n, r) => n + (r.Instances?.length ?? 0), 0);
      assert.equal(await count([{ Name: "tag:pool", Values: ["oth*"] }]), 7);
      assert.equal(await count([{ Name: "tag:pool", Values: ["bulk", "other"] }]), 257);
      assert.equal(await count([{ Name: "tag-key", Values: ["pool"] }]), 257);
      assert.equal(await count([{ Name: "tag:pool", Values: ["other"] }, { Name: "instance-state-name", Values: ["running"] }]), 7);
      assert.equal(await count([{ Name: "tag:pool", Values: ["other"] }, { Name: "instance-state-name", Values: ["pending"] }]), 0);
      assert.equal(await count([{ Name: "tag:nope", Values: ["*"] }]), 0);

      const bad = await sdkError(ec2.send(new DescribeInstancesCommand({ Filters: [{ Name: "colour", Values: ["x"] }] })));
      assert.equal(bad.name, "InvalidParameterValue");
      const combo = await sdkError(ec2.send(new DescribeInstancesCommand({ InstanceIds: [[...seen][0]!], MaxResults: 10 })));
      assert.equal(combo.name, "InvalidParameterCombination");
    }));

  it("ClientToken: same token and parameters returns the original reservation; different parameters is a mismatch", () =>
    withFake({}, async (fake, ec2) => {
      const first = await ec2.send(new RunInstancesCommand(runInput({ ClientToken: "grant-g-1" })));
      const again = await ec2.send(new RunInstancesCommand(runInput({ ClientToken: "grant-g-1" })));
      assert.equal(again.ReservationId, first.ReservationId);
      assert.equal(again.Instances?.[0]?.InstanceId, first.Instances?.[0]?.InstanceId);
      assert.equal(fake.createdCount, 1);
      assert.equal(fake.createsByToken.get("grant-g-1"), 1);
      assert.equal(fake.idempotentReplays, 1);
      assert.equal(fake.createsByTag("grant", "g-1"), 1);

      const err = await sdkError(ec2.send(new RunInstancesCommand(runInput({ ClientToken: "grant-g-1", InstanceType: "t3.large" }))));
      assert.equal(err.name, "IdempotentParameterMismatch");
      assert.equal(err.$metadata.httpStatusCode, 400);
      assert.equal(err.$metadata.attempts, 1);
      assert.equal(fake.createdCount, 1);

      // A different token for the same grant is a real second launch: the per-tag helpers expose it.
      await ec2.send(new RunInstancesCommand(runInput({ ClientToken: "grant-g-1-retry" })));
      assert.deepEqual([...fake.duplicateTagValues("grant")], [["g-1", 2]]);
    }));

  it("a reply lost after the launch committed is healed by the SDK retry reusing its auto-generated ClientToken", () =>
    withFake({}, async (fake, ec2) => {
      fake.failNext("RunInstances", "InternalError", 500, { afterCommit: true });
      const out = await ec2.send(new RunInstancesCommand(runInput())); // no ClientToken: the SDK fills one in
      assert.equal(out.$metadata.attempts, 2);
      assert.equal(fake.countCalls("RunInstances"), 2);
      const [a, b] = fake.calls;
      assert.ok(a?.params.ClientToken);
      assert.equal(b?.params.ClientToken, a.params.ClientToken);
      assert.equal(b?.invocationId, a.invocationId);
      assert.deepEqual([a.status, b?.status], [500, 200]);
      assert.equal(fake.createdCount, 1);
      assert.equal(fake.duplicateTagValues("grant").size, 0);
      assert.equal(out.Instances?.[0]?.InstanceId, fake.instances[0]?.instanceId);
    }));

  it("boot: pending until bootDelayMs of virtual time passes, then running with ipAddress", () =>
    withFake({ faults: { bootDelayMs: 30_000 }, publicIp: "127.0.0.1" }, async (fake, ec2) => {
      const id = (await ec2.send(new RunInstancesCommand(runInput()))).Instances?.[0]?.InstanceId ?? "";
      let inst = await describeOne(ec2, id);
      assert.equal(inst.State?.Name, "pending");
      assert.equal(inst.PublicIpAddress, undefined);
      fake.advance(29_999);
      assert.equal((await describeOne(ec2, id)).State?.Name, "pending");
      fake.advance(1);
      inst = await describeOne(ec2, id);
      assert.deepEqual(inst.State, { Code: 16, Name: "running" });
      assert.equal(inst.PublicIpAddress, "127.0.0.1");

      // bootAll() short-circuits the delay; the SDK waiter sees "running" on its first poll (no sleeping).
      const id2 = (await ec2.send(new RunInstancesCommand(runInput({}, { grant: "g-2" })))).Instances?.[0]?.InstanceId ?? "";
      fake.bootAll();
      const w = await waitUntilInstanceRunning({ client: ec2, maxWaitTime: 5, minDelay: 1, maxDelay: 1 }, { InstanceIds: [id2] });
      assert.equal(w.state, "SUCCESS");
    }));

  it("TerminateInstances: running -> shutting-down -> terminated, stays visible, and is idempotent", () =>
    withFake({}, async (fake, ec2) => {
      const id = (await ec2.send(new RunInstancesCommand(runInput()))).Instances?.[0]?.InstanceId ?? "";
      assert.equal((await describeOne(ec2, id)).State?.Name, "running");
      const t1 = await ec2.send(new TerminateInstancesCommand({ InstanceIds: [id] }));
      assert.deepEqual(t1.TerminatingInstances, [
        { InstanceId: id, CurrentState: { Code: 32, Name: "shutting-down" }, PreviousState: { Code: 16, Name: "running" } },
      ]);
      const gone = await describeOne(ec2, id);
      assert.deepEqual(gone.State, { Code: 48, Name: "terminated" });
      assert.equal(gone.PublicIpAddress, undefined);
      assert.equal(gone.StateReason?.Code, "Client.UserInitiatedShutdown");
      const t2 = await ec2.send(new TerminateInstancesCommand({ InstanceIds: [id] }));
      assert.deepEqual(t2.TerminatingInstances?.[0]?.CurrentState, { Code: 48, Name: "terminated" });
      assert.deepEqual(t2.TerminatingInstances?.[0]?.PreviousState, { Code: 48, Name: "terminated" });
      const byState = await ec2.send(new DescribeInstancesCommand({ Filters: [{ Name: "instance-state-name", Values: ["terminated"] }] }));
      assert.equal(byState.Reservations?.[0]?.Instances?.[0]?.InstanceId, id);

      // With a termination delay, shutting-down is observable until the clock moves.
      fake.faults.terminateDelayMs = 10_000;
      const id2 = (await ec2.send(new RunInstancesCommand(runInput()))).Instances?.[0]?.InstanceId ?? "";
      await ec2.send(new TerminateInstancesCommand({ InstanceIds: [id2] }));
      assert.equal((await describeOne(ec2, id2)).State?.Name, "shutting-down");
      fake.advance(10_000);
      assert.equal((await describeOne(ec2, id2)).State?.Name, "terminated");
    }));

  it("guest power-off terminates the instance and GetConsoleOutput round-trips its console (base64)", () =>
    withFake({}, async (fake, ec2) => {
      const id = (await ec2.send(new RunInstancesCommand(runInput()))).Instances?.[0]?.InstanceId ?? "";
      const empty = await ec2.send(new GetConsoleOutputCommand({ InstanceId: id }));
      assert.equal(empty.InstanceId, id);
      assert.equal(empty.Output, undefined);

      fake.appendConsole(id, "cloud-init: starting grant g-1\n");
      fake.guestPowerOff(id, "RESULT ok ✓\nreboot: Power down\n");
      const co = await ec2.send(new GetConsoleOutputCommand({ InstanceId: id }));
      assert.ok(co.Timestamp instanceof Date);
      assert.equal(Buffer.from(co.Output ?? "", "base64").toString("utf8"), "cloud-init: starting grant g-1\nRESULT ok ✓\nreboot: Power down\n");
      const inst = await describeOne(ec2, id);
      assert.equal(inst.State?.Name, "terminated");
      assert.equal(inst.StateReason?.Code, "Client.InstanceInitiatedShutdown");
    }));

  it("GetConsoleOutput Latest: the boot script's host key report (gzip user data too), none/never, UnsupportedOperation on non-Nitro types", () =>
    withFake({ faults: { bootDelayMs: 1_000, nonNitroTypes: new Set(["t2.micro"]) } }, async (fake, ec2) => {
      const script = (rid: string) => `#!/bin/sh\nCB_CONSOLE=\${CB_CONSOLE:-/dev/ttyS0}\nCB_REQUEST_ID='${rid}'\necho hi\n`;
      const launch = async (userData: Buffer | undefined, over: Partial<RunInstancesCommandInput> = {}) =>
        (await ec2.send(new RunInstancesCommand(runInput({ ...(userData ? { UserData: userData.toString("base64") } : {}), ...over })))).Instances?.[0]?.InstanceId ?? "";
      const latest = async (id: string) => Buffer.from((await ec2.send(new GetConsoleOutputCommand({ InstanceId: id, Latest: true }))).Output ?? "", "base64").toString("utf8");

      const plain = await launch(Buffer.from(script("req-1")));
      const quoted = await launch(gzipSync(Buffer.from(script(`it'\\''s-2`))));
      const other = await launch(Buffer.from("#!/bin/sh\necho not the bridge\n"));
      assert.equal(await latest(plain), "", "nothing before the guest runs");
      fake.advance(1_000);
      assert.equal(await latest(plain), `COMPUTE-BRIDGE-HOSTKEY req-1 ${fake.hostKeyFingerprint(plain)}\n`);
      assert.match(fake.hostKeyFingerprint(plain), /^SHA256:[A-Za-z0-9+/]{43}$/);
      assert.equal(await latest(quoted), `COMPUTE-BRIDGE-HOSTKEY it's-2 ${fake.hostKeyFingerprint(quoted)}\n`, "gzip inflated, shell quoting undone");
      assert.equal(await latest(other), "", "user data that is not the bridge's script reports nothing");
      // Without Latest: the same text (the fake posts console output as it is written).
      const buffered = await ec2.send(new GetConsoleOutputCommand({ InstanceId: plain }));
      assert.equal(Buffer.from(buffered.Output ?? "", "base64").toString("utf8"), await latest(plain));
      assert.deepEqual(fake.calls.filter((c) => c.action === "GetConsoleOutput").map((c) => c.params.Latest), ["true", "true", "true", "true", undefined, "true"]);

      fake.faults.hostKeyReport = (i) => (i.tags.grant === "none" ? "none" : "never");
      const none = await launch(Buffer.from(script("req-3")), { TagSpecifications: [{ ResourceType: "instance", Tags: [{ Key: "grant", Value: "none" }] }] });
      const silent = await launch(Buffer.from(script("req-4")));
      fake.bootAll();
      assert.equal(await latest(none), "COMPUTE-BRIDGE-HOSTKEY req-3 none\n");
      assert.equal(await latest(silent), "");

      // A type without the Nitro hypervisor keeps no live console: UnsupportedOperation/400, not retried.
      fake.faults.hostKeyReport = "key";
      const xen = await launch(Buffer.from(script("req-5")), { InstanceType: "t2.micro" });
      fake.bootAll();
      fake.resetCalls();
      const err = await sdkError(ec2.send(new GetConsoleOutputCommand({ InstanceId: xen, Latest: true })));
      assert.equal(err.name, "UnsupportedOperation");
      assert.equal(err.$metadata.httpStatusCode, 400);
      assert.equal(fake.countCalls("GetConsoleOutput"), 1);
      const old = await ec2.send(new GetConsoleOutputCommand({ InstanceId: xen, Latest: false }));
      assert.match(Buffer.from(old.Output ?? "", "base64").toString("utf8"), /^COMPUTE-BRIDGE-HOSTKEY req-5 SHA256:/, "without Latest it works");
      fake.clearFaults();
      assert.equal(await latest(xen), Buffer.from(old.Output ?? "", "base64").toString("utf8"));
    }));

  it("unknown and malformed ids surface as InvalidInstanceID.NotFound / .Malformed", () =>
    withFake({}, async (fake, ec2) => {
      const ghost = "i-0123456789abcdef0";
      for (const p of [
        ec2.send(new DescribeInstancesCommand({ InstanceIds: [ghost] })),
        ec2.send(new TerminateInstancesCommand({ InstanceIds: [ghost] })),
        ec2.send(new GetConsoleOutputCommand({ InstanceId: ghost })),
      ]) {
        const e = await sdkError(p);
        assert.equal(e.name, "InvalidInstanceID.NotFound");
        assert.equal(e.message, `The instance ID '${ghost}' does not exist`);
        assert.equal(e.$metadata.httpStatusCode, 400);
        assert.equal(e.$metadata.attempts, 1);
        assert.equal(e.$fault, "client");
      }
      const m = await sdkError(ec2.send(new DescribeInstancesCommand({ InstanceIds: ["i-nope"] })));
      assert.equal(m.name, "InvalidInstanceID.Malformed");
      assert.equal(fake.countCalls(), 4, "client errors are not retried");
    }));

  it("one fake serves several regions, scoped by the region in the SigV4 credential scope", () =>
    withFake({}, async (fake, east) => {
      const west = client(fake, { region: "eu-west-1" });
      try {
        const idEast = (await east.send(new RunInstancesCommand(runInput()))).Instances?.[0]?.InstanceId ?? "";
        const w = await west.send(new RunInstancesCommand(runInput({ ClientToken: "same" })));
        assert.equal(w.Instances?.[0]?.Placement?.AvailabilityZone, "eu-west-1a");
        assert.equal(fake.getInstance(idEast)?.region, "us-east-1");
        assert.equal(fake.instancesIn("eu-west-1").length, 1);
        const westView = await west.send(new DescribeInstancesCommand({}));
        assert.deepEqual(
          westView.Reservations?.flatMap((r) => r.Instances?.map((i) => i.InstanceId)),
          [w.Instances?.[0]?.InstanceId],
        );
        const e = await sdkError(west.send(new DescribeInstancesCommand({ InstanceIds: [idEast] })));
        assert.equal(e.name, "InvalidInstanceID.NotFound");
        // ClientTokens are per region: the same token in us-east-1 launches anew.
        await east.send(new RunInstancesCommand(runInput({ ClientToken: "same" })));
        assert.equal(fake.createsByToken.get("same"), 2);
      } finally {
        west.destroy();
      }
    }));

  it("throttling at rate 1: RequestLimitExceeded/503 after the SDK's retries, every attempt counted", () =>
    withFake({ faults: { throttleRate: 1 } }, async (fake, ec2) => {
      const e = await sdkError(ec2.send(new DescribeInstancesCommand({})));
      assert.equal(e.name, "RequestLimitExceeded");
      assert.equal(e.$metadata.httpStatusCode, 503);
      assert.equal(e.$metadata.attempts, 3, "SDK default maxAttempts");
      assert.equal(fake.countCalls("DescribeInstances"), 3);
      assert.deepEqual(fake.calls.map((c) => [c.attempt, c.maxAttempts, c.status]), [[1, 3, 503], [2, 3, 503], [3, 3, 503]]);
      assert.equal(new Set(fake.calls.map((c) => c.invocationId)).size, 1);

      fake.resetCalls();
      const two = client(fake, { maxAttempts: 2 });
      try {
        const e2 = await sdkError(two.send(new RunInstancesCommand(runInput())));
        assert.equal(e2.name, "RequestLimitExceeded");
        assert.equal(fake.countCalls("RunInstances"), 2);
        assert.equal(fake.createdCount, 0, "throttled requests have no effect");
      } finally {
        two.destroy();
      }
    }));

  it("fractional fault rates come from the seeded PRNG: same seed, same outcome sequence", async () => {
    const pattern = async (seed: number): Promise<string> => {
      const fake = await Ec2Fake.start({ seed, faults: { throttleRate: 0.3, serverErrorRate: 0.2 } });
      const ec2 = client(fake, { maxAttempts: 1 });
      try {
        let s = "";
        for (let i = 0; i < 40; i++) {
          try {
            await ec2.send(new DescribeInstancesCommand({}));
            s += ".";
          } catch (e) {
            s += e instanceof Error && e.name === "RequestLimitExceeded" ? "T" : e instanceof Error && e.name === "InternalError" ? "E" : "?";
          }
        }
        return s;
      } finally {
        ec2.destroy();
        await fake.close();
      }
    };
    const a = await pattern(7);
    assert.equal(await pattern(7), a);
    assert.match(a, /T/);
    assert.match(a, /E/);
    assert.match(a, /\./);
    assert.doesNotMatch(a, /\?/);
  });

  it("server errors: InternalError/500 is retried by the SDK and surfaces with its code", () =>
    withFake({ faults: { serverErrorRate: 1 } }, async (fake, ec2) => {
      const e = await sdkError(ec2.send(new DescribeInstancesCommand({})));
      assert.equal(e.name, "InternalError");
      assert.equal(e.$metadata.httpStatusCode, 500);
      assert.equal(e.$fault, "server");
      assert.equal(fake.countCalls(), 3);
      fake.clearFaults();
      fake.failNext("DescribeInstances", "InternalError", 500);
      const ok = await ec2.send(new DescribeInstancesCommand({}));
      assert.equal(ok.$metadata.attempts, 2);
    }));

  it("capacity and limit errors on RunInstances surface with their codes", () =>
    withFake({}, async (fake, ec2) => {
      fake.faults.capacity = new Set(["p5.48xlarge"]);
      const cap = await sdkError(ec2.send(new RunInstancesCommand(runInput({ InstanceType: "p5.48xlarge" }))));
      assert.equal(cap.name, "InsufficientInstanceCapacity");
      assert.equal(cap.$metadata.httpStatusCode, 500);
      assert.equal(cap.$metadata.attempts, 3, "the SDK retries InsufficientInstanceCapacity (HTTP 500) by default");
      assert.match(cap.message, /sufficient p5\.48xlarge capacity/);
      assert.equal(fake.createdCount, 0);
      await ec2.send(new RunInstancesCommand(runInput({ InstanceType: "t3.micro" })));
      assert.equal(fake.createdCount, 1);

      fake.faults.capacity = (req) => (req.region === "us-east-1" && req.instanceType.startsWith("g5.") ? "VcpuLimitExceeded" : undefined);
      const vcpu = await sdkError(ec2.send(new RunInstancesCommand(runInput({ InstanceType: "g5.xlarge" }))));
      assert.equal(vcpu.name, "VcpuLimitExceeded");
      assert.equal(vcpu.$metadata.httpStatusCode, 400);
      assert.equal(vcpu.$metadata.attempts, 1);

      fake.faults.capacity = () => ({ code: "Unsupported", message: "The requested configuration is currently not supported." });
      const uns = await sdkError(ec2.send(new RunInstancesCommand(runInput())));
      assert.equal(uns.name, "Unsupported");
      assert.equal(uns.message, "The requested configuration is currently not supported.");

      fake.faults.capacity = undefined;
      fake.faults.instanceLimit = 3;
      const partial = await ec2.send(new RunInstancesCommand(runInput({ MinCount: 1, MaxCount: 5 })));
      assert.equal(partial.Instances?.length, 2, "launches up to the limit when >= MinCount fits");
      const lim = await sdkError(ec2.send(new RunInstancesCommand(runInput())));
      assert.equal(lim.name, "InstanceLimitExceeded");

      fake.faults.instanceLimit = undefined;
      fake.failNext("RunInstances", "UnauthorizedOperation", undefined, { message: "You are not authorized to perform this operation." });
      const unauth = await sdkError(ec2.send(new RunInstancesCommand(runInput())));
      assert.equal(unauth.name, "UnauthorizedOperation");
      assert.equal(unauth.$metadata.httpStatusCode, 403);
      await ec2.send(new RunInstancesCommand(runInput())); // one-shot: the next call goes through

      const dry = await sdkError(ec2.send(new RunInstancesCommand(runInput({ DryRun: true }))));
      assert.equal(dry.name, "DryRunOperation");
      assert.equal(dry.$metadata.httpStatusCode, 412);
    }));

  it("authentication: unknown access key -> AuthFailure/401, wrong secret -> SignatureDoesNotMatch/403", () =>
    withFake({}, async (fake) => {
      const stranger = client(fake, { credentials: { accessKeyId: "AKIAUNKNOWN000000000", secretAccessKey: "whatever" } });
      const wrongSecret = client(fake, { credentials: { accessKeyId: fake.credentials.accessKeyId, secretAccessKey: "not-the-secret" } });
      try {
        const e = await sdkError(stranger.send(new DescribeInstancesCommand({})));
        assert.equal(e.name, "AuthFailure");
        assert.equal(e.message, "AWS was not able to validate the provided access credentials");
        assert.equal(e.$metadata.httpStatusCode, 401);
        assert.equal(e.$metadata.attempts, 1);
        const s = await sdkError(wrongSecret.send(new RunInstancesCommand(runInput())));
        assert.equal(s.name, "SignatureDoesNotMatch");
        assert.equal(s.$metadata.httpStatusCode, 403);
        assert.equal(fake.createdCount, 0);
        assert.deepEqual(fake.calls.map((c) => [c.action, c.status, c.code]), [
          ["DescribeInstances", 401, "AuthFailure"],
          ["RunInstances", 403, "SignatureDoesNotMatch"],
        ]);
      } finally {
        stranger.destroy();
        wrongSecret.destroy();
      }
    }));

  describe("accessKeyIds option (no signature verification)", () => {
    let fake: Ec2Fake;
    before(async () => {
      fake = await Ec2Fake.start({ accessKeyIds: ["AKIAONLYIDCHECKED000"] });
    });
    after(() => fake.close());
    it("accepts any secret for a listed key id and rejects others", async () => {
      const ok = client(fake, { credentials: { accessKeyId: "AKIAONLYIDCHECKED000", secretAccessKey: "anything" } });
      const bad = client(fake, { credentials: FAKE_EC2_CREDENTIALS });
      try {
        await ok.send(new DescribeInstancesCommand({}));
        assert.equal((await sdkError(bad.send(new DescribeInstancesCommand({})))).name, "AuthFailure");
      } finally {
        ok.destroy();
        bad.destroy();
      }
    });
  });
});

describe("Ec2Fake: real-EC2 semantics (FIDELITY.md)", () => {
  const noRetry = { maxAttempts: 1 };

  it("request-rate limits: a bucket per (region, API class), refilled per second on the fake's clock; empty answers RequestLimitExceeded/503", () =>
    withFake({ faults: { rateLimits: { mutate: { bucket: 2, refillPerSecond: 1 } } } }, async (fake) => {
      const c = client(fake, noRetry);
      try {
        await c.send(new RunInstancesCommand(runInput()));
        await c.send(new RunInstancesCommand(runInput()));
        const err = await sdkError(c.send(new RunInstancesCommand(runInput())));
        assert.equal(err.name, "RequestLimitExceeded");
        assert.equal(err.$metadata.httpStatusCode, 503);
        assert.equal(fake.rateLimited, 1);
        // Another class and another region have their own buckets.
        await c.send(new DescribeInstancesCommand({}));
        const eu = client(fake, { ...noRetry, region: "eu-west-1" });
        await eu.send(new RunInstancesCommand(runInput()));
        eu.destroy();
        fake.advance(999);
        assert.equal((await sdkError(c.send(new TerminateInstancesCommand({ InstanceIds: [fake.instances[0]!.instanceId] })))).name, "RequestLimitExceeded");
        fake.advance(1);
        await c.send(new TerminateInstancesCommand({ InstanceIds: [fake.instances[0]!.instanceId] }));
        assert.equal(fake.createdCount, 3);
      } finally {
        c.destroy();
      }
    }));

  it("eventual consistency: right after launch the instance is NotFound for Describe-by-id, Terminate and GetConsoleOutput and absent from filters", () =>
    withFake({ faults: { consistencyDelayMs: 3000 } }, async (fake, ec2) => {
      const id = (await ec2.send(new RunInstancesCommand(runInput()))).Instances?.[0]?.InstanceId ?? "";
      assert.equal((await sdkError(ec2.send(new DescribeInstancesCommand({ InstanceIds: [id] })))).name, "InvalidInstanceID.NotFound");
      assert.equal((await sdkError(ec2.send(new TerminateInstancesCommand({ InstanceIds: [id] })))).name, "InvalidInstanceID.NotFound");
      assert.equal((await sdkError(ec2.send(new GetConsoleOutputCommand({ InstanceId: id })))).name, "InvalidInstanceID.NotFound");
      const filtered = await ec2.send(new DescribeInstancesCommand({ Filters: [{ Name: "instance-id", Values: [id] }] }));
      assert.deepEqual(filtered.Reservations, []);
      // It exists all the same (and bills): the NotFound did not terminate it.
      assert.equal(fake.getInstance(id)?.state, "running");
      fake.advance(3000);
      assert.equal((await describeOne(ec2, id)).State?.Name, "running");
      await ec2.send(new TerminateInstancesCommand({ InstanceIds: [id] }));
      assert.equal(fake.getInstance(id)?.state, "terminated");
    }));

  it("ClientToken of a failed launch stays bound to its parameters (IdempotentParameterMismatch for another type); the same parameters try again", () =>
    withFake({ faults: { capacity: new Set(["t3.micro"]) } }, async (fake, ec2) => {
      assert.equal((await sdkError(ec2.send(new RunInstancesCommand(runInput({ ClientToken: "tok-a" }))))).name, "InsufficientInstanceCapacity");
      const mismatch = await sdkError(ec2.send(new RunInstancesCommand(runInput({ ClientToken: "tok-a", InstanceType: "t3.large" }))));
      assert.equal(mismatch.name, "IdempotentParameterMismatch");
      const byToken = await ec2.send(new DescribeInstancesCommand({ Filters: [{ Name: "client-token", Values: ["tok-a"] }] }));
      assert.deepEqual(byToken.Reservations, [], "the client-token lookup finds no instance");
      fake.faults.capacity = undefined;
      const ok = await ec2.send(new RunInstancesCommand(runInput({ ClientToken: "tok-a" })));
      assert.equal(ok.Instances?.[0]?.InstanceType, "t3.micro");
      assert.equal(fake.createsByToken.get("tok-a"), 1);
    }));

  it("ClientToken of a terminated instance answers IdempotentInstanceTerminated instead of replaying it", () =>
    withFake({}, async (fake, ec2) => {
      const id = (await ec2.send(new RunInstancesCommand(runInput({ ClientToken: "tok-t" })))).Instances?.[0]?.InstanceId ?? "";
      await ec2.send(new TerminateInstancesCommand({ InstanceIds: [id] }));
      const err = await sdkError(ec2.send(new RunInstancesCommand(runInput({ ClientToken: "tok-t" }))));
      assert.equal(err.name, "IdempotentInstanceTerminated");
      assert.equal(err.$metadata.httpStatusCode, 400);
      assert.equal(fake.createdCount, 1);
    }));

  it("GetConsoleOutput returns only the last 64 KB; terminated instances vanish after terminatedVisibleMs", () =>
    withFake({}, async (fake, ec2) => {
      const id = (await ec2.send(new RunInstancesCommand(runInput()))).Instances?.[0]?.InstanceId ?? "";
      fake.appendConsole(id, `FIRST LINE\n${"x".repeat(70 * 1024)}\nLAST LINE\n`);
      const out = Buffer.from((await ec2.send(new GetConsoleOutputCommand({ InstanceId: id }))).Output ?? "", "base64").toString("utf8");
      assert.equal(Buffer.byteLength(out), 64 * 1024);
      assert.ok(out.endsWith("LAST LINE\n"));
      assert.ok(!out.includes("FIRST LINE"));
      await ec2.send(new TerminateInstancesCommand({ InstanceIds: [id] }));
      fake.advance(3_599_999);
      assert.equal((await describeOne(ec2, id)).State?.Name, "terminated");
      fake.advance(1);
      assert.equal((await sdkError(ec2.send(new DescribeInstancesCommand({ InstanceIds: [id] })))).name, "InvalidInstanceID.NotFound");
      const all = await ec2.send(new DescribeInstancesCommand({}));
      assert.deepEqual(all.Reservations, []);
    }));
});
