/**
 * The Azure backend against the ARM fake (test/fakes/arm.ts) over https, with the REAL
 * @azure/arm-compute / @azure/arm-network clients. Nothing but 127.0.0.1 is contacted: the
 * credential is the fake's (or, in one test, a real ClientSecretCredential against a local
 * authority); no ambient Azure credential chain is ever used.
 *
 * Run: node --import tsx --test test/backends/azure.test.ts
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import net, { type AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { Writable } from "node:stream";
import { after, before, describe, it, type TestContext } from "node:test";
import { pathToFileURL } from "node:url";
import { ComputeManagementClient } from "@azure/arm-compute";
import { NetworkManagementClient } from "@azure/arm-network";
import { AzureBackend, type AzureBackendOptions } from "../../src/backends/azure.js";
import { ConfidentialImageError } from "../../src/backends/azure/errors.js";
import { azureNaming, TAG_CREATED, TAG_PROVIDER, TAG_REQUEST } from "../../src/backends/azure/naming.js";
import { UnfitError } from "../../src/backends/cloud/adapter.js";
import { CapacityError, CredentialError, InvalidRequestError, QuotaError, TransientError, type BackendContext } from "../../src/backends/backend.js";
import { exitMarker, failMarker } from "../../src/backends/common/cloud-init.js";
import { OfferingCache } from "../../src/backends/offering-cache.js";
import { createBackend } from "../../src/backends/registry.js";
import { AzureConfig, type BootConfig } from "../../src/config/schema.js";
import type { ComputeGrant, Envelope } from "../../src/domain/index.js";
import { Fleet } from "../../src/fleet/fleet.js";
import { placeholder } from "../../src/lifecycle/manager.js";
import { systemClock } from "../../src/util/clock.js";
import { createLogger } from "../../src/util/logger.js";
import { ArmFake, fakeTokenCredential, type ArmFakeOptions, type ResourceType } from "../fakes/arm.js";
import { makeTestCert, type TestCert } from "../fakes/tls.js";
import { until } from "../helpers/http.js";
import { testBridge } from "../helpers/lifecycle.js";
import { bundleImage } from "../helpers/images.js";
import { localBackend, loopbackImages, MS_ALMANAC } from "../helpers/local.js";
import { tempDir } from "../helpers/tmp.js";

const RG = "rg-test";
const REGION = "westeurope";
const PROVIDER = "test-provider";
const naming = azureNaming(PROVIDER);
const never = new AbortController().signal;
/**
 * Ceiling per suite: each suite takes seconds on an idle machine; the ceiling only ends a hung one,
 * and must hold on a machine shared with other heavy work (issue #17: 6 tests were cancelled at
 * 45 s suite ceilings at a load average of 30 on 2 cores).
 */
const SUITE_TIMEOUT_MS = 300_000;
const TYPES: ResourceType[] = ["virtualMachines", "networkInterfaces", "publicIPAddresses", "disks"];
const IMAGE = { url: "https://127.0.0.1:9/image.tar.gz", sha256: "ab".repeat(32), format: "bundle" as const };
const SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq3cmOuAVBuSBXcXwmzR3eB7pKxGiM9NeBKf0PrTZ9o test";

let cert: TestCert;
let caFile: string;
let sshPort: number;
const closers: (() => Promise<void> | void)[] = [];

before(async () => {
  cert = await makeTestCert();
  // Production trusts a private endpoint's CA through ca_file; the tests trust the fake's that way.
  const caDir = mkdtempSync(path.join(os.tmpdir(), "azure-ca-"));
  caFile = path.join(caDir, "fake-ca.pem");
  writeFileSync(caFile, cert.ca);
  closers.push(() => rmSync(caDir, { recursive: true, force: true }));
  // The readiness probe only needs a banner: a tiny TCP server stands in for the guest's sshd.
  const sshd = net.createServer((s) => s.end("SSH-2.0-OpenSSH_9.2p1 azure-test\r\n"));
  await new Promise<void>((r) => sshd.listen(0, "127.0.0.1", r));
  sshPort = (sshd.address() as AddressInfo).port;
  closers.push(() => new Promise<void>((r) => sshd.close(() => r())));
});

after(async () => {
  for (const c of closers.reverse()) await c();
});

/** Captures JSON log lines (to check that no secret is ever logged). */
class LogSink extends Writable {
  lines: string[] = [];
  override _write(chunk: Buffer, _enc: string, cb: () => void) {
    this.lines.push(...chunk.toString().split("\n").filter(Boolean));
    cb();
  }
  get text() {
    return this.lines.join("\n");
  }
  /** The parsed lines logged at `level` whose message matches `msg`. */
  find(level: string, msg: RegExp): Record<string, unknown>[] {
    return this.lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l["level"] === level && msg.test(String(l["msg"])));
  }
}

async function startFake(opts: ArmFakeOptions = {}): Promise<ArmFake> {
  const fake = await ArmFake.start({ tls: cert, seed: 7, ...opts });
  closers.push(() => fake.close());
  return fake;
}

function config(fake: ArmFake, over: Record<string, unknown> = {}): AzureConfig {
  return AzureConfig.parse({
    subscription_id: fake.subscriptionId,
    resource_group: RG,
    regions: [REGION],
    vm_sizes: [
      { name: "Standard_D4s_v5", vcpus: 4, memory_mib: 16384 },
      { name: "Standard_D2s_v5", vcpus: 2, memory_mib: 8192 },
    ],
    tdx_vm_sizes: [{ name: "Standard_DC4es_v5", vcpus: 4, memory_mib: 16384 }],
    max_concurrent_instances: 10,
    image: { publisher: "Canonical", offer: "ubuntu-24_04-lts", sku: "server", version: "latest" },
    confidential_image: { publisher: "Canonical", offer: "0001-com-ubuntu-confidential-vm-jammy", sku: "22_04-lts-cvm" },
    subnet_id: `/subscriptions/${fake.subscriptionId}/resourceGroups/${RG}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/default`,
    managed_identity: true,
    endpoint: fake.endpoint,
    ca_file: caFile,
    poll_interval_seconds: 0.01,
    launch_timeout_seconds: 30,
    ready_timeout_seconds: 10,
    orphan_grace_seconds: 0,
    reconcile_interval_seconds: 0.001,
    ssh_port: sshPort,
    ...over,
  });
}

interface Setup {
  fake: ArmFake;
  backend: AzureBackend;
  cfg: AzureConfig;
  ctx: BackendContext;
  logs: LogSink;
  dir: string;
}

async function setup(t: TestContext, o: { fake?: ArmFake; fakeOpts?: ArmFakeOptions; cfg?: Record<string, unknown>; backend?: AzureBackendOptions; unavailable?: OfferingCache } = {}): Promise<Setup> {
  const fake = o.fake ?? (await startFake(o.fakeOpts));
  const dir = tempDir(t);
  const logs = new LogSink();
  const ctx: BackendContext = {
    providerId: PROVIDER,
    stateDir: dir,
    configDir: dir,
    log: createLogger("debug", logs),
    clock: systemClock,
    almanac: MS_ALMANAC,
    unavailable: o.unavailable ?? new OfferingCache(60_000, systemClock),
  };
  const cfg = config(fake, o.cfg);
  const backend = new AzureBackend(cfg, ctx, { credential: fake.credential(), retryDelayInMs: 1, ...o.backend });
  t.after(() => backend.close());
  return { fake, backend, cfg, ctx, logs, dir };
}

function grant(id: string, over: Partial<ComputeGrant> = {}): ComputeGrant {
  return { request_id: id, region: REGION, tdx_required: false, cpu_millicores: 2000, ram_mib: 4096, valid_to: Date.now() + 120_000, ...over };
}

const envelope: Envelope = { image: IMAGE, ssh_public_key: SSH_KEY };

async function rejection(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (e) {
    return e as Error;
  }
  assert.fail("expected a rejection");
}

function leftovers(fake: ArmFake, hash?: string): string[] {
  return TYPES.flatMap((t) => fake.list(t, RG).map((r) => `${t}/${String(r["name"])}`)).filter((n) => !hash || n.includes(hash));
}

function vmBody(fake: ArmFake, name: string) {
  const bodies = fake.receivedBodies("virtualMachines", name);
  assert.ok(bodies.length > 0, `no PUT body for VM ${name}`);
  return bodies.at(-1)!;
}

/** GrantManager + Store + Fleet wired as in src/daemon.ts, over the given backends. */
function lifecycle(t: TestContext, dir: string, backends: Parameters<typeof Fleet.of>[0], unavailable: OfferingCache, logs = new LogSink()) {
  return testBridge(t, { stateDir: path.join(dir, "state"), fleet: new Fleet(backends, unavailable), almanac: MS_ALMANAC, providerId: PROVIDER, log: createLogger("debug", logs), persistentIdentity: true, retryBaseMs: 10, retryCapMs: 200 });
}

// =================================================================================================

