/**
 * bench/azure-watch: ARM requests per poll interval while the Azure backend watches N VMs, against
 * the ARM fake over https with the real SDK clients. Batched watching lists the VMs' power states
 * once per interval (listAll statusOnly, one request per page), where per-VM polling would send N GETs.
 *   node --import tsx bench/azure-watch.ts [vms] [page_size]
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net, { type AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { AzureBackend } from "../src/backends/azure.js";
import { azureNaming } from "../src/backends/azure/naming.js";
import { exitMarker } from "../src/backends/common/cloud-init.js";
import { OfferingCache } from "../src/backends/offering-cache.js";
import { AzureConfig } from "../src/config/schema.js";
import { Almanac, type ProvisionedInstance } from "../src/domain/index.js";
import { systemClock } from "../src/util/clock.js";
import { createLogger } from "../src/util/logger.js";
import { ArmFake } from "../test/fakes/arm.js";

const RG = "rg-bench";
const POLL_S = 0.05;

export interface AzureWatchResult {
  vms: number;
  pageSize: number;
  provisionSeconds: number;
  pollsObserved: number;
  /** ARM requests per poll interval while all VMs were watched (list pages). */
  armRequestsPerPoll: number;
  /** What per-VM polling would send per interval. */
  perVmRequestsPerPoll: number;
  perVmGetsWhileWatching: number;
  /** From the last power-off until every watch reported its exit code. */
  exitObservedMs: number;
  text: string;
}

export async function run(vms = 200, pageSize = 100): Promise<AzureWatchResult> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "cb-bench-azure-"));
  const fake = await ArmFake.start({ pageSize, lroInProgressPolls: 0, deleteInProgressPolls: 0 });
  const sshd = net.createServer((s) => s.end("SSH-2.0-OpenSSH_9.2p1 bench\r\n"));
  await new Promise<void>((r) => sshd.listen(0, "127.0.0.1", r));
  writeFileSync(path.join(dir, "ca.pem"), fake.ca);
  const cfg = AzureConfig.parse({
    subscription_id: fake.subscriptionId,
    resource_group: RG,
    regions: ["westeurope"],
    vm_sizes: [{ name: "Standard_D2s_v5", vcpus: 2, memory_mib: 8192 }],
    max_concurrent_instances: vms,
    image: { publisher: "Canonical", offer: "ubuntu-24_04-lts", sku: "server" },
    subnet_id: `/subscriptions/${fake.subscriptionId}/resourceGroups/${RG}/providers/Microsoft.Network/virtualNetworks/v/subnets/s`,
    managed_identity: true,
    endpoint: fake.endpoint,
    ca_file: "ca.pem",
    poll_interval_seconds: POLL_S,
    ssh_port: (sshd.address() as AddressInfo).port,
  });
  const almanac = new Almanac(new Date(0), 0.001);
  const backend = new AzureBackend(
    cfg,
    { providerId: "bench", stateDir: dir, configDir: dir, log: createLogger("silent"), clock: systemClock, almanac, unavailable: new OfferingCache(1000, systemClock) },
    { credential: fake.credential(), retryDelayInMs: 1 },
  );
  const naming = azureNaming("bench");
  const envelope = { image: { url: "https://127.0.0.1:9/x.tar.gz", sha256: "a".repeat(64), format: "bundle" as const }, ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb0 bench" };
  try {
    const ids = Array.from({ length: vms }, (_, i) => `bench-${i}`);
    const t0 = performance.now();
    const insts: ProvisionedInstance[] = [];
    for (let i = 0; i < ids.length; i += 20)
      insts.push(...(await Promise.all(ids.slice(i, i + 20).map((id) => backend.provision({ request_id: id, region: "westeurope", tdx_required: false, cpu_millicores: 1000, ram_mib: 1024, valid_to: Date.now() + 600_000 }, envelope, new AbortController().signal)))));
    const provisionSeconds = (performance.now() - t0) / 1000;

    // The watch's status call: listAll(statusOnly), subscription-wide (one per interval for every VM).
    const listPath = /^\/subscriptions\/[^/]+\/providers\/Microsoft\.Compute\/virtualMachines$/;
    const start = fake.calls.length;
    const firstPages = () => fake.findCalls((c) => c.seq > start && c.method === "GET" && listPath.test(c.path) && c.query["$skiptoken"] === undefined).length;
    // One signal per watch, as the GrantManager gives each grant its own.
    const watches = insts.map((i) => backend.watchUntilExit(i, new Date(Date.now() + 600_000), new AbortController().signal));
    while (firstPages() < 10) await new Promise((r) => setTimeout(r, POLL_S * 1000));
    const window = fake.findCalls((c) => c.seq > start);
    const polls = firstPages();
    const armGets = window.filter((c) => c.kind === "arm" && c.method === "GET");
    const perVmGets = armGets.filter((c) => /\/virtualMachines\/[^/]+$/.test(c.path)).length;

    for (const id of ids) fake.guestPowerOff(RG, naming.names(id).vm, `${exitMarker(id, 0)}\n`);
    const t1 = performance.now();
    const obs = await Promise.all(watches);
    const exitObservedMs = performance.now() - t1;
    if (obs.some((o) => o.exit_code !== 0)) throw new Error("a watch did not report exit code 0");
    for (let i = 0; i < insts.length; i += 20) await Promise.all(insts.slice(i, i + 20).map((x) => backend.terminate(x)));

    const armRequestsPerPoll = armGets.length / polls;
    const text = [
      `VMs watched                         ${vms} (list page size ${pageSize})`,
      `provision (20 at a time)            ${provisionSeconds.toFixed(1)} s`,
      `ARM requests per poll interval      ${armRequestsPerPoll.toFixed(1)} (per-VM polling: ${vms})`,
      `per-VM GETs while watching          ${perVmGets}`,
      `all ${vms} exits observed after      ${exitObservedMs.toFixed(0)} ms (poll interval ${POLL_S * 1000} ms; includes ${vms} boot-diagnostics reads)`,
    ].join("\n");
    return { vms, pageSize, provisionSeconds, pollsObserved: polls, armRequestsPerPoll, perVmRequestsPerPoll: vms, perVmGetsWhileWatching: perVmGets, exitObservedMs, text };
  } finally {
    await backend.close();
    await fake.close();
    await new Promise<void>((r) => sshd.close(() => r()));
    rmSync(dir, { recursive: true, force: true });
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const r = await run(Number(process.argv[2] ?? 200), Number(process.argv[3] ?? 100));
  console.log(`azure batched watch\n${r.text}`);
}
