/**
 * Drives ArmFake with the REAL @azure/arm-compute / @azure/arm-network clients.
 * Run: npx tsx --test test/fakes/arm.test.ts
 */
import assert from "node:assert/strict";
import https from "node:https";
import { after, before, describe, test } from "node:test";
import { ComputeManagementClient, type VirtualMachine } from "@azure/arm-compute";
import { NetworkManagementClient } from "@azure/arm-network";
import { ArmFake, fakeTokenCredential, type ArmFakeOptions } from "./arm.js";
import { makeTestCert, type TestCert } from "./tls.js";

const RG = "rg-test";
const LOCATION = "westeurope";
/** core-lro ignores Retry-After: 0 and would wait its default 2 s between polls. */
const FAST = { updateIntervalInMs: 0 };

let tls: TestCert;
const fakes: ArmFake[] = [];

before(async () => {
  tls = await makeTestCert();
});

after(async () => {
  await Promise.all(fakes.map((f) => f.close()));
});

async function startFake(opts: ArmFakeOptions = {}) {
  const fake = await ArmFake.start({ tls, seed: 42, ...opts });
  fakes.push(fake);
  const credential = fakeTokenCredential(fake.accessToken);
  const compute = new ComputeManagementClient(credential, fake.subscriptionId, {
    endpoint: fake.endpoint,
    tlsOptions: { ca: fake.ca },
  });
  const network = new NetworkManagementClient(credential, fake.subscriptionId, {
    endpoint: fake.endpoint,
    tlsOptions: { ca: fake.ca },
  });
  return { fake, compute, network };
}

async function createNetworking(network: NetworkManagementClient, fake: ArmFake, name: string) {
  const pip = await network.publicIPAddresses.beginCreateOrUpdateAndWait(
    RG,
    `${name}-pip`,
    { location: LOCATION, sku: { name: "Standard" }, publicIPAllocationMethod: "Static", tags: { owner: "test" } },
    FAST,
  );
  const nic = await network.networkInterfaces.beginCreateOrUpdateAndWait(
    RG,
    `${name}-nic`,
    {
      location: LOCATION,
      ipConfigurations: [
        {
          name: "ipconfig1",
          subnet: { id: `/subscriptions/${fake.subscriptionId}/resourceGroups/${RG}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/default` },
          publicIPAddress: { id: pip.id!, deleteOption: "Delete" },
        },
      ],
    },
    FAST,
  );
  return { pip, nic };
}

function vmParams(nicId: string, extra: Partial<VirtualMachine> = {}): VirtualMachine {
  return {
    location: LOCATION,
    tags: { "compute-bridge/lease": "lease-1" },
    hardwareProfile: { vmSize: "Standard_DC4as_v5" },
    securityProfile: {
      securityType: "ConfidentialVM",
      uefiSettings: { secureBootEnabled: true, vTpmEnabled: true },
    },
    storageProfile: {
      imageReference: {
        publisher: "Canonical",
        offer: "0001-com-ubuntu-confidential-vm-jammy",
        sku: "22_04-lts-cvm",
        version: "latest",
      },
      osDisk: {
        createOption: "FromImage",
        managedDisk: {
          storageAccountType: "Premium_LRS",
          securityProfile: { securityEncryptionType: "VMGuestStateOnly" },
        },
      },
    },
    osProfile: {
      computerName: "worker",
      adminUsername: "azureuser",
      linuxConfiguration: {
        disablePasswordAuthentication: true,
        ssh: { publicKeys: [{ path: "/home/azureuser/.ssh/authorized_keys", keyData: "ssh-ed25519 AAAA test" }] },
      },
      customData: Buffer.from("#cloud-config\n").toString("base64"),
    },
    networkProfile: { networkInterfaces: [{ id: nicId, primary: true }] },
    diagnosticsProfile: { bootDiagnostics: { enabled: true } },
    ...extra,
  };
}

function statusCodes(vm: VirtualMachine): string[] {
  return (vm.instanceView?.statuses ?? []).map((s) => s.code ?? "");
}