describe("azure backend: card and routing (no SDK, no I/O)", { timeout: SUITE_TIMEOUT_MS }, () => {
  it("declares its capabilities; TDX only with real TDX sizes; decline codes", async (t) => {
    const { backend, fake, ctx, cfg } = await setup(t);
    assert.deepEqual(backend.capabilities(), { regions: [REGION], tdx_capable: true, max_cpu_millicores: cfg.max_concurrent_instances * 4000, max_ram_mib: cfg.max_concurrent_instances * 16384 });
    const plainOnly = new AzureBackend({ ...cfg, tdx_vm_sizes: [], confidential_image: undefined }, ctx, { credential: fake.credential() });
    assert.equal(plainOnly.capabilities().tdx_capable, false);
    // Even a config that bypassed the schema cannot make an SEV-SNP size count as TDX.
    const sneaky = new AzureBackend({ ...cfg, tdx_vm_sizes: [{ name: "Standard_DC4as_v5", vcpus: 4, memory_mib: 16384 }] }, ctx, { credential: fake.credential() });
    assert.equal(sneaky.capabilities().tdx_capable, false);

    assert.equal(backend.canSatisfy(grant("a")).ok, true);
    assert.equal(backend.canSatisfy(grant("a", { tdx_required: true })).ok, true);
    const code = (g: ComputeGrant, b = backend) => {
      const s = b.canSatisfy(g);
      return s.ok ? "ok" : s.code;
    };
    assert.equal(code(grant("a", { region: "eastus" })), "region_not_served");
    assert.equal(code(grant("a", { tdx_required: true }), plainOnly), "tdx_not_supported");
    assert.equal(code(grant("a", { cpu_millicores: 8000 })), "too_large");
    assert.equal(code(grant("a", { tdx_required: true, ram_mib: 32768 })), "too_large");
    ctx.unavailable.markUnavailable("azure", REGION, "Standard_DC4es_v5");
    assert.equal(code(grant("a", { tdx_required: true })), "offering_unavailable");
    assert.equal(code(grant("a")), "ok", "plain sizes are still available");
    const one = new AzureBackend({ ...cfg, max_concurrent_instances: 1 }, ctx, { credential: fake.credential() });
    assert.equal(code(grant("a"), one), "ok");
    assert.equal(fake.calls.length, 0, "capabilities and canSatisfy make no ARM call");
  });

  it("the registry builds it lazily; capabilities and canSatisfy never load an Azure SDK", async (t) => {
    const { fake, ctx, cfg } = await setup(t);
    const viaRegistry = await createBackend("azure", { backends: { azure: cfg } } as unknown as BootConfig, ctx);
    assert.ok(viaRegistry instanceof AzureBackend);
    await viaRegistry.close?.();

    // In a fresh process, record every @azure/* module resolution.
    const dir = tempDir(t);
    const record = path.join(dir, "resolved.txt");
    writeFileSync(record, "");
    const hook = path.join(dir, "hook.mjs");
    writeFileSync(hook, `import { appendFileSync } from "node:fs";\nexport async function resolve(s, c, next) { if (s.startsWith("@azure/")) appendFileSync(${JSON.stringify(record)}, s + "\\n"); return next(s, c); }\n`);
    const register = path.join(dir, "register.mjs");
    writeFileSync(register, `import { register } from "node:module";\nregister(${JSON.stringify(pathToFileURL(hook).href)});\n`);
    const script = path.join(dir, "probe.ts");
    const src = (p: string) => JSON.stringify(pathToFileURL(path.resolve(p)).href);
    writeFileSync(
      script,
      `import { AzureBackend } from ${src("src/backends/azure.ts")};
import { OfferingCache } from ${src("src/backends/offering-cache.ts")};
import { Almanac } from ${src("src/domain/index.ts")};
import { createLogger } from ${src("src/util/logger.ts")};
import { systemClock } from ${src("src/util/clock.ts")};
const cfg = ${JSON.stringify(config(fake))};
const b = new AzureBackend(cfg, { providerId: "p", stateDir: "/tmp", configDir: "/tmp", log: createLogger("silent"), clock: systemClock, almanac: new Almanac(new Date(0), 1), unavailable: new OfferingCache(1000, systemClock) });
const g = { request_id: "x", region: "westeurope", tdx_required: true, cpu_millicores: 1000, ram_mib: 1024, valid_to: 1e12 };
console.log(JSON.stringify({ caps: b.capabilities(), sat: b.canSatisfy(g) }));
`,
    );
    const r = spawnSync(process.execPath, ["--import", "tsx", "--import", pathToFileURL(register).href, script], { encoding: "utf8", timeout: 120_000 });
    assert.equal(r.status, 0, r.stderr);
    const out = JSON.parse(r.stdout.trim().split("\n").at(-1)!);
    assert.equal(out.caps.tdx_capable, true);
    assert.equal(out.sat.ok, true);
    assert.equal(readFileSync(record, "utf8"), "", "no @azure/* module was resolved");
  });
});

describe("azure backend: provisioning", { timeout: SUITE_TIMEOUT_MS }, () => {
  it("plain VM: deterministic names, tags, base64 boot script, delete options, no security profile", async (t) => {
    const { fake, backend } = await setup(t);
    const id = "job.1_A"; // `.` and `_` are fine in request ids, not in Azure names
    const n = naming.names(id);
    const inst = await backend.provision(grant(id), envelope, never);
    assert.equal(inst.instance_id, n.vm);
    assert.match(n.vm, /^[a-z0-9-]{1,64}$/);
    assert.ok(n.osDisk.length <= 80 && n.nic.length <= 80 && n.pip.length <= 80);
    assert.equal(inst.host, "127.0.0.1");
    assert.equal(inst.ssh_port, sshPort);
    assert.equal(inst.ssh_user, "computebridge");
    assert.equal(inst.details["vm_size"], "Standard_D2s_v5", "the smallest fitting plain size");
    assert.equal(inst.details["confidential"], "false");

    const body = vmBody(fake, n.vm);
    const p = body["properties"];
    assert.deepEqual(body["tags"], { [TAG_PROVIDER]: PROVIDER, [TAG_REQUEST]: id, [TAG_CREATED]: body["tags"][TAG_CREATED] });
    assert.equal(p["hardwareProfile"]["vmSize"], "Standard_D2s_v5");
    assert.equal(p["securityProfile"], undefined);
    assert.equal(p["storageProfile"]["osDisk"]["name"], n.osDisk);
    assert.equal(p["storageProfile"]["osDisk"]["deleteOption"], "Delete");
    assert.equal(p["storageProfile"]["osDisk"]["managedDisk"]["securityProfile"], undefined);
    assert.equal(p["storageProfile"]["imageReference"]["offer"], "ubuntu-24_04-lts");
    assert.deepEqual(p["networkProfile"]["networkInterfaces"][0]["properties"], { primary: true, deleteOption: "Delete" });
    assert.equal(p["diagnosticsProfile"]["bootDiagnostics"]["enabled"], true);
    assert.equal(p["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["keyData"], SSH_KEY);
    const script = Buffer.from(p["osProfile"]["customData"], "base64").toString("utf8");
    assert.match(script, /^#!\/bin\/sh\n/);
    assert.ok(script.includes(`CB_REQUEST_ID='${id}'`));
    assert.ok(script.includes(`CB_IMAGE_SHA256='${IMAGE.sha256}'`));

    const pip = fake.receivedBodies("publicIPAddresses", n.pip)[0]!;
    assert.equal(pip["sku"]["name"], "Standard");
    assert.equal(pip["properties"]["publicIPAllocationMethod"], "Static");
    assert.equal(pip["tags"][TAG_REQUEST], id);
    const nic = fake.receivedBodies("networkInterfaces", n.nic)[0]!;
    assert.equal(nic["tags"][TAG_REQUEST], id);
    assert.match(nic["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"], /subnets\/default$/);
    assert.equal(nic["properties"]["ipConfigurations"][0]["properties"]["publicIPAddress"]["properties"]["deleteOption"], "Delete");
    assert.deepEqual(fake.createsByName, { [n.vm]: 1 });

    // A second provision (a retry) adopts: no new resource, no second PUT of anything.
    const puts = fake.countCalls({ method: "PUT" });
    const again = await backend.provision(grant(id), envelope, never);
    assert.equal(again.instance_id, inst.instance_id);
    assert.equal(fake.countCalls({ method: "PUT" }), puts);

    await backend.terminate(inst);
    assert.deepEqual(leftovers(fake), []);
  });

  it("confidential TDX VM: securityProfile and disk encryption in the PUT body; a power-off without a marker is lost", async (t) => {
    const { fake, backend } = await setup(t);
    const id = "tdx-1";
    const n = naming.names(id);
    const inst = await backend.provision(grant(id, { tdx_required: true }), envelope, never);
    assert.equal(inst.details["confidential"], "true");
    const p = vmBody(fake, n.vm)["properties"];
    assert.equal(p["hardwareProfile"]["vmSize"], "Standard_DC4es_v5");
    assert.deepEqual(p["securityProfile"], { securityType: "ConfidentialVM", uefiSettings: { secureBootEnabled: true, vTpmEnabled: true } });
    assert.deepEqual(p["storageProfile"]["osDisk"]["managedDisk"]["securityProfile"], { securityEncryptionType: "DiskWithVMGuestState" });
    assert.equal(p["storageProfile"]["imageReference"]["sku"], "22_04-lts-cvm");
    assert.match(fake.serialLog(RG, n.vm) ?? "", /Memory Encryption Features active: Intel TDX/);

    // The guest powers off without printing a marker. Azure does not tell a guest's own power-off
    // from a stop by someone else, so without a marker the workload is lost (the same rule as on
    // every cloud that cannot tell: cloud/vm-backend.ts).
    const watch = backend.watchUntilExit(inst, new Date(Date.now() + 60_000), never);
    fake.guestPowerOff(RG, n.vm);
    const obs = await watch;
    assert.equal(obs.kind, "lost");
    assert.equal(obs.exit_code, null);
    assert.equal(obs.failure?.kind, "lost");
    assert.match(obs.failure?.message ?? "", /reported no exit code/);
    await backend.terminate(inst);
    assert.deepEqual(leftovers(fake), []);
  });

  it("quota (OperationNotAllowed) -> QuotaError with the offering, no other size tried; SkuNotAvailable -> every fitting size, then CapacityError; nothing left after terminate", async (t) => {
    const { fake, backend, ctx } = await setup(t);
    fake.faults.allocationFailure = () => "QuotaExceeded";
    const q = await rejection(backend.provision(grant("q-1"), envelope, never));
    assert.ok(q instanceof QuotaError, String(q));
    assert.deepEqual(q.offering, { region: REGION, shape: "Standard_D2s_v5" });
    assert.match(q.message, /OperationNotAllowed/);
    assert.match(q.message, /quota/);
    assert.deepEqual(fake.countCalls({ method: "PUT", path: /virtualMachines\// }), 1, "a quota refusal fails over at once");
    await backend.terminate(placeholder(grant("q-1"), "azure"));
    assert.deepEqual(leftovers(fake), []);

    // No capacity: every fitting size is tried (plain ones first, smallest first), then the
    // CapacityError names each attempt and carries the last offering.
    fake.faults.allocationFailure = () => "SkuNotAvailable";
    const s = await rejection(backend.provision(grant("s-1"), envelope, never));
    assert.ok(s instanceof CapacityError, String(s));
    assert.deepEqual(s.offering, { region: REGION, shape: "Standard_DC4es_v5" });
    assert.match(s.message, /Standard_D2s_v5: .*SkuNotAvailable.*Standard_D4s_v5: .*SkuNotAvailable.*Standard_DC4es_v5: .*SkuNotAvailable/);
    for (const size of ["Standard_D2s_v5", "Standard_D4s_v5", "Standard_DC4es_v5"]) assert.ok(ctx.unavailable.isUnavailable("azure", REGION, size), size);
    await backend.terminate(placeholder(grant("s-1"), "azure"));
    assert.deepEqual(leftovers(fake), []);
  });

  for (const style of ["azure-async-operation", "location"] as const) {
    it(`AllocationFailed / ZonalAllocationFailed / Overconstrained in the create LRO (${style}) -> CapacityError`, async (t) => {
      const fake = await startFake({ createLroStyle: style });
      for (const code of ["AllocationFailed", "ZonalAllocationFailed", "OverconstrainedAllocationRequest"] as const) {
        // A fresh offering cache each time: every size is tried again.
        const { backend } = await setup(t, { fake });
        fake.faults.allocationFailure = () => code;
        const id = `alloc-${code}`;
        const e = await rejection(backend.provision(grant(id), envelope, never));
        assert.ok(e instanceof CapacityError, `${code}: ${String(e)}`);
        assert.match(e.message, new RegExp(`Standard_D2s_v5: .*${code}.*Standard_D4s_v5: .*${code}.*Standard_DC4es_v5: .*${code}`));
        assert.deepEqual(e.offering, { region: REGION, shape: "Standard_DC4es_v5" }, "the last size tried");
        // One VM name per request: the VM left Failed by one size is deleted before the next size is PUT.
        assert.deepEqual(fake.createsByName, { ...fake.createsByName, [naming.names(id).vm]: 3 });
        await backend.terminate(placeholder(grant(id), "azure"));
      }
      assert.deepEqual(leftovers(fake), []);
    });
  }

  it("401 -> CredentialError naming the config, never the token; token errors too", async (t) => {
    const token = "not-the-right-token-0123456789abcdef";
    const { backend, fake } = await setup(t, { backend: { credential: fakeTokenCredential(token) } });
    const e = await rejection(backend.provision(grant("cred-1"), envelope, never));
    assert.ok(e instanceof CredentialError, String(e));
    assert.match(e.message, /HTTP 401 InvalidAuthenticationToken/);
    assert.match(e.message, /tenant_id/);
    assert.ok(!e.message.includes(token));
    assert.equal(fake.list("virtualMachines").length, 0);

    const failing = {
      getToken: async () => {
        throw Object.assign(new Error("ClientSecretCredential authentication failed: AADSTS7000215: Invalid client secret provided."), { name: "AuthenticationError" });
      },
    };
    const { backend: b2 } = await setup(t, { fake, backend: { credential: failing } });
    const e2 = await rejection(b2.provision(grant("cred-2"), envelope, never));
    assert.ok(e2 instanceof CredentialError, String(e2));
    assert.match(e2.message, /could not get an access token.*AADSTS7000215/);
  });

  it("rejects what a VM cannot run with InvalidRequestError (file:// image, disk format)", async (t) => {
    const { backend, fake } = await setup(t);
    for (const image of [{ ...IMAGE, url: "file:///etc/passwd" }, { ...IMAGE, format: "disk" as const }]) {
      const e = await rejection(backend.provision(grant("bad-img"), { ...envelope, image }, never));
      assert.ok(e instanceof InvalidRequestError, String(e));
    }
    assert.equal(fake.calls.length, 0);
  });

  it("429 with Retry-After is honoured: retried at once, not after the exponential back-off; endless throttling -> TransientError", async (t) => {
    // A 5 s base delay: a retry that ignored Retry-After (0 here) would take at least 2.5 s.
    const { fake, backend } = await setup(t, { backend: { retryDelayInMs: 5000 } });
    const id = "throttled-1";
    const n = naming.names(id);
    fake.failNext("PUT", new RegExp(`virtualMachines/${n.vm}$`), 429, "SubscriptionRequestsThrottled", "Number of 'write' requests exceeded. Please try again after '0' seconds.", 2);
    fake.failNext("GET", /\/networkInterfaces\//, 429, "SubscriptionRequestsThrottled", "slow down", 1);
    const t0 = Date.now();
    await backend.provision(grant(id), envelope, never);
    assert.ok(Date.now() - t0 < 2000, `took ${Date.now() - t0} ms`);
    assert.equal(fake.countCalls({ method: "PUT", path: new RegExp(`virtualMachines/${n.vm}$`), status: 429 }), 2);
    assert.equal(fake.countCalls({ method: "PUT", path: new RegExp(`virtualMachines/${n.vm}$`), status: 201 }), 1);
    assert.deepEqual(fake.createsByName, { [n.vm]: 1 });

    fake.faults.throttleRate = 1;
    const e = await rejection(backend.provision(grant("throttled-2"), envelope, never));
    fake.faults.throttleRate = 0;
    assert.ok(e instanceof TransientError, String(e));
    assert.match(e.message, /HTTP 429 SubscriptionRequestsThrottled/);
  });

  it("a workload that ends before SSH answers still provisions; the marker gives its exit code", async (t) => {
    const closed = net.createServer();
    await new Promise<void>((r) => closed.listen(0, "127.0.0.1", r));
    const deadPort = (closed.address() as AddressInfo).port;
    await new Promise<void>((r) => closed.close(() => r()));
    const { fake, backend } = await setup(t, { cfg: { ssh_port: deadPort } });
    const id = "quick-1";
    const n = naming.names(id);
    const p = backend.provision(grant(id), envelope, never);
    await until(() => fake.powerState(RG, n.vm) === "running", "the VM to run");
    fake.guestPowerOff(RG, n.vm, `${exitMarker(id, 4, 0.75)}\n`);
    const inst = await p;
    // The guest did report its host key, but a VM that is already off is not waited on for it.
    assert.equal(inst.host_key_sha256, null);
    assert.equal(fake.countCalls({ path: /retrieveBootDiagnosticsData$/i }), 0, "no serial console read while provisioning");
    const obs = await backend.watchUntilExit(inst, new Date(Date.now() + 60_000), never);
    assert.deepEqual([obs.kind, obs.exit_code, obs.cpu_seconds], ["exited", 4, 0.75]);
    await backend.terminate(inst);
  });
});

describe("azure backend: real ARM pacing (issue #18 item 5)", { timeout: SUITE_TIMEOUT_MS }, () => {
  it("real ARM Retry-After seconds are waited out by the SDK, inside launch_timeout_seconds", async (t) => {
    const { fake, backend } = await setup(t);
    fake.faults.retryAfterSeconds = 1;
    const n = naming.names("ra-1");
    fake.failNext("PUT", new RegExp(`virtualMachines/${n.vm}$`), 429, "SubscriptionRequestsThrottled", "Number of 'write' requests exceeded. Please try again after '1' seconds.", 1);
    const t0 = Date.now();
    const inst = await backend.provision(grant("ra-1"), envelope, never);
    assert.ok(Date.now() - t0 >= 1000, "the 429's Retry-After: 1 was honoured");
    assert.deepEqual(fake.createsByName, { [n.vm]: 1 });
    fake.faults.retryAfterSeconds = 0;
    await backend.terminate(inst);

    // A Retry-After longer than what is left of the launch deadline: the launch ends at the deadline, not after the wait.
    const { fake: f2, backend: b2 } = await setup(t, { cfg: { launch_timeout_seconds: 2 } });
    f2.faults.retryAfterSeconds = 30;
    f2.failNext("PUT", /publicIPAddresses\//, 429, "SubscriptionRequestsThrottled", "Please try again after '30' seconds.", 1);
    const t1 = Date.now();
    const e = await rejection(b2.provision(grant("ra-2"), envelope, never));
    assert.ok(Date.now() - t1 < 10_000, `ended at the deadline (${Date.now() - t1} ms)`);
    assert.match(e.message, /launch_timeout_seconds \(2 s\)/);
  });
});

describe("azure backend: the guest's SSH host key", { timeout: SUITE_TIMEOUT_MS }, () => {
  const bootDiagReads = (fake: ArmFake) => fake.countCalls({ method: "POST", path: /retrieveBootDiagnosticsData$/i });
  const serialGets = (fake: ArmFake) => fake.countCalls({ method: "GET", kind: "blob", path: /serialconsole\.log$/i });
  const hostKeyWarnings = (logs: LogSink) => logs.find("warn", /no SSH host key fingerprint/);

  it("host_key_sha256 is the fingerprint the guest reported on its serial console (one read, nothing logged)", async (t) => {
    const { fake, backend, logs } = await setup(t);
    const id = "hk-1";
    const n = naming.names(id);
    const inst = await backend.provision(grant(id), envelope, never);
    const expected = fake.hostKeyFingerprint(RG, n.vm);
    assert.match(expected, /^SHA256:[A-Za-z0-9+/]{43}$/);
    assert.equal(inst.host_key_sha256, expected);
    assert.ok((fake.serialLog(RG, n.vm) ?? "").includes(`COMPUTE-BRIDGE-HOSTKEY ${id} ${expected}`));
    // The guest had reported by the time SSH answered: a single boot-diagnostics round trip.
    assert.equal(bootDiagReads(fake), 1);
    assert.equal(serialGets(fake), 1);
    assert.deepEqual(hostKeyWarnings(logs), []);

    // Adopted by a retried provision: the same report, read again.
    const again = await backend.provision(grant(id), envelope, never);
    assert.equal(again.host_key_sha256, expected);
    await backend.terminate(inst);
  });

  it("a guest that reports no ed25519 host key: null at once, still provisioned, a warning says why", async (t) => {
    // A long timeout (20 s): returning well before it shows the "none" report ended the wait.
    const { fake, backend, logs } = await setup(t, { cfg: { host_key_timeout_seconds: 20 } });
    const id = "hk-none";
    const n = naming.names(id);
    fake.guestHostKey(RG, n.vm, "none");
    const t0 = Date.now();
    const inst = await backend.provision(grant(id), envelope, never);
    assert.ok(Date.now() - t0 < 10_000, `took ${Date.now() - t0} ms`);
    assert.equal(inst.host_key_sha256, null);
    assert.equal(inst.instance_id, n.vm);
    assert.equal(fake.powerState(RG, n.vm), "running");
    assert.equal(bootDiagReads(fake), 1);
    const warned = hostKeyWarnings(logs);
    assert.equal(warned.length, 1, logs.text);
    assert.equal(warned[0]!["request_id"], id);
    assert.equal(warned[0]!["instance_id"], n.vm);
    assert.match(String(warned[0]!["reason"]), /no ed25519 SSH host key/);

    // The grant runs on: through the manager it reaches running with no host key.
    const s2 = await setup(t, { fake, cfg: { host_key_timeout_seconds: 20 } });
    const { manager, store } = await lifecycle(t, s2.dir, [s2.backend], s2.ctx.unavailable);
    const id2 = "hk-none-2";
    fake.guestHostKey(RG, naming.names(id2).vm, "none");
    await manager.submit({ grant: grant(id2), envelope: { image: IMAGE } });
    await until(async () => (await store.get(id2))?.state === "running", "the grant to run");
    assert.equal((await store.get(id2))?.instance?.host_key_sha256, null);
    await manager.cancel(id2);
    await manager.settled(id2);
    await backend.terminate(inst);
  });

  it("a guest that never reports: null after host_key_timeout_seconds, still provisioned; a missing log blob is empty text, not an error", async (t) => {
    const { fake, backend, logs } = await setup(t, { cfg: { host_key_timeout_seconds: 0.4 } });
    const id = "hk-never";
    const n = naming.names(id);
    fake.guestHostKey(RG, n.vm, "never");
    // Storage has no log blob for the VM (yet): every GET of it is a 404 BlobNotFound.
    fake.failNext("GET", /serialconsole\.log$/i, 404, "BlobNotFound", "The specified blob does not exist.", 1_000);
    const t0 = Date.now();
    const inst = await backend.provision(grant(id), envelope, never);
    const took = Date.now() - t0;
    assert.equal(inst.host_key_sha256, null);
    assert.equal(fake.powerState(RG, n.vm), "running");
    assert.ok(took >= 400, `gave up after ${took} ms, before host_key_timeout_seconds`);
    assert.ok(bootDiagReads(fake) >= 2, `the console was read ${bootDiagReads(fake)} time(s)`);
    const warned = hostKeyWarnings(logs);
    assert.equal(warned.length, 1, logs.text);
    assert.equal(warned[0]!["instance_id"], n.vm);
    // An empty console (not a failing read) is what timed out.
    assert.match(String(warned[0]!["reason"]), /reported no SSH host key on its serial console within/);
    fake.clearFailNext();
    await backend.terminate(inst);
  });

  it("throttled and failing serial console reads are retried: the fingerprint is still found", async (t) => {
    const { fake, backend, logs } = await setup(t);
    const id = "hk-flaky";
    const n = naming.names(id);
    // More 429s (Retry-After: 0) than the SDK's own 3 retries: the first read fails as a whole.
    fake.failNext("POST", /retrieveBootDiagnosticsData$/i, 429, "SubscriptionRequestsThrottled", "Number of 'write' requests exceeded. Please try again after '0' seconds.", 4);
    // Then storage fails the blob GET twice.
    fake.failNext("GET", /serialconsole\.log$/i, 503, "ServerBusy", "The server is busy.", 2);
    const inst = await backend.provision(grant(id), envelope, never);
    assert.equal(inst.host_key_sha256, fake.hostKeyFingerprint(RG, n.vm));
    assert.equal(fake.countCalls({ method: "POST", path: /retrieveBootDiagnosticsData$/i, status: 429 }), 4);
    assert.equal(fake.countCalls({ method: "GET", kind: "blob", status: 503 }), 2);
    assert.equal(serialGets(fake), 3, "two failed blob reads, then the one that found the report");
    assert.deepEqual(hostKeyWarnings(logs), []);
    await backend.terminate(inst);
  });

  it("failing serial log reads after a power-off do not use up the marker's grace: the exit code is still read; MARKER_READ_ERRORS failures in a row end the watch with the error", async (t) => {
    const { fake, backend } = await setup(t);
    const watchOf = async (id: string, failures: number) => {
      const inst = await backend.provision(grant(id), envelope, never);
      const watch = backend.watchUntilExit(inst, new Date(Date.now() + 60_000), never);
      // The grace is two polls (the blob lags the guest): four failed reads and the polls between them outlast it.
      fake.failNext("GET", new RegExp(`${naming.names(id).vm}\\.[^/]*serialconsole\\.log$`, "i"), 503, "ServerBusy", "The server is busy.", failures);
      fake.guestPowerOff(RG, naming.names(id).vm, `${exitMarker(id, 6)}\n`);
      return { inst, watch };
    };
    // Four failed reads, then one that works: the marker is there, so the workload exited 6 (not lost).
    const a = await watchOf("marker-flaky", 4);
    const obs = await a.watch;
    assert.deepEqual([obs.kind, obs.exit_code, obs.failure], ["exited", 6, null]);
    assert.equal(fake.countCalls({ method: "GET", kind: "blob", status: 503 }), 4);
    await backend.terminate(a.inst);
    // Five in a row (MARKER_READ_ERRORS): the watch ends with the typed error, the manager's to retry.
    const b = await watchOf("marker-down", 5);
    assert.ok((await rejection(b.watch)) instanceof TransientError);
    await backend.terminate(b.inst);
  });

  it("boot diagnostics turned off on an adopted VM: no waiting (ConsoleUnavailable), null host key; its exit is lost (no marker can be read)", async (t) => {
    const { fake, backend, logs } = await setup(t, { cfg: { host_key_timeout_seconds: 20 } });
    const id = "hk-nodiag";
    const n = naming.names(id);
    const first = await backend.provision(grant(id), envelope, never);
    assert.equal(first.host_key_sha256, fake.hostKeyFingerprint(RG, n.vm));
    // Someone turned boot diagnostics off on the VM; a retried provision adopts it.
    const compute = new ComputeManagementClient(fake.credential(), fake.subscriptionId, fake.clientOptions());
    const vm = await compute.virtualMachines.get(RG, n.vm);
    vm.diagnosticsProfile = { bootDiagnostics: { enabled: false } };
    await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, n.vm, vm, { updateIntervalInMs: 1 });
    const reads = bootDiagReads(fake);
    const t0 = Date.now();
    const inst = await backend.provision(grant(id), envelope, never);
    assert.ok(Date.now() - t0 < 10_000, `took ${Date.now() - t0} ms`);
    assert.equal(inst.host_key_sha256, null);
    assert.equal(bootDiagReads(fake) - reads, 1, "refused once, not retried");
    assert.equal(fake.findCalls({ method: "POST", path: /retrieveBootDiagnosticsData$/i }).at(-1)?.errorCode, "OperationNotAllowed");
    const warned = hostKeyWarnings(logs);
    assert.equal(warned.length, 1, logs.text);
    assert.match(String(warned[0]!["reason"]), /cannot be read: boot diagnostics are not enabled on VM/);

    // The exit-marker read stops at once too. Azure does not tell who powered the VM off, so
    // without a readable marker the workload is lost (cloud/vm-backend.ts, the same on every cloud).
    const watch = backend.watchUntilExit(inst, new Date(Date.now() + 60_000), never);
    fake.guestPowerOff(RG, n.vm, `${exitMarker(id, 5)}\n`);
    const obs = await watch;
    assert.deepEqual([obs.kind, obs.exit_code, obs.failure?.kind], ["lost", null, "lost"]);
    assert.equal(bootDiagReads(fake) - reads, 2);
    assert.equal(logs.find("warn", /console cannot be read; its exit code is unknown/).length, 1, logs.text);
    await backend.terminate(inst);
  });
});

describe("azure backend: watching", { timeout: SUITE_TIMEOUT_MS }, () => {
  it("one batched list per poll for many VMs (no per-VM calls); exit codes and failures from the serial log", async (t) => {
    // A 200 ms poll interval: the lag allowance for a stopped VM's log (two intervals) is then
    // longer than a boot-diagnostics read, also on a loaded machine.
    const { fake, backend } = await setup(t, { cfg: { poll_interval_seconds: 0.2 } });
    const ids = ["w-0", "w-1", "w-2", "w-3"];
    const insts = await Promise.all(ids.map((id) => backend.provision(grant(id), envelope, never)));
    const before = fake.calls.length;
    const watches = insts.map((i) => backend.watchUntilExit(i, new Date(Date.now() + 60_000), never));
    // listAll(statusOnly): the subscription-wide status list, one per poll for every VM watched.
    const listCalls = () => fake.findCalls((c) => c.seq > before && c.method === "GET" && /^\/subscriptions\/[^/]+\/providers\/Microsoft\.Compute\/virtualMachines$/.test(c.path)).length;
    await until(() => listCalls() >= 3, "a few polls");
    fake.guestPowerOff(RG, naming.names("w-0").vm, `${exitMarker("w-0", 0)}\n`);
    fake.guestPowerOff(RG, naming.names("w-1").vm, `[  5.1] cloud-init[900]: ${exitMarker("w-1", 7)}\n`);
    fake.guestPowerOff(RG, naming.names("w-2").vm, `${failMarker("w-2", "image_verification", "image sha256 mismatch: nothing was run")}\n`);
    fake.guestPowerOff(RG, naming.names("w-3").vm, `${exitMarker("someone-else", 9)}\n`);
    const obs = await Promise.all(watches);
    // w-3's console shows another request's marker only: stopped without its own, it is lost.
    assert.deepEqual(obs.map((o) => [o.kind, o.exit_code, o.failure?.kind ?? null]), [
      ["exited", 0, null],
      ["exited", 7, null],
      ["exited", null, "image_verification"],
      ["lost", null, "lost"],
    ]);
    const during = fake.findCalls((c) => c.seq > before);
    const perVm = during.filter((c) => c.method === "GET" && /\/virtualMachines\/[^/]+$/.test(c.path));
    assert.deepEqual(perVm, [], "no per-VM GET while watching");
    const lists = listCalls();
    // At most one list per poll interval for all four VMs (plus the boot-diagnostics lookups).
    const polls = during.filter((c) => c.kind === "arm" && c.method === "GET").length;
    assert.equal(polls, lists);
    // w-3's log is read again while the blob may lag: up to three reads within two poll intervals
    // (the lag allowance is wall time: a slow read may leave room for two).
    const diag = during.filter((c) => /retrieveBootDiagnosticsData$/i.test(c.path)).length;
    assert.ok(diag >= 4 + 1 && diag <= 4 + 2, `${diag} boot-diagnostics reads`);
    for (const i of insts) await backend.terminate(i);
  });

  it("valid_to is enforced; a vanished VM is lost; power states come from listAll(statusOnly), never from a resource-group list's $expand", async (t) => {
    const { fake, backend } = await setup(t);
    const inst = await backend.provision(grant("exp-1"), envelope, never);
    const t0 = Date.now();
    const obs = await backend.watchUntilExit(inst, new Date(Date.now() + 300), never);
    assert.equal(obs.kind, "expired");
    assert.ok(Date.now() - t0 < 3000);

    // The fake, like ARM may, ignores $expand=instanceView on a list without $filter (documented as
    // valid only with one): the exit is seen because the watch reads listAll(statusOnly).
    const watch = backend.watchUntilExit(inst, new Date(Date.now() + 60_000), never);
    await until(() => fake.countCalls({ method: "GET", path: /\/subscriptions\/[^/]+\/providers\/Microsoft\.Compute\/virtualMachines$/ }) > 0, "the statusOnly list");
    fake.guestPowerOff(RG, inst.instance_id, `${exitMarker("exp-1", 3)}\n`);
    assert.equal((await watch).exit_code, 3);
    const lists = fake.findCalls({ path: /\/providers\/Microsoft\.Compute\/virtualMachines$/ });
    assert.ok(lists.length > 0 && lists.every((c) => c.query["statusOnly"] === "true" && !/\/resourceGroups\//.test(c.path)), "only the documented status call");

    // Deleted behind the bridge's back: reported lost (after the watcher's missing threshold).
    const compute = new ComputeManagementClient(fake.credential(), fake.subscriptionId, fake.clientOptions());
    const inst2 = await backend.provision(grant("gone-1"), envelope, never);
    const watch2 = backend.watchUntilExit(inst2, new Date(Date.now() + 60_000), never);
    await compute.virtualMachines.beginDeleteAndWait(RG, inst2.instance_id, { updateIntervalInMs: 1 });
    const lost = await watch2;
    assert.equal(lost.kind, "lost");
    assert.equal(lost.failure?.kind, "lost");

    // Aborting a watch rejects with an AbortError.
    const ctl = new AbortController();
    const w3 = backend.watchUntilExit(inst, new Date(Date.now() + 60_000), ctl.signal);
    ctl.abort();
    assert.equal((await rejection(w3)).name, "AbortError");
    await backend.terminate(inst);
    await backend.terminate(inst2);
  });
});

describe("azure backend: terminate and the orphan sweep", { timeout: SUITE_TIMEOUT_MS }, () => {
  it("terminate deletes VM, then NIC, IP and disk, even when Azure would detach them; idempotent; by request_id alone", async (t) => {
    const { fake, backend } = await setup(t, { fakeOpts: { deleteInProgressPolls: 2 } });
    const id = "term-1";
    const n = naming.names(id);
    const inst = await backend.provision(grant(id), envelope, never);
    // Make Azure keep the NIC, IP and disk on VM delete (as older API versions did).
    const compute = new ComputeManagementClient(fake.credential(), fake.subscriptionId, fake.clientOptions());
    const vm = await compute.virtualMachines.get(RG, n.vm);
    vm.storageProfile!.osDisk!.deleteOption = "Detach";
    vm.networkProfile!.networkInterfaces![0]!.deleteOption = "Detach";
    await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, n.vm, vm, { updateIntervalInMs: 1 });
    assert.equal(leftovers(fake).length, 4);

    const before = fake.calls.length;
    await backend.terminate(placeholder(grant(id), "azure"));
    assert.deepEqual(leftovers(fake), []);
    const deletes = fake.findCalls((c) => c.seq > before && c.method === "DELETE").map((c) => c.path.split("/").slice(-2, -1)[0]);
    assert.deepEqual(deletes, ["virtualMachines", "networkInterfaces", "publicIPAddresses", "disks"]);
    await backend.terminate(inst); // already gone: fine
    assert.deepEqual(leftovers(fake), []);
  });

  it("sweeps orphans by tag and by name (leftover NIC/IP/disk), keeps live, young and foreign resources", async (t) => {
    // The fake's clock runs an hour behind: disks it creates look an hour old.
    const fake = await startFake({ now: () => Date.now() - 3_600_000 });
    const network = new NetworkManagementClient(fake.credential(), fake.subscriptionId, fake.clientOptions());
    const compute = new ComputeManagementClient(fake.credential(), fake.subscriptionId, fake.clientOptions());
    const patient = await setup(t, { fake, cfg: { orphan_grace_seconds: 600, reconcile_interval_seconds: 3600 } });
    const live = await patient.backend.provision(grant("live-1"), envelope, never);
    const dead = await patient.backend.provision(grant("dead-1"), envelope, never);
    const fast = { updateIntervalInMs: 1 };
    const location = REGION;
    const tagsFor = (id: string, created: string, provider = PROVIDER) => ({ [TAG_PROVIDER]: provider, [TAG_REQUEST]: id, [TAG_CREATED]: created });
    const hourAgo = new Date(Date.now() - 3_600_000).toISOString();
    const now = new Date().toISOString();
    // A crash between NIC create and VM create left an IP and a NIC (an hour ago).
    const left = naming.names("left-1");
    const leftPip = await network.publicIPAddresses.beginCreateOrUpdateAndWait(RG, left.pip, { location, tags: tagsFor("left-1", hourAgo), sku: { name: "Standard" } }, fast);
    await network.networkInterfaces.beginCreateOrUpdateAndWait(
      RG,
      left.nic,
      { location, tags: tagsFor("left-1", hourAgo), ipConfigurations: [{ name: "ipconfig1", subnet: { id: patient.cfg.subnet_id as string }, publicIPAddress: { id: leftPip.id! } }] },
      fast,
    );
    // An OS disk a deleted VM detached (untagged, as Azure creates them), and a young leftover.
    const diskOnly = naming.names("disk-1");
    await compute.disks.beginCreateOrUpdateAndWait(RG, diskOnly.osDisk, { location, creationData: { createOption: "Empty" }, diskSizeGB: 30 }, fast);
    const young = naming.names("young-1");
    await network.publicIPAddresses.beginCreateOrUpdateAndWait(RG, young.pip, { location, tags: tagsFor("young-1", now), sku: { name: "Standard" } }, fast);
    // Someone else's resources in the same group.
    await network.publicIPAddresses.beginCreateOrUpdateAndWait(RG, "other-pip", { location, tags: tagsFor("x", hourAgo, "other-provider"), sku: { name: "Standard" } }, fast);
    await compute.disks.beginCreateOrUpdateAndWait(RG, "data-disk-1", { location, creationData: { createOption: "Empty" }, diskSizeGB: 30 }, fast);
    await compute.disks.beginCreateOrUpdateAndWait(RG, azureNaming("other-provider").names("disk-1").osDisk, { location, creationData: { createOption: "Empty" }, diskSizeGB: 30 }, fast);

    await patient.backend.reconcile(new Set(["live-1"]));
    const after1 = leftovers(fake);
    for (const gone of [left.nic, left.pip, diskOnly.osDisk]) assert.ok(!after1.some((n) => n.endsWith(`/${gone}`)), `${gone} swept`);
    for (const kept of [live.instance_id, dead.instance_id, young.pip, "other-pip", "data-disk-1"]) assert.ok(after1.some((n) => n.endsWith(`/${kept}`)), `${kept} kept`);
    assert.equal(after1.filter((n) => n.startsWith("disks/")).length, 4, "live and dead OS disks, data-disk-1 and the other provider's disk");

    // Within the reconcile interval a second call is skipped (no list calls).
    const calls = fake.calls.length;
    await patient.backend.reconcile(new Set(["live-1"]));
    assert.equal(fake.calls.length, calls);

    // A bridge restarted with grace 0: the dead grant's VM, NIC, IP and disk go; the young IP too.
    const eager = await setup(t, { fake, cfg: { orphan_grace_seconds: 0 } });
    await eager.backend.reconcile(new Set(["live-1"]));
    const after2 = leftovers(fake).sort();
    const liveNames = naming.names("live-1");
    assert.deepEqual(after2, [
      `disks/${azureNaming("other-provider").names("disk-1").osDisk}`,
      "disks/data-disk-1",
      `disks/${liveNames.osDisk}`,
      `networkInterfaces/${liveNames.nic}`,
      "publicIPAddresses/other-pip",
      `publicIPAddresses/${liveNames.pip}`,
      `virtualMachines/${liveNames.vm}`,
    ].sort());
    // The sweep re-learned the live VM for the concurrency cap.
    assert.equal(eager.backend.status()["active"], 1);
    // One line per orphan, the same fields on every cloud.
    const lines = eager.logs.find("warn", /^deleting an orphaned resource \(this bridge's, no live grant owns it\)$/);
    assert.ok(lines.some((l) => l["kind"] === "vm" && l["id"] === dead.instance_id && l["request_id"] === "dead-1" && l["scope"] === RG), eager.logs.text);
    assert.ok(lines.some((l) => l["kind"] === "public_ip" && l["id"] === young.pip && l["request_id"] === "young-1"), eager.logs.text);
  });
});

describe("azure backend through the GrantManager", { timeout: SUITE_TIMEOUT_MS }, () => {
  it("runs a grant end to end: exit code in the ComputeLog, nothing billable left", async (t) => {
    const s = await setup(t);
    const { manager, store } = await lifecycle(t, s.dir, [s.backend], s.ctx.unavailable);
    const id = "life.1";
    const r = await manager.submit({ grant: grant(id), envelope: { image: IMAGE } });
    assert.equal(r.status, "created");
    await until(async () => (await store.get(id))?.state === "running", "the grant to run");
    const rec = (await store.get(id))!;
    assert.equal(rec.instance?.backend, "azure");
    // The manager generated the key pair; the VM got its public half.
    assert.equal(vmBody(s.fake, naming.names(id).vm)["properties"]["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["keyData"], rec.public_key);
    s.fake.guestPowerOff(RG, naming.names(id).vm, `${exitMarker(id, 3)}\n`);
    await manager.settled(id);
    const done = (await store.get(id))!;
    assert.equal(done.state, "completed");
    assert.equal((await store.computeLog(id))?.exit_code, 3);
    assert.equal((await store.computeLog(id))?.instance_id, naming.names(id).vm);
    assert.deepEqual(leftovers(s.fake), []);

    // No marker on the serial console: Azure does not tell a guest's own power-off from a stop by
    // someone else, so the workload is lost: the grant fails, its exit code null in the ComputeLog.
    const quiet = "life.2";
    await manager.submit({ grant: grant(quiet), envelope: { image: IMAGE } });
    await until(async () => (await store.get(quiet))?.state === "running", "the second grant to run");
    s.fake.guestPowerOff(RG, naming.names(quiet).vm);
    await manager.settled(quiet);
    assert.equal((await store.get(quiet))?.state, "failed");
    assert.equal((await store.computeLog(quiet))?.exit_code, null);

    // Cancelled while running: terminated, nothing left.
    const cancelled = "life.3";
    await manager.submit({ grant: grant(cancelled), envelope: { image: IMAGE } });
    await until(async () => (await store.get(cancelled))?.state === "running", "the third grant to run");
    await manager.cancel(cancelled);
    await manager.settled(cancelled);
    assert.equal((await store.get(cancelled))?.state, "cancelled");
    assert.deepEqual(leftovers(s.fake), []);
  });

  it("AllocationFailed in the LRO: the next fitting size first, then the next backend; the offerings are marked unavailable", async (t) => {
    const s = await setup(t);
    // One size without capacity: the next fitting size of the same backend takes the grant.
    s.fake.faults.allocationFailure = (r) => (r.operation === "create" && r.vmSize === "Standard_D2s_v5" ? "AllocationFailed" : false);
    const bigger = await s.backend.provision(grant("next-size"), envelope, never);
    assert.equal(bigger.details["vm_size"], "Standard_D4s_v5");
    assert.ok(s.ctx.unavailable.isUnavailable("azure", REGION, "Standard_D2s_v5"));
    // One VM name per request: the Failed D2s_v5 VM was deleted before the D4s_v5 one was created.
    assert.equal(s.fake.createsByName[bigger.instance_id], 2);
    await s.backend.terminate(bigger);

    // No size has capacity: the grant fails over to the next backend.
    s.fake.faults.allocationFailure = (r) => (r.operation === "create" ? "AllocationFailed" : false);
    // The next backend is a real local one: it needs an image it can fetch (over http here).
    const img = bundleImage(s.dir, "wl", "exit 0");
    const server = http.createServer((_q, res) => res.end(readFileSync(img.file)));
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    t.after(() => new Promise<void>((r) => server.close(() => r())));
    const image = { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/wl.tar.gz`, sha256: img.sha256, format: "bundle" as const };
    const local = localBackend(path.join(s.dir, "local"), { region: REGION }, loopbackImages());
    const { manager, store, fleet } = await lifecycle(t, s.dir, [s.backend, local], s.ctx.unavailable);
    const id = "failover-1";
    await manager.submit({ grant: grant(id), envelope: { image } });
    await manager.settled(id);
    const rec = (await store.get(id))!;
    assert.equal(rec.state, "completed", JSON.stringify(rec.attempts));
    assert.equal(rec.backend, "local");
    assert.deepEqual(rec.attempts.map((a) => [a.backend, a.error_kind]), [["azure", "capacity"]]);
    assert.match(rec.attempts[0]!.message, /AllocationFailed/);
    for (const size of ["Standard_D2s_v5", "Standard_D4s_v5", "Standard_DC4es_v5"]) assert.ok(fleet.unavailable.isUnavailable("azure", REGION, size), size);
    assert.deepEqual(leftovers(s.fake), [], "the failed VM, its NIC and IP were removed");
    // D2s_v5 was skipped (no capacity reported recently); D4s_v5, then DC4es_v5 were tried.
    assert.equal(s.fake.createsByName[naming.names(id).vm], 2);
  });

  it("a confidential_image that is not a confidential-VM image: ARM's refusal fails over at once with the reason (issue #18 item 6)", async (t) => {
    const s = await setup(t, {
      cfg: {
        tdx_vm_sizes: [
          { name: "Standard_DC4es_v5", vcpus: 4, memory_mib: 16384 },
          { name: "Standard_DC8es_v5", vcpus: 8, memory_mib: 32768 },
        ],
        confidential_image: { publisher: "Canonical", offer: "ubuntu-24_04-lts", sku: "server" },
      },
    });
    const e = await rejection(s.backend.provision(grant("cvm-img-1", { tdx_required: true }), envelope, never));
    assert.ok(e instanceof ConfidentialImageError && e instanceof UnfitError && e instanceof CapacityError, String(e));
    assert.deepEqual(e.offering, { region: REGION, shape: "Standard_DC4es_v5" });
    assert.match(e.message, /backends\.azure\.confidential_image Canonical:ubuntu-24_04-lts:server:latest/);
    assert.match(e.message, /InvalidParameter.*is not supported by given image/);
    assert.match(e.message, /must be a confidential-VM image/);
    assert.equal(s.fake.countCalls({ method: "PUT", path: /virtualMachines\// }), 1, "no other TDX size is tried: none can run the image");
    await s.backend.terminate(placeholder(grant("cvm-img-1"), "azure"));
    assert.deepEqual(leftovers(s.fake), []);

    // Through the manager: a failover (no other TDX backend here, so the grant fails), the reason in its attempts.
    const { manager, store } = await lifecycle(t, s.dir, [s.backend], s.ctx.unavailable);
    const id = "cvm-img-2";
    await manager.submit({ grant: grant(id, { tdx_required: true }), envelope: { image: IMAGE } });
    await manager.settled(id);
    const rec = (await store.get(id))!;
    assert.equal(rec.state, "failed");
    assert.deepEqual(rec.attempts.map((a) => [a.backend, a.error_kind]), [["azure", "capacity"]]);
    assert.match(rec.attempts[0]!.message, /not supported by given image.*must be a confidential-VM image/);
    assert.deepEqual(leftovers(s.fake), []);
  });

  it("a restart mid-create adopts the VM, NIC and IP (deterministic names): nothing is duplicated", async (t) => {
    const s = await setup(t, { fakeOpts: { lroInProgressPolls: 1_000_000 } });
    const first = await lifecycle(t, s.dir, [s.backend], s.ctx.unavailable);
    const id = "restart_1.x";
    const n = naming.names(id);
    await first.manager.submit({ grant: grant(id), envelope: { image: IMAGE } });
    // Every create would hang: let the public IP's and the NIC's finish, hold the VM's. (The fake
    // runs in this process, so nothing is served between this check and the settle.)
    await until(() => {
      if (s.fake.countCalls({ method: "PUT", path: new RegExp(`virtualMachines/${n.vm}$`) }) > 0) return true;
      s.fake.settleOperations();
      return false;
    }, "the VM create call", 20_000, 2);
    assert.equal(s.fake.provisioningState("virtualMachines", RG, n.vm), "Creating");
    await first.close(); // the daemon stops while the create is in flight

    // A new process: fresh backend and manager over the same state.
    const b2 = new AzureBackend(s.cfg, s.ctx, { credential: s.fake.credential(), retryDelayInMs: 1 });
    t.after(() => b2.close());
    const second = await lifecycle(t, s.dir, [b2], s.ctx.unavailable);
    const getsBefore = s.fake.countCalls({ method: "GET", path: new RegExp(`virtualMachines/${n.vm}$`) });
    assert.equal(await second.manager.resumeAll(), 1);
    // It finds the VM still creating and polls it; ARM then finishes the create.
    await until(() => s.fake.countCalls({ method: "GET", path: new RegExp(`virtualMachines/${n.vm}$`) }) > getsBefore + 1, "the adopted VM to be polled");
    s.fake.settleOperations();
    await until(async () => (await second.store.get(id))?.state === "running", "the grant to run after the restart");
    assert.deepEqual(s.fake.createsByName, { [n.vm]: 1 });
    assert.equal(s.fake.createCount("networkInterfaces"), 1);
    assert.equal(s.fake.createCount("publicIPAddresses"), 1);
    assert.equal(s.fake.countCalls({ method: "PUT", path: new RegExp(`virtualMachines/${n.vm}$`) }), 1, "the VM was not PUT again");

    s.fake.guestPowerOff(RG, n.vm, `${exitMarker(id, 0)}\n`);
    s.fake.faults.lroInProgressPolls = 0;
    s.fake.faults.deleteInProgressPolls = 0;
    await second.manager.settled(id);
    assert.equal((await second.store.get(id))?.state, "completed");
    assert.deepEqual(leftovers(s.fake), []);
  });
});

/** A backend context whose config directory is a fresh temp dir and whose log lines are kept (for the credential tests). */
function loggedContext(t: TestContext): { dir: string; logs: LogSink; ctx: BackendContext } {
  const dir = tempDir(t);
  const logs = new LogSink();
  const ctx: BackendContext = { providerId: PROVIDER, stateDir: dir, configDir: dir, log: createLogger("trace", logs), clock: systemClock, almanac: MS_ALMANAC, unavailable: new OfferingCache(1000, systemClock) };
  return { dir, logs, ctx };
}

describe("azure backend: production credentials", { timeout: SUITE_TIMEOUT_MS }, () => {
  it("ClientSecretCredential from client_secret_file against a local authority with ca_file; the secret is never logged", async (t) => {
    const fake = await startFake();
    const tenant = "11111111-2222-3333-4444-555555555555";
    const clientId = "66666666-7777-8888-9999-000000000000";
    const secret = "s3cr3t-value-that-must-never-be-logged";
    let tokenRequests = 0;
    const scopes = new Set<string>();
    const authority = https.createServer({ cert: cert.cert, key: cert.key }, (req, res) => {
      let body = "";
      req.on("data", (c: Buffer) => (body += c.toString()));
      req.on("end", () => {
        const base = `https://127.0.0.1:${(authority.address() as AddressInfo).port}/${tenant}`;
        res.setHeader("content-type", "application/json");
        if (req.method === "GET" && /\/v2\.0\/\.well-known\/openid-configuration/.test(req.url ?? "")) {
          res.end(JSON.stringify({ token_endpoint: `${base}/oauth2/v2.0/token`, authorization_endpoint: `${base}/oauth2/v2.0/authorize`, issuer: `${base}/v2.0`, jwks_uri: `${base}/discovery/v2.0/keys` }));
          return;
        }
        if (req.method === "POST" && /\/oauth2\/v2\.0\/token/.test(req.url ?? "")) {
          tokenRequests++;
          const form = new URLSearchParams(body);
          scopes.add(form.get("scope") ?? "");
          if (form.get("client_secret") !== secret || form.get("client_id") !== clientId) {
            res.statusCode = 401;
            res.end(JSON.stringify({ error: "invalid_client", error_description: "AADSTS7000215: Invalid client secret provided.", error_codes: [7000215] }));
            return;
          }
          res.end(JSON.stringify({ token_type: "Bearer", expires_in: 3600, ext_expires_in: 3600, access_token: fake.accessToken }));
          return;
        }
        res.statusCode = 404;
        res.end("{}");
      });
    });
    await new Promise<void>((r) => authority.listen(0, "127.0.0.1", r));
    t.after(() => new Promise<void>((r) => authority.close(() => r())));
    const { dir, logs, ctx } = loggedContext(t);
    writeFileSync(path.join(dir, "client-secret"), `${secret}\n`, { mode: 0o600 });
    writeFileSync(path.join(dir, "wrong-secret"), "definitely-not-the-secret\n", { mode: 0o600 });
    const creds = {
      managed_identity: false,
      tenant_id: tenant,
      client_id: clientId,
      client_secret_file: "client-secret",
      authority_host: `https://127.0.0.1:${(authority.address() as AddressInfo).port}`,
    };
    const b = new AzureBackend(config(fake, creds), ctx);
    t.after(() => b.close());
    const inst = await b.provision(grant("sp-1"), envelope, never);
    assert.ok(tokenRequests >= 1);
    // Compute and network calls alike ask for the configured endpoint's audience (a sovereign
    // cloud's authority refuses the public cloud's).
    assert.deepEqual([...scopes], [`${fake.endpoint.replace(/\/+$/, "")}/.default`]);
    await b.terminate(inst);

    const wrong = new AzureBackend(config(fake, { ...creds, client_secret_file: "wrong-secret" }), ctx);
    t.after(() => wrong.close());
    const e = await rejection(wrong.provision(grant("sp-2"), envelope, never));
    assert.ok(e instanceof CredentialError, String(e));
    assert.match(e.message, /access token/);
    assert.ok(!e.message.includes("definitely-not-the-secret"));
    assert.ok(!logs.text.includes(secret) && !logs.text.includes(fake.accessToken), "no secret or token in the logs");

    // A missing secret file fails at first use (constructors stay offline for check-config),
    // naming the config key (never a value); doctor reports it too.
    const missing = new AzureBackend(config(fake, { ...creds, client_secret_file: "nope" }), ctx);
    t.after(() => missing.close());
    const m = await rejection(missing.provision(grant("sp-3"), envelope, never));
    assert.ok(m instanceof CredentialError, String(m));
    assert.match(m.message, /backends\.azure\.client_secret_file: cannot read/);
    const checks = await missing.check();
    assert.ok(checks.some((c) => !c.ok && /client_secret_file: cannot read/.test(c.detail)), JSON.stringify(checks));
    const good = await new AzureBackend(config(fake, creds), ctx).check();
    assert.ok(good.every((c) => c.ok), JSON.stringify(good));
  });
});

describe("azure backend: managed identity", { timeout: SUITE_TIMEOUT_MS }, () => {
  it("takes its token from the VM's identity endpoint: the system-assigned identity, or a user-assigned one by client id; an unknown identity is a CredentialError", async (t) => {
    const fake = await startFake();
    const userAssigned = "33333333-4444-5555-6666-777777777777";
    const unknown = "99999999-8888-7777-6666-555555555555";
    const seen: { metadata: string | undefined; resource: string | null; clientId: string | null }[] = [];
    // The Azure Instance Metadata Service's token endpoint, on loopback: the SDK goes there instead
    // of 169.254.169.254 when AZURE_POD_IDENTITY_AUTHORITY_HOST names it (its AKS pod-identity hook).
    const imds = http.createServer((req, res) => {
      const url = new URL(req.url ?? "/", "http://imds");
      res.setHeader("content-type", "application/json");
      if (req.method !== "GET" || !/^\/metadata\/identity\/oauth2\/token\/?$/.test(url.pathname)) {
        res.statusCode = 404;
        return void res.end("{}");
      }
      const clientId = url.searchParams.get("client_id");
      seen.push({ metadata: req.headers.metadata as string | undefined, resource: url.searchParams.get("resource"), clientId });
      if (req.headers.metadata !== "true" || clientId === unknown) {
        res.statusCode = 400;
        return void res.end(JSON.stringify({ error: "invalid_request", error_description: "Identity not found" }));
      }
      const expiresOn = Math.floor(Date.now() / 1000) + 3600;
      res.end(JSON.stringify({ access_token: fake.accessToken, expires_in: "3600", expires_on: String(expiresOn), ext_expires_in: "3600", not_before: String(expiresOn - 3600), resource: url.searchParams.get("resource"), token_type: "Bearer", ...(clientId ? { client_id: clientId } : {}) }));
    });
    await new Promise<void>((r) => imds.listen(0, "127.0.0.1", r));
    t.after(() => new Promise<void>((r) => imds.close(() => r())));
    const previous = process.env.AZURE_POD_IDENTITY_AUTHORITY_HOST;
    process.env.AZURE_POD_IDENTITY_AUTHORITY_HOST = `http://127.0.0.1:${(imds.address() as AddressInfo).port}`;
    t.after(() => {
      if (previous === undefined) delete process.env.AZURE_POD_IDENTITY_AUTHORITY_HOST;
      else process.env.AZURE_POD_IDENTITY_AUTHORITY_HOST = previous;
    });
    const { logs, ctx } = loggedContext(t);

    const system = new AzureBackend(config(fake, { managed_identity: true }), ctx);
    t.after(() => system.close());
    await system.terminate(await system.provision(grant("mi-1"), envelope, never));
    assert.ok(seen.length >= 1 && seen.every((s) => s.metadata === "true" && s.clientId === null), JSON.stringify(seen));
    assert.deepEqual([...new Set(seen.map((s) => s.resource))], [fake.endpoint.replace(/\/+$/, "")], "tokens for the configured ARM endpoint only");

    seen.length = 0;
    const user = new AzureBackend(config(fake, { managed_identity: true, managed_identity_client_id: userAssigned }), ctx);
    t.after(() => user.close());
    await user.terminate(await user.provision(grant("mi-2"), envelope, never));
    assert.ok(seen.length >= 1 && seen.every((s) => s.clientId === userAssigned), JSON.stringify(seen));

    const stranger = new AzureBackend(config(fake, { managed_identity: true, managed_identity_client_id: unknown }), ctx);
    t.after(() => stranger.close());
    const e = await rejection(stranger.provision(grant("mi-3"), envelope, never));
    assert.ok(e instanceof CredentialError, String(e));
    assert.match(e.message, /access token/);
    assert.deepEqual(leftovers(fake), [], "nothing was created without a token");
    assert.ok(!logs.text.includes(fake.accessToken), "the token is never logged");
  });
});

describe("azure backend: TDX attestation evidence from the boot diagnostics serial log", { timeout: SUITE_TIMEOUT_MS }, () => {
  it("the guest's vTPM chain (HCL report, TD quote, TPM2 quote over the binding), collected at provision", async (t) => {
    const { fake, backend } = await setup(t);
    const dir = tempDir(t);
    const { fakeTpm2, runGuestScriptSync, GCE_QUOTE } = await import("../attestation/guest-run.js");
    const { bindingDigest } = await import("../../src/attestation/binding.js");
    const { mkdirSync, readFileSync, writeFileSync } = await import("node:fs");
    // The boot script runs for real when the VM boots, with tpm2-tools stand-ins and an IMDS the
    // script reaches through CB_AZURE_IMDS (a file:// URL: the hook runs synchronously).
    const hcl = Buffer.alloc(2600, 0x33);
    const tpm2 = fakeTpm2(dir, hcl);
    mkdirSync(path.join(dir, "imds", "acc"), { recursive: true });
    writeFileSync(path.join(dir, "imds", "acc", "tdquote"), JSON.stringify({ quote: GCE_QUOTE.toString("base64url") }));
    fake.guestEvidence = (script) => {
      const out = runGuestScriptSync(path.join(dir, "guest"), script, { CB_TPM2_TOOLS: tpm2, CB_AZURE_IMDS: `file://${path.join(dir, "imds")}` });
      return out.slice(out.indexOf("COMPUTE-BRIDGE-EVIDENCE-"));
    };
    const id = "tdx-ev-az";
    const nonce = "9c".repeat(24);
    const inst = await backend.provision(grant(id, { tdx_required: true }), { ...envelope, attestation_nonce: nonce }, never);
    const ev = inst.attestation;
    assert.ok(ev && ev.status === "present", JSON.stringify(ev));
    assert.equal(ev.platform, "azure");
    assert.equal(ev.format, "azure-tdx-vtpm");
    assert.deepEqual(Buffer.from(ev.blobs.hcl_report!, "base64"), hcl);
    assert.deepEqual(Buffer.from(ev.blobs.td_quote!, "base64"), GCE_QUOTE);
    assert.equal(Buffer.from(ev.blobs.tpm_quote!, "base64").toString(), "TPMS_ATTEST");
    // The guest bound the nonce: HCL user data and TPM qualifying data are the binding (its host key: none here).
    const binding = bindingDigest(id, nonce, null);
    assert.equal(ev.binding.digest, binding.toString("hex"));
    assert.deepEqual(readFileSync(path.join(dir, "nv_user_data.bin")), binding);
    assert.match(readFileSync(path.join(dir, "tpm2.log"), "utf8"), new RegExp(`-q ${binding.subarray(0, 32).toString("hex")} `));
    await backend.terminate(inst);
    assert.deepEqual(leftovers(fake), []);
  });

  it("a VM without tpm2-tools: absent with the guest's reason; a plain grant carries none", async (t) => {
    const { backend } = await setup(t, { cfg: { host_key_timeout_seconds: 20 } });
    const inst = await backend.provision(grant("tdx-ev-az2", { tdx_required: true }), { ...envelope, attestation_nonce: "9d".repeat(16) }, never);
    assert.deepEqual(inst.attestation, { status: "absent", platform: "azure", nonce: "9d".repeat(16), reason: "the guest produced no evidence: tpm2-tools is not installed (tpm2_nvdefine missing)" });
    const plain = await backend.provision(grant("plain-az"), envelope, never);
    assert.equal(plain.attestation, undefined);
    await backend.terminate(inst);
    await backend.terminate(plain);
  });
});