async function rejection(p: Promise<unknown>): Promise<Error & { code?: string; statusCode?: number }> {
  try {
    await p;
  } catch (err) {
    return err as Error & { code?: string; statusCode?: number };
  }
  assert.fail("expected the promise to reject");
}

function httpsGet(url: string, ca: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    https
      .get(url, { ca }, (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (c: string) => (body += c));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
      })
      .on("error", reject);
  });
}

describe("ArmFake with the real Azure SDK clients", () => {
  test("public IP + NIC + confidential VM; boots to running; list with instance view; flattened wire body", async () => {
    const { fake, compute, network } = await startFake({ bootDelayMs: 45_000 });
    const { pip, nic } = await createNetworking(network, fake, "w1");
    assert.equal(pip.ipAddress, "127.0.0.1");
    assert.equal(pip.provisioningState, "Succeeded");
    assert.deepEqual(pip.tags, { owner: "test" });
    assert.equal(nic.ipConfigurations?.[0]?.publicIPAddress?.id, pip.id);
    assert.match(nic.ipConfigurations?.[0]?.privateIPAddress ?? "", /^10\.0\.0\.\d+$/);

    const vm = await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w1", vmParams(nic.id!), FAST);
    assert.equal(vm.provisioningState, "Succeeded");
    assert.equal(vm.name, "w1");
    assert.deepEqual(vm.tags, { "compute-bridge/lease": "lease-1" });
    assert.equal(vm.hardwareProfile?.vmSize, "Standard_DC4as_v5");
    assert.equal(vm.securityProfile?.securityType, "ConfidentialVM");
    assert.equal(vm.osProfile?.customData, undefined, "secrets are not echoed back");
    assert.ok(vm.vmId);

    // The wire body nests the flattened model under `properties`.
    const [wire] = fake.receivedBodies("virtualMachines", "w1");
    assert.ok(wire);
    assert.equal(wire["hardwareProfile"], undefined);
    assert.equal(wire["properties"]["hardwareProfile"]["vmSize"], "Standard_DC4as_v5");
    assert.equal(wire["properties"]["securityProfile"]["securityType"], "ConfidentialVM");
    assert.equal(wire["properties"]["storageProfile"]["osDisk"]["managedDisk"]["securityProfile"]["securityEncryptionType"], "VMGuestStateOnly");
    assert.deepEqual(wire["properties"]["networkProfile"]["networkInterfaces"][0], { id: nic.id, properties: { primary: true } });
    assert.ok(wire["properties"]["osProfile"]["customData"], "the fake records what was sent");

    // LRO shape: PUT -> 201 + Azure-AsyncOperation, InProgress, Succeeded, final GET.
    const vmCalls = fake.findCalls((c) => /virtualMachines\/w1$|Microsoft\.Compute\/locations\//.test(c.path));
    assert.deepEqual(
      vmCalls.map((c) => `${c.method} ${c.kind} ${c.status}`),
      ["PUT arm 201", "GET operation 200", "GET operation 200", "GET arm 200"],
    );

    let got = await compute.virtualMachines.get(RG, "w1", { expand: "instanceView" });
    assert.deepEqual(statusCodes(got), ["ProvisioningState/succeeded", "PowerState/starting"]);

    fake.advanceTime(45_000);
    got = await compute.virtualMachines.get(RG, "w1", { expand: "instanceView" });
    assert.deepEqual(statusCodes(got), ["ProvisioningState/succeeded", "PowerState/running"]);
    assert.equal(got.instanceView?.computerName, "worker");
    assert.equal(fake.powerState(RG, "w1"), "running");

    // `$expand=instanceView` on a list is documented as valid only with a `$filter`: ignored without one.
    const listed: VirtualMachine[] = [];
    for await (const v of compute.virtualMachines.list(RG, { expand: "instanceView" })) listed.push(v);
    assert.equal(listed.length, 1);
    assert.equal(listed[0]!.instanceView, undefined);
    const filtered: VirtualMachine[] = [];
    for await (const v of compute.virtualMachines.list(RG, { expand: "instanceView", filter: "virtualMachineScaleSet/id eq null" })) filtered.push(v);
    assert.ok(statusCodes(filtered[0]!).includes("PowerState/running"));

    const all: VirtualMachine[] = [];
    for await (const v of compute.virtualMachines.listAll({ statusOnly: "true" })) all.push(v);
    assert.deepEqual(all.map((v) => v.name), ["w1"]);
    assert.ok(statusCodes(all[0]!).includes("PowerState/running"));

    // OS disk created implicitly, attached, confidential.
    const diskName = vm.storageProfile?.osDisk?.name ?? "";
    assert.match(diskName, /^w1_OsDisk_1_[0-9a-f]{32}$/);
    const disk = await compute.disks.get(RG, diskName);
    assert.equal(disk.managedBy, vm.id);
    assert.equal(disk.diskState, "Attached");
    assert.equal(disk.securityProfile?.securityType, "ConfidentialVM_VMGuestStateOnlyEncryptedWithPlatformKey");

    const nicNow = await network.networkInterfaces.get(RG, "w1-nic");
    assert.equal(nicNow.virtualMachine?.id, vm.id);
  });

  test("bootAll() makes starting VMs run; idempotent re-PUT updates instead of creating", async () => {
    const { fake, compute, network } = await startFake({ bootDelayMs: Infinity });
    const { nic } = await createNetworking(network, fake, "w2");
    await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w2", vmParams(nic.id!), FAST);
    assert.equal(fake.powerState(RG, "w2"), "starting");
    fake.bootAll();
    assert.equal(fake.powerState(RG, "w2"), "running");

    const again = await compute.virtualMachines.beginCreateOrUpdateAndWait(
      RG,
      "w2",
      vmParams(nic.id!, { tags: { "compute-bridge/lease": "lease-2" } }),
      FAST,
    );
    assert.deepEqual(again.tags, { "compute-bridge/lease": "lease-2" });
    assert.equal(fake.createdCount, 1);
    assert.deepEqual(fake.createsByName, { w2: 1 });
    assert.equal(fake.countCalls({ method: "PUT", path: /virtualMachines\/w2$/ }), 2);
    assert.equal(fake.countCalls({ method: "PUT", path: /virtualMachines\/w2$/, status: 200 }), 1, "second PUT answers 200");
    assert.equal(fake.list("virtualMachines").length, 1);
    assert.equal(fake.list("disks").length, 1, "no second OS disk");
    assert.equal(fake.powerState(RG, "w2"), "running", "update does not reboot");
  });

  test("confidential VM validation mirrors Azure's 400s and creates nothing", async () => {
    const { fake, compute, network } = await startFake();
    const { nic } = await createNetworking(network, fake, "w3");

    let err = await rejection(
      compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w3", vmParams(nic.id!, { hardwareProfile: { vmSize: "Standard_D4s_v5" } }), FAST),
    );
    assert.equal(err.name, "RestError");
    assert.equal(err.statusCode, 400);
    assert.equal(err.code, "BadRequest");
    assert.match(err.message, /The VM size 'Standard_D4s_v5' is not supported .* 'ConfidentialVM' security type/);

    const noEnc = vmParams(nic.id!);
    noEnc.storageProfile!.osDisk!.managedDisk = { storageAccountType: "Premium_LRS" };
    err = await rejection(compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w3", noEnc, FAST));
    assert.equal(err.statusCode, 400);
    assert.match(err.message, /securityEncryptionType' is missing/);

    const plain = vmParams(nic.id!, { securityProfile: undefined });
    plain.storageProfile!.osDisk!.managedDisk = { storageAccountType: "Premium_LRS" };
    err = await rejection(compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w3", plain, FAST));
    assert.equal(err.statusCode, 400);
    assert.match(err.message, /'<NULL>' security type/);

    // A ConfidentialVM needs a confidential-VM image (Azure/azure-cli#22200).
    const plainImage = vmParams(nic.id!, { hardwareProfile: { vmSize: "Standard_DC4es_v5" } });
    plainImage.storageProfile!.imageReference = { publisher: "Canonical", offer: "ubuntu-24_04-lts", sku: "server", version: "latest" };
    err = await rejection(compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w3", plainImage, FAST));
    assert.equal(err.name, "RestError");
    assert.equal(err.statusCode, 400);
    assert.equal(err.code, "InvalidParameter");
    assert.equal(err.message, "SecurityType 'ConfidentialVM_VMGuestStateOnlyEncryptedWithPlatformKey' is not supported by given image.");
    assert.equal(fake.createdCount, 0);

    // TDX size is accepted.
    await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w3", vmParams(nic.id!, { hardwareProfile: { vmSize: "Standard_DC4es_v5" } }), FAST);
    assert.equal(fake.createdCount, 1);
    assert.match(fake.serialLog(RG, "w3") ?? "", /Intel TDX/);
  });

  test("AllocationFailed ends the LRO Failed: plain Error with the code in the message", async () => {
    const { fake, compute, network } = await startFake();
    fake.faults.allocationFailure = (r) => (r.vmSize === "Standard_DC96as_v5" ? "AllocationFailed" : false);
    const { nic } = await createNetworking(network, fake, "w4");
    const err = await rejection(
      compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w4", vmParams(nic.id!, { hardwareProfile: { vmSize: "Standard_DC96as_v5" } }), FAST),
    );
    assert.notEqual(err.name, "RestError");
    assert.equal(err.code, undefined);
    assert.match(err.message, /^The long-running operation has failed\. AllocationFailed\. Allocation failed\./);
    const vm = await compute.virtualMachines.get(RG, "w4", { expand: "instanceView" });
    assert.equal(vm.provisioningState, "Failed");
    assert.deepEqual(statusCodes(vm), ["ProvisioningState/failed/AllocationFailed"]);

    // Re-PUT with a size that allocates fixes the VM in place.
    const fixed = await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w4", vmParams(nic.id!), FAST);
    assert.equal(fixed.provisioningState, "Succeeded");
    assert.deepEqual(fake.createsByName, { w4: 1 });

    // A NIC can only serve one VM.
    const inUse = await rejection(compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w4b", vmParams(nic.id!), FAST));
    assert.equal(inUse.code, "NicInUse");

    // Synchronous capacity / quota refusals are RestErrors.
    const { nic: nicB } = await createNetworking(network, fake, "w4b");
    fake.faults.allocationFailure = () => "SkuNotAvailable";
    let sync = await rejection(compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w4b", vmParams(nicB.id!), FAST));
    assert.equal(sync.name, "RestError");
    assert.equal(sync.statusCode, 409);
    assert.equal(sync.code, "SkuNotAvailable");
    fake.faults.allocationFailure = () => "QuotaExceeded";
    sync = await rejection(compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w4b", vmParams(nicB.id!), FAST));
    assert.equal(sync.statusCode, 409);
    assert.equal(sync.code, "OperationNotAllowed");
    assert.match(sync.message, /exceeding approved standardDCASv5Family Cores quota/);
    assert.equal(fake.has("virtualMachines", RG, "w4b"), false);
  });

  test("429 with Retry-After: 0 is retried to success; 503 too", async () => {
    const { fake, compute, network } = await startFake();
    const { nic } = await createNetworking(network, fake, "w5");
    await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w5", vmParams(nic.id!), FAST);
    fake.failNext("GET", /virtualMachines\/w5$/, 429, "SubscriptionRequestsThrottled", "slow down", 2);
    const t0 = Date.now();
    const vm = await compute.virtualMachines.get(RG, "w5");
    assert.equal(vm.name, "w5");
    assert.ok(Date.now() - t0 < 2000);
    assert.equal(fake.countCalls({ method: "GET", path: /virtualMachines\/w5$/, status: 429 }), 2);
    assert.equal(fake.countCalls({ fault: "failNext" }), 2);

    fake.failNext("GET", /networkInterfaces\/w5-nic$/, 503, "ServiceUnavailable");
    const n = await network.networkInterfaces.get(RG, "w5-nic");
    assert.equal(n.name, "w5-nic");

    // Throttling that never stops surfaces as a RestError 429 after the SDK's retries.
    fake.faults.throttleRate = 1;
    const err = await rejection(compute.virtualMachines.get(RG, "w5"));
    assert.equal(err.statusCode, 429);
    assert.equal(err.code, "SubscriptionRequestsThrottled");
    fake.faults.throttleRate = 0;
  });

  test("deleting the VM leaves the OS disk (deleteOption Detach); the disk can then be deleted", async () => {
    const { fake, compute, network } = await startFake({ deleteInProgressPolls: 2 });
    const { nic } = await createNetworking(network, fake, "w6");
    const vm = await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w6", vmParams(nic.id!), FAST);
    const diskName = vm.storageProfile!.osDisk!.name!;

    // Attached disk / NIC / public IP refuse deletion while in use.
    let err = await rejection(compute.disks.beginDeleteAndWait(RG, diskName, FAST));
    assert.equal(err.statusCode, 409);
    assert.equal(err.code, "OperationNotAllowed");
    err = await rejection(network.networkInterfaces.beginDeleteAndWait(RG, "w6-nic", FAST));
    assert.equal(err.code, "NicInUse");
    err = await rejection(network.publicIPAddresses.beginDeleteAndWait(RG, "w6-pip", FAST));
    assert.equal(err.code, "PublicIPAddressCannotBeDeleted");

    await compute.virtualMachines.beginDeleteAndWait(RG, "w6", FAST);
    assert.deepEqual(
      fake.findCalls((c) => /virtualMachines\/w6$|operations\//.test(c.path) && c.method !== "PUT").slice(-4).map((c) => `${c.method} ${c.status}`),
      ["DELETE 202", "GET 202", "GET 202", "GET 204"],
    );
    assert.equal(fake.has("virtualMachines", RG, "w6"), false);
    const disk = await compute.disks.get(RG, diskName);
    assert.equal(disk.diskState, "Unattached");
    assert.equal(disk.managedBy, undefined);
    const nicAfter = await network.networkInterfaces.get(RG, "w6-nic");
    assert.equal(nicAfter.virtualMachine, undefined);

    await compute.disks.beginDeleteAndWait(RG, diskName, FAST);
    const gone = await rejection(compute.disks.get(RG, diskName));
    assert.equal(gone.statusCode, 404);

    // NIC delete releases the public IP (its reference had deleteOption: 'Delete').
    await network.networkInterfaces.beginDeleteAndWait(RG, "w6-nic", FAST);
    assert.equal(fake.has("publicIPAddresses", RG, "w6-pip"), false);

    // deleteOption: 'Delete' on the OS disk removes it with the VM.
    const { nic: nic2 } = await createNetworking(network, fake, "w6b");
    const p = vmParams(nic2.id!);
    p.storageProfile!.osDisk!.deleteOption = "Delete";
    p.storageProfile!.osDisk!.name = "w6b-os";
    await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w6b", p, FAST);
    assert.equal(fake.has("disks", RG, "w6b-os"), true);
    await compute.virtualMachines.beginDeleteAndWait(RG, "w6b", FAST);
    assert.equal(fake.has("disks", RG, "w6b-os"), false);
  });

  test("404 is a RestError with statusCode 404 and ResourceNotFound", async () => {
    const { compute, network } = await startFake();
    const err = await rejection(compute.virtualMachines.get(RG, "nope"));
    assert.equal(err.name, "RestError");
    assert.equal(err.statusCode, 404);
    assert.equal(err.code, "ResourceNotFound");
    assert.match(err.message, /The Resource 'Microsoft\.Compute\/virtualMachines\/nope' under resource group 'rg-test' was not found/);
    const nerr = await rejection(network.publicIPAddresses.get(RG, "nope"));
    assert.equal(nerr.statusCode, 404);
    // Deleting something absent is a no-op (204), as on ARM.
    await compute.virtualMachines.beginDeleteAndWait(RG, "nope", FAST);
  });

  test("a wrong bearer token is a 401 InvalidAuthenticationToken", async () => {
    const { fake } = await startFake();
    const bad = new ComputeManagementClient(fakeTokenCredential("not-the-token"), fake.subscriptionId, fake.clientOptions());
    const err = await rejection(bad.virtualMachines.get(RG, "w"));
    assert.equal(err.name, "RestError");
    assert.equal(err.statusCode, 401);
    assert.equal(err.code, "InvalidAuthenticationToken");
    assert.equal(fake.countCalls({ status: 401 }), 1);
  });

  test("boot diagnostics: serial log readable through the SAS URI; guest power-off appends and stops", async () => {
    const { fake, compute, network } = await startFake();
    const { nic } = await createNetworking(network, fake, "w9");
    await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w9", vmParams(nic.id!), FAST);
    const uris = await compute.virtualMachines.retrieveBootDiagnosticsData(RG, "w9", { sasUriExpirationTimeInMinutes: 5 });
    assert.ok(uris.serialConsoleLogBlobUri?.startsWith(fake.endpoint));
    assert.match(uris.serialConsoleLogBlobUri!, /[?&]sig=/);
    assert.ok(uris.consoleScreenshotBlobUri);

    let log = await httpsGet(uris.serialConsoleLogBlobUri!, fake.ca);
    assert.equal(log.status, 200);
    assert.match(log.body, /AMD SEV SEV-ES SEV-SNP/);
    assert.match(log.body, /worker login: /);

    fake.guestPowerOff(RG, "w9", "compute-bridge: workload finished, exit=0\n");
    const vm = await compute.virtualMachines.get(RG, "w9", { expand: "instanceView" });
    assert.ok(statusCodes(vm).includes("PowerState/stopped"));
    log = await httpsGet(uris.serialConsoleLogBlobUri!, fake.ca);
    assert.match(log.body, /workload finished, exit=0\n$/);

    const tampered = uris.serialConsoleLogBlobUri!.replace(/sig=[^&]+/, "sig=AAAA");
    assert.equal((await httpsGet(tampered, fake.ca)).status, 403);
    fake.advanceTime(6 * 60_000);
    assert.equal((await httpsGet(uris.serialConsoleLogBlobUri!, fake.ca)).status, 403, "SAS expired");
  });

  test("the guest's boot script reports its SSH host key on first boot: fingerprint, none, or nothing", async () => {
    const { fake, compute, network } = await startFake({ bootDelayMs: 30_000 });
    const script = (id: string) => Buffer.from(`#!/bin/sh\nCB_REQUEST_ID='${id}'\nCB_SSH_USER='azureuser'\n`).toString("base64");
    const withScript = (nicId: string, id: string) => {
      const p = vmParams(nicId);
      p.osProfile!.customData = script(id);
      return p;
    };
    const { nic } = await createNetworking(network, fake, "k1");
    const vm = await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "k1", withScript(nic.id!, "req-k1"), FAST);
    const fp = fake.hostKeyFingerprint(RG, "k1");
    assert.match(fp, /^SHA256:[A-Za-z0-9+/]{43}$/);
    assert.equal(fp, fake.hostKeyFingerprint(RG, "k1"), "deterministic");
    assert.doesNotMatch(fake.serialLog(RG, "k1") ?? "", /COMPUTE-BRIDGE-HOSTKEY/, "not before the guest boots");
    fake.advanceTime(30_000);
    assert.equal(fake.powerState(RG, "k1"), "running");
    assert.equal((fake.serialLog(RG, "k1") ?? "").split("\n").filter((l) => l === `COMPUTE-BRIDGE-HOSTKEY req-k1 ${fp}`).length, 1);
    // Read the way the bridge does: through the SAS URI.
    const uris = await compute.virtualMachines.retrieveBootDiagnosticsData(RG, "k1");
    assert.ok((await httpsGet(uris.serialConsoleLogBlobUri!, fake.ca)).body.includes(`COMPUTE-BRIDGE-HOSTKEY req-k1 ${fp}\n`));
    // A second boot does not run the script again; an update without custom data keeps it.
    await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "k1", { ...vm, osProfile: { ...vm.osProfile, customData: undefined } }, FAST);
    await compute.virtualMachines.beginDeallocateAndWait(RG, "k1", FAST);
    await compute.virtualMachines.beginStartAndWait(RG, "k1", FAST);
    fake.advanceTime(30_000);
    assert.equal(fake.powerState(RG, "k1"), "running");
    assert.equal((fake.serialLog(RG, "k1") ?? "").match(/COMPUTE-BRIDGE-HOSTKEY/g)?.length, 1);

    // Per VM (set before it exists): no ed25519 key, or no report at all.
    fake.guestHostKey(RG, "k2", "none");
    fake.guestHostKey(RG, "k3", "never");
    for (const name of ["k2", "k3"]) {
      const { nic: n } = await createNetworking(network, fake, name);
      await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, name, withScript(n.id!, `req-${name}`), FAST);
    }
    fake.bootAll();
    assert.match(fake.serialLog(RG, "k2") ?? "", /^COMPUTE-BRIDGE-HOSTKEY req-k2 none$/m);
    assert.doesNotMatch(fake.serialLog(RG, "k3") ?? "", /COMPUTE-BRIDGE-HOSTKEY/);
    // The global switch (read as the guest boots); custom data that is not the bridge's script reports nothing.
    fake.faults.guestHostKey = "never";
    const { nic: n4 } = await createNetworking(network, fake, "k4");
    await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "k4", withScript(n4.id!, "req-k4"), FAST);
    fake.bootAll();
    fake.faults.guestHostKey = "fingerprint";
    const { nic: n5 } = await createNetworking(network, fake, "k5");
    await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "k5", vmParams(n5.id!), FAST);
    fake.bootAll();
    assert.equal(fake.powerState(RG, "k4"), "running");
    assert.doesNotMatch(fake.serialLog(RG, "k4") ?? "", /COMPUTE-BRIDGE-HOSTKEY/);
    assert.doesNotMatch(fake.serialLog(RG, "k5") ?? "", /COMPUTE-BRIDGE-HOSTKEY/);

    // Boot diagnostics turned off: retrieveBootDiagnosticsData is refused with 409 OperationNotAllowed.
    const off = await compute.virtualMachines.get(RG, "k2");
    await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "k2", { ...off, diagnosticsProfile: { bootDiagnostics: { enabled: false } } }, FAST);
    const err = await rejection(compute.virtualMachines.retrieveBootDiagnosticsData(RG, "k2"));
    assert.equal(err.statusCode, 409);
    assert.equal(err.code, "OperationNotAllowed");
    assert.match(err.message, /Boot diagnostics is not enabled/);
  });

  test("power actions and the 202 + Location create style", async () => {
    const { fake, compute, network } = await startFake({ createLroStyle: "location" });
    const { nic } = await createNetworking(network, fake, "w10");
    const vm = await compute.virtualMachines.beginCreateOrUpdateAndWait(RG, "w10", vmParams(nic.id!), FAST);
    assert.equal(vm.provisioningState, "Succeeded");
    assert.equal(fake.findCalls({ method: "PUT", path: /virtualMachines\/w10$/ })[0]?.status, 202);

    await compute.virtualMachines.beginDeallocateAndWait(RG, "w10", FAST);
    assert.equal(fake.powerState(RG, "w10"), "deallocated");
    fake.faults.allocationFailure = (r) => (r.operation === "start" ? "ZonalAllocationFailed" : false);
    const err = await rejection(compute.virtualMachines.beginStartAndWait(RG, "w10", FAST));
    assert.match(err.message, /ZonalAllocationFailed/);
    assert.equal(fake.powerState(RG, "w10"), "deallocated");
    fake.faults.allocationFailure = null;
    await compute.virtualMachines.beginStartAndWait(RG, "w10", FAST);
    assert.equal(fake.powerState(RG, "w10"), "running");
    await compute.virtualMachines.beginPowerOffAndWait(RG, "w10", FAST);
    assert.equal(fake.powerState(RG, "w10"), "stopped");
  });
});
