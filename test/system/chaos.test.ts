/**
 * Chaos: the real daemon (a child process, ./run-daemon-injected.ts) with EVERY backend enabled
 * against the project's fakes — aws -> Ec2Fake, gcp -> GceFake, azure -> ArmFake (https, ca_file),
 * local (real processes), baremetal -> a real sshd with the systemd stand-ins (the BAREMETAL
 * plug-in below) — takes 300 grants spread across the backends while:
 *
 * - the fakes throttle 30 % of calls and answer 5 % with 5xx, report capacity errors (EC2
 *   InsufficientInstanceCapacity, GCE ZONE_RESOURCE_POOL_EXHAUSTED, ARM AllocationFailed) and
 *   boot slowly now and then; every SSH connection to the bare-metal machine drops twice;
 * - the daemon is killed with SIGKILL at 10 seeded-random moments (mid-create: right after a
 *   create call reached a fake; mid-watch: while grants run; mid-terminate: right after a delete
 *   call reached a fake) and restarted each time;
 * - a guest simulator powers each running instance off with the boot script's exit marker after
 *   a short random run time (a few never end: they expire at valid_to; a few are cancelled).
 *
 * At the end: every grant is terminal with a (signed) ComputeLog, completed ones carry their exit
 * code, no instance / NIC / IP / disk / workload is left on any fake or host, and no grant was
 * provisioned twice (creations counted per request id at the fakes: EC2 ClientToken and request
 * tag, GCE successful inserts by the request id in their metadata, ARM VM allocations by the
 * request id tag, local/bare-metal workload starts; plus distinct instances seen booting). The figures are printed (t.diagnostic and a table on stdout).
 *
 *   node --import tsx --test test/system/chaos.test.ts      (CB_CHAOS_SEED=<n> replays a run)
 *
 * Nothing sleeps to synchronise: every wait polls a condition. Only 127.0.0.1 is contacted (the
 * runner's network guard would report anything else).
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it, type TestContext } from "node:test";
import { TAG_REQUEST } from "../../src/backends/azure/naming.js";
import { META_REQUEST_ID } from "../../src/backends/gcp/naming.js";
import { REGISTRY } from "../../src/backends/registry.js";
import { verifySignedDoc } from "../../src/util/identity.js";
import { ArmFake, type AllocationRequest } from "../fakes/arm.js";
import { Ec2Fake } from "../fakes/ec2.js";
import { GceFake } from "../fakes/gce.js";
import { makeTestCert } from "../fakes/tls.js";
import { tickIn, TEST_TOKEN } from "../helpers/config.js";
import { call } from "../helpers/http.js";
import { tempDir } from "../helpers/tmp.js";
import {
  bannerServer,
  dumpLives,
  EC2_REQUEST_TAG,
  freePort,
  GUARD_MARKER,
  GuestSim,
  imageServer,
  poll,
  prng,
  spawnInjected,
  TERMINAL,
  tomlSection,
  tv,
  type GuestPlan,
  type InjectedDaemon,
  type InjectSpec,
} from "./helpers.js";
import { liveLocalRuns } from "../helpers/proc.js";

const SEED = Number(process.env.CB_CHAOS_SEED ?? 20261128);
const GRANTS = 300;
const KILLS = 10;
const PROVIDER = "chaos-provider";
const GCP_PROJECT = "chaos-project";
const RG = "rg-chaos";

/**
 * Where each grant goes first (fleet order aws, gcp, azure, baremetal, local), by region and shape.
 * Failover paths: AWS capacity -> Azure (serves us-east-1 too); GCP capacity in both zones ->
 * Azure (serves us-central1 too); Azure capacity -> bare metal -> local; bare metal full -> local.
 */
const SHARES = [
  { name: "aws", region: "us-east-1", cpu: 1000, ram: 2048, weight: 25 },
  { name: "gcp", region: "us-central1", cpu: 1000, ram: 2048, weight: 25 },
  { name: "azure", region: "westeurope", cpu: 1000, ram: 2048, weight: 20 },
  // too large for Azure's 2-vCPU size; fits the bare-metal machine (local takes it without bare metal)
  { name: "baremetal", region: "westeurope", cpu: 3000, ram: 4096, weight: 15 },
  // too large for the bare-metal machine too
  { name: "local", region: "westeurope", cpu: 6000, ram: 16384, weight: 15 },
] as const;

type Phase = "create" | "watch" | "terminate";

interface Planned {
  id: string;
  share: (typeof SHARES)[number]["name"];
  region: string;
  cpu: number;
  ram: number;
  guest: GuestPlan;
  /** Cancel (DELETE) this long after it was accepted; null: never. */
  cancelAfterMs: number | null;
}

interface Kill {
  n: number;
  phase: Phase;
  trigger: string;
  atMs: number;
  restartMs: number;
}

// ---- the BAREMETAL plug-in ------------------------------------------------------------------------
// The single place where the bare-metal backend joins the chaos run. It is enabled whenever
// src/backends/registry.ts registers `baremetal` (without it the run skips it and says so): one
// real OpenSSH server from test/fakes/sshd.ts as a machine in systemd mode
// serving westeurope with 12 vCPUs / 24 GiB, between Azure and local in the fleet order: it takes
// the 3-vCPU grants (too large for Azure) and Azure's capacity failovers; when it is full, and for
// grants too large for it, local. Its workloads are the same image as local's and append to the
// same starts file (counted for duplicates); units still active in the stand-ins' state
// (`systemctl list-units` of test/fakes/bin) are leftovers.
interface BaremetalPlugin {
  toml: string;
  /** Units of this bridge still active on the machine. */
  activeUnits(): string[];
  /** Kill every SSH connection to the machine (the backend must reconnect and carry on). */
  dropSessions(): Promise<number>;
  close(): Promise<void>;
}

async function baremetalPlugin(dir: string): Promise<BaremetalPlugin | null> {
  if (REGISTRY.baremetal === null) return null;
  const { startSshd, ensureSshdInstalled, STANDINS_BIN_DIR } = await import("../fakes/sshd.js");
  ensureSshdInstalled();
  const sshd = await startSshd();
  const work = path.join(dir, "baremetal-work");
  mkdirSync(work, { recursive: true });
  const toml =
    tomlSection("backends.baremetal", { poll_interval_ms: 200, connect_timeout_ms: 5000, keepalive_interval_ms: 2000, ready_timeout_seconds: 30 }) +
    `\n[[backends.baremetal.machines]]\n${Object.entries({
      name: "rack-chaos-1",
      host: sshd.host,
      port: sshd.port,
      user: sshd.user,
      private_key_file: sshd.privateKeyPath,
      host_key_sha256: sshd.hostKeySha256,
      region: "westeurope",
      cpu_millicores: 12000,
      ram_mib: 24576,
      mode: "systemd",
      work_dir: work,
    })
      .map(([k, v]) => `${k} = ${tv(v)}`)
      .join("\n")}\n`;
  return {
    toml,
    activeUnits: () => {
      const out = execFileSync(path.join(STANDINS_BIN_DIR, "systemctl"), ["list-units", "--all", "--plain", "--no-legend", "--type=service", "cb-*"], {
        env: { ...process.env, CB_FAKE_STATE: sshd.stateDir, PATH: `${STANDINS_BIN_DIR}:${process.env.PATH ?? "/usr/bin:/bin"}` },
        encoding: "utf8",
      });
      return out
        .split("\n")
        .map((l) => l.trim().split(/\s+/))
        .filter((c) => c.length >= 3 && ["active", "activating", "deactivating", "reloading"].includes(c[2]!))
        .map((c) => `${c[0]} ${c[2]}`);
    },
    dropSessions: () => sshd.dropSessions(),
    close: () => sshd.stop(),
  };
}

// ---- helpers ------------------------------------------------------------------------------------

function countBy<K>(items: Iterable<K>): Map<K, number> {
  const m = new Map<K, number>();
  for (const k of items) m.set(k, (m.get(k) ?? 0) + 1);
  return m;
}

function shuffle<T>(a: T[], rnd: () => number): T[] {
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

function pct(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? 0;
}

function table(rows: (string | number)[][]): string {
  const cells = rows.map((r) => r.map(String));
  const w = cells[0]!.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? "").length)));
  return cells.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join("  ")).join("\n");
}

// ---- the test -------------------------------------------------------------------------------------

describe("chaos", { timeout: 280_000 }, () => {
  it(`${GRANTS} grants over every backend, ${KILLS} x kill -9, throttling, 5xx, capacity errors and slow boots: each grant ends once with a ComputeLog, nothing is left running`, async (t: TestContext) => {
    const started = Date.now();
    const rnd = prng(SEED);
    const dir = tempDir(t, "cb-chaos-");
    const stateDir = path.join(dir, "state");
    const startsFile = path.join(dir, "starts");
    writeFileSync(startsFile, "");

    // ---- fakes and loopback servers ----
    const sshPort = await bannerServer(t);
    const images = await imageServer(t);
    // One image for every backend: local and bare metal really run it (it records its start);
    // the cloud guests are simulated from the same plan.
    const image = images.add(
      "workload",
      `#!/bin/sh\necho "$CB_GRANT" >> ${startsFile}\nif [ "$HANG" = 1 ]; then exec sleep 3600; fi\nsleep "$RUN_S"\nexit "$CODE"\n`,
    );

    const faultRnd = prng(SEED ^ 0x9e3779b9);
    const ec2 = await Ec2Fake.start({ seed: SEED, now: Date.now, faults: { throttleRate: 0.3, serverErrorRate: 0.05, bootDelayMs: 300, terminateDelayMs: 200 } });
    t.after(() => ec2.close());
    ec2.faults.capacity = () => (faultRnd() < 0.08 ? "InsufficientInstanceCapacity" : null);

    const gce = await GceFake.start({ project: GCP_PROJECT, seed: SEED, now: Date.now, zones: ["us-central1-a", "us-central1-b"], bootDelayMs: 400, deleteDelayMs: 300, waitTimeoutMs: 5000 });
    t.after(() => gce.close());
    Object.assign(gce.faults, { rateLimitRate: 0.3, serverErrorRate: 0.05, poolExhausted: () => faultRnd() < 0.25 });

    const cert = await makeTestCert();
    const allocations = new Map<string, number>(); // request id (the VM's tag) -> successful ARM allocations
    let allocationFailures = 0;
    const arm = await ArmFake.start({ tls: cert, seed: SEED, bootDelayMs: 300, lroInProgressPolls: 1, deleteInProgressPolls: 1, resourceGroups: [RG] });
    t.after(() => arm.close());
    Object.assign(arm.faults, {
      throttleRate: 0.3,
      serverErrorRate: 0.05,
      allocationFailure: (req: AllocationRequest) => {
        if (faultRnd() < 0.1) return allocationFailures++, "AllocationFailed";
        const rid = String(req.body?.["tags"]?.[TAG_REQUEST] ?? `?${req.name}`);
        allocations.set(rid, (allocations.get(rid) ?? 0) + 1);
        return null;
      },
    });

    // Slow boots: now and then a fake boots everything it creates next slowly (seeded).
    const slow = { ec2: 0, gce: 0, arm: 0 };
    const slowTimer = setInterval(() => {
      const s = faultRnd() < 0.2;
      ec2.faults.bootDelayMs = s ? (slow.ec2++, 2500) : 300;
      const g = faultRnd() < 0.2;
      gce.faults.bootDelayMs = g ? (slow.gce++, 3000) : 400;
      const a = faultRnd() < 0.2;
      arm.faults.bootDelayMs = a ? (slow.arm++, 2500) : 300;
    }, 700);
    t.after(() => clearInterval(slowTimer));

    const baremetal = await baremetalPlugin(dir);
    if (baremetal) t.after(() => baremetal.close());
    else t.diagnostic("baremetal is not registered in src/backends/registry.ts: the BAREMETAL plug-in is skipped");

    // ---- the boot config ----
    writeFileSync(path.join(dir, "token"), `${TEST_TOKEN}\n`, { mode: 0o600 });
    writeFileSync(path.join(dir, "aws-akid"), `${ec2.credentials.accessKeyId}\n`, { mode: 0o600 });
    writeFileSync(path.join(dir, "aws-secret"), `${ec2.credentials.secretAccessKey}\n`, { mode: 0o600 });
    writeFileSync(path.join(dir, "gcp-key.json"), JSON.stringify({ type: "service_account", client_email: "chaos@chaos-project.iam.gserviceaccount.com", private_key: "unused: the test injects an authClient" }), { mode: 0o600 });
    writeFileSync(path.join(dir, "arm-ca.pem"), cert.ca);
    const port = await freePort();
    const subnet = (vnet: string) => `/subscriptions/${arm.subscriptionId}/resourceGroups/${RG}/providers/Microsoft.Network/virtualNetworks/${vnet}/subnets/default`;
    const common = { launch_timeout_seconds: 90, ready_timeout_seconds: 60, orphan_grace_seconds: 3600, reconcile_interval_seconds: 3600, ssh_port: sshPort };
    const order = ["aws", "gcp", "azure", ...(baremetal ? ["baremetal"] : []), "local"];
    const config = path.join(dir, "bridge.toml");
    writeFileSync(
      config,
      [
        tomlSection("bridge", { provider_id: PROVIDER, state_dir: "state", image_allow_cidrs: ["127.0.0.1/32"] }), // images from the test server on loopback
        tomlSection("listener", { bind: `127.0.0.1:${port}`, token_file: "token" }),
        tomlSection("almanac", { genesis: "2026-01-01T00:00:00Z", tick_seconds: 1 }),
        tomlSection("log", { level: "info" }),
        tomlSection("fleet", { order, max_attempts: 3, unavailable_ttl_seconds: 2 }),
        tomlSection("backends.aws", {
          instance_types: ["m6i.large", "m6i.xlarge"],
          max_concurrent_instances: 400,
          access_key_id_file: "aws-akid",
          secret_access_key_file: "aws-secret",
          endpoint: ec2.endpoint,
          poll_interval_seconds: 0.25,
          ...common,
        }),
        tomlSection("backends.aws.regions.us-east-1", { image_id: "ami-0123456789abcdef0", subnet_id: "subnet-0123abcd", security_group_ids: ["sg-0123abcd"] }),
        tomlSection("backends.gcp", {
          project: GCP_PROJECT,
          zones: ["us-central1-a", "us-central1-b"],
          machine_types: [{ name: "e2-standard-2", vcpus: 2, memory_mib: 8192 }],
          max_concurrent_instances: 400,
          image: "projects/debian-cloud/global/images/family/debian-12",
          credentials_file: "gcp-key.json",
          api_endpoint: `http://127.0.0.1:${gce.port}`,
          poll_interval_seconds: 0.2,
          ...common,
        }),
        tomlSection("backends.azure", {
          subscription_id: arm.subscriptionId,
          resource_group: RG,
          regions: ["westeurope", "us-east-1", "us-central1"],
          vm_sizes: [{ name: "Standard_D2s_v5", vcpus: 2, memory_mib: 8192 }],
          max_concurrent_instances: 400,
          image: { publisher: "Canonical", offer: "ubuntu-24_04-lts", sku: "server", version: "latest" },
          subnet_id: { westeurope: subnet("vnet-weu"), "us-east-1": subnet("vnet-use"), "us-central1": subnet("vnet-usc") },
          managed_identity: true,
          endpoint: arm.endpoint,
          ca_file: "arm-ca.pem",
          poll_interval_seconds: 0.15,
          ...common,
        }),
        baremetal?.toml ?? "# [backends.baremetal]: see the BAREMETAL plug-in in test/system/chaos.test.ts\n",
        tomlSection("backends.local", { region: "westeurope", cpu_millicores: 64000, ram_mib: 262144, max_concurrent: 400, poll_interval_ms: 100, terminate_grace_seconds: 1 }),
      ].join("\n"),
    );
    const spec: InjectSpec = {
      aws: { retry: { maxAttempts: 8, delayMs: 5 }, options: { readyPollIntervalMs: 100, sshProbeIntervalMs: 50, consoleGraceMs: 5000 } },
      gcp: { accessToken: gce.accessToken, options: { retry: { attempts: 8, baseMs: 5, capMs: 50 }, sshProbeIntervalMs: 50 } },
      azure: { accessToken: arm.accessToken, options: { retryDelayInMs: 5, maxRetries: 8 } },
      daemon: { expiryGraceMs: 3000, retryBaseMs: 100 },
    };

    // ---- the plan (seeded) ----
    const weights = SHARES.flatMap((s) => Array.from({ length: s.weight }, () => s));
    const plans: Planned[] = shuffle(
      Array.from({ length: GRANTS }, (_, i) => {
        const s = weights[i % weights.length]!;
        const r = rnd();
        const guest: GuestPlan = r < 0.04 ? { hang: true } : { runMs: 200 + Math.floor(rnd() * 1500), code: Math.floor(rnd() * 8) };
        const cancelAfterMs = !("hang" in guest) && rnd() < 0.03 ? 300 + Math.floor(rnd() * 2500) : null;
        return { id: `chaos-${String(i).padStart(3, "0")}`, share: s.name, region: s.region, cpu: s.cpu, ram: s.ram, guest, cancelAfterMs };
      }),
      rnd,
    );
    const byId = new Map(plans.map((p) => [p.id, p]));
    const guests = new GuestSim({
      ec2,
      gce: { fake: gce, project: GCP_PROJECT },
      arm: { fake: arm, resourceGroup: RG },
      mode: { marker: (rid) => byId.get(rid)?.guest ?? { runMs: 100, code: 0 } },
      intervalMs: 50,
    });
    t.after(() => guests.stop());

    // ---- the daemon, its lives and their output ----
    const lives: InjectedDaemon[] = [];
    let daemon: InjectedDaemon | null = null;
    const base = `http://127.0.0.1:${port}`;
    const launch = async () => {
      const t0 = Date.now();
      daemon = await spawnInjected(config, spec);
      lives.push(daemon);
      return Date.now() - t0;
    };
    t.after(async () => {
      for (const d of lives) await d.kill9();
    });
    const firstStartMs = await launch();
    try {
      /** One HTTP call to whichever daemon is up; connection errors (a kill) are retried. */
      const api = async (method: string, p: string, body?: unknown) => {
        for (;;) {
          try {
            const r = await call(base, method, p, body);
            if (r.status !== 503) return r;
          } catch {
            /* the daemon is down (killed): try again once it is back */
          }
          await new Promise((r) => setTimeout(r, 50));
        }
      };

      // ---- submitting: paced over ~35 s, retrying across kills ----
      const accepted = new Set<string>();
      const lapsed = new Set<string>();
      const postStatus = new Map<number, number>();
      let declined = 0;
      let cancels = 0;
      // One body per grant, re-posted unchanged across kills and 422s (a market retry is the same
      // grant). A hanging grant's validity must outlast that: 45 s covers a loaded machine's retries
      // (20 s did not: its re-post was answered 400 "valid_to already in the past").
      const body = (p: Planned) => ({
        grant: { request_id: p.id, region: p.region, tdx_required: false, cpu_millicores: p.cpu, ram_mib: p.ram, valid_to: tickIn("hang" in p.guest ? 45 : 180) },
        envelope: {
          image: { url: image.url, sha256: image.sha256, format: "bundle" },
          env: { CB_GRANT: p.id, HANG: "hang" in p.guest ? "1" : "0", RUN_S: "hang" in p.guest ? "0" : (p.guest.runMs / 1000).toFixed(3), CODE: "hang" in p.guest ? "0" : String(p.guest.code) },
        },
      });
      const cancelLater = async (p: Planned, afterMs: number) => {
        await new Promise((r) => setTimeout(r, afterMs));
        const r = await api("DELETE", `/v1/grants/${p.id}`);
        assert.ok([200, 202].includes(r.status), `DELETE ${p.id}: ${r.status} ${r.text}`);
        cancels++;
      };
      const postMs: number[] = [];
      const submitOne = async (p: Planned) => {
        const b = body(p);
        for (;;) {
          const t1 = Date.now();
          const r = await api("POST", "/v1/grants", b);
          postMs.push(Date.now() - t1);
          postStatus.set(r.status, (postStatus.get(r.status) ?? 0) + 1);
          if (r.status === 202 || r.status === 200) break;
          // Its validity ran out while the market kept re-posting it (kills, a loaded machine): the
          // market gives up on it. Never accepted (an accepted one is answered from the store).
          if (r.status === 400 && r.text.includes("already in the past")) {
            lapsed.add(p.id);
            return;
          }
          // 422: nothing can take it right now (every fitting offering just reported no capacity): the market retries later.
          assert.equal(r.status, 422, `POST ${p.id}: ${r.status} ${r.text}`);
          declined++;
          await new Promise((res) => setTimeout(res, 200));
        }
        accepted.add(p.id);
        if (p.cancelAfterMs !== null) await cancelLater(p, p.cancelAfterMs);
      };
      const submitStart = Date.now();
      const submitting = (async () => {
        const queue = [...plans];
        const inflight = new Set<Promise<void>>();
        for (let i = 0; queue.length > 0; i++) {
          // Pacing of the load (one grant every ~115 ms), not synchronisation.
          const due = submitStart + i * 115;
          if (Date.now() < due) await new Promise((r) => setTimeout(r, due - Date.now()));
          const p = submitOne(queue.shift()!).finally(() => inflight.delete(p));
          inflight.add(p);
          while (inflight.size >= 12) await Promise.race(inflight);
        }
        await Promise.all(inflight);
      })();
      submitting.catch(() => undefined); // awaited (and so reported) after the kills

      // ---- 10 x kill -9 at seeded moments in seeded phases ----
      const phases = shuffle<Phase>(["create", "create", "create", "create", "watch", "watch", "watch", "terminate", "terminate", "terminate"], rnd);
      const cursor = { ec2: 0, gce: 0, arm: 0, starts: 0 };
      const fresh = () => {
        cursor.ec2 = ec2.calls.length;
        cursor.gce = gce.calls.length;
        cursor.arm = arm.calls.length;
        cursor.starts = readFileSync(startsFile, "utf8").length;
      };
      type Target = "aws" | "gcp" | "azure" | "local";
      /**
       * The first create (or delete) call `target` answered successfully since fresh(), if any
       * (any backend's once `anyAfter` has passed: late in the run one backend may be idle).
       */
      const sawCall = (phase: "create" | "terminate", target: Target, anyAfter: number): string | null => {
        const any = Date.now() > anyAfter;
        for (; cursor.ec2 < ec2.calls.length; cursor.ec2++) {
          const c = ec2.calls[cursor.ec2]!;
          if ((any || target === "aws") && c.status < 300 && c.action === (phase === "create" ? "RunInstances" : "TerminateInstances")) return `aws ${c.action}`;
        }
        for (; cursor.gce < gce.calls.length; cursor.gce++) {
          const c = gce.calls[cursor.gce]!;
          if ((any || target === "gcp") && c.status < 300 && c.method === (phase === "create" ? "instances.insert" : "instances.delete")) return `gcp ${c.method}`;
        }
        for (; cursor.arm < arm.calls.length; cursor.arm++) {
          const c = arm.calls[cursor.arm]!;
          const hit = phase === "create" ? c.method === "PUT" && /\/virtualMachines\//i.test(c.path) : c.method === "DELETE";
          if ((any || target === "azure") && c.status < 300 && c.kind === "arm" && hit) return `azure ${c.method} ${c.path.split("/").slice(-2).join("/")}`;
        }
        if (phase === "create" && (any || target === "local")) {
          const len = readFileSync(startsFile, "utf8").length;
          if (len > cursor.starts) return "local/baremetal workload start";
        }
        return null;
      };
      const kills: Kill[] = [];
      const sshDrops: number[] = [];
      for (let k = 0; k < KILLS; k++) {
        // A seeded pause, so kills spread over the run; then wait for the phase's moment.
        const pause = 200 + Math.floor(rnd() * 1600);
        await new Promise((r) => setTimeout(r, pause));
        // Twice during the run, every SSH connection to the bare-metal machine drops.
        if (baremetal && (k === 2 || k === 6)) sshDrops.push(await baremetal.dropSessions());
        const phase = phases[k]!;
        const targets: Target[] = phase === "create" ? ["aws", "gcp", "azure", "local"] : ["aws", "gcp", "azure"];
        const target = targets[Math.floor(rnd() * targets.length)]!;
        // Late in the run the chosen backend (or phase) may have gone quiet: after 10 s any
        // backend will do, after 20 s any of the three moments.
        const anyAfter = Date.now() + 10_000;
        const anyPhaseAfter = Date.now() + 20_000;
        fresh();
        let askedAt = 0;
        const running = async (min: number) => {
          if (Date.now() - askedAt < 100) return null; // at most 10 questions a second
          askedAt = Date.now();
          const r = await call(base, "GET", "/v1/grants?state=running&limit=1000").catch(() => null);
          const n = r?.status === 200 ? (r.body.grants as unknown[]).length : 0;
          return n >= min ? `${n} grants running` : null;
        };
        const trigger = await poll(
          async () => {
            if (Date.now() > anyPhaseAfter) return sawCall("create", target, 0) ?? sawCall("terminate", target, 0) ?? (await running(1));
            if (phase !== "watch") return sawCall(phase, target, anyAfter);
            return running(Date.now() > anyAfter ? 1 : 5);
          },
          `a ${phase} moment for kill ${k + 1}`,
          60_000,
          2,
        );
        // A few ms of seeded jitter inside the window (the call's reply is in flight or just handled).
        const jitter = Math.floor(rnd() * (phase === "watch" ? 300 : 15));
        if (jitter > 0) await new Promise((r) => setTimeout(r, jitter));
        const atMs = Date.now() - started;
        await daemon!.kill9();
        const restartMs = await launch();
        kills.push({ n: k + 1, phase, trigger, atMs, restartMs });
        t.diagnostic(`kill ${k + 1}/${KILLS} at ${(atMs / 1000).toFixed(1)} s: ${phase} (${trigger}); restarted in ${restartMs} ms`);
      }

      // ---- drain: everything submitted, everything terminal ----
      await submitting;
      const submitMs = Date.now() - submitStart;
      type View = { request_id: string; state: string; backend: string | null; error: { kind: string; message: string } | null; attempts: { backend: string; error_kind: string }[] };
      let grants: View[] = [];
      let lastCallError = "";
      try {
        await poll(
          async () => {
            // A call that fails (a loaded machine resets a connection now and then) is asked again;
            // a daemon that stays unreachable ends the wait with that error.
            const r = await call(base, "GET", "/v1/grants?limit=1000").catch((e: unknown) => {
              lastCallError = `; last call failed: ${(e as Error).message} (${String((e as { cause?: unknown }).cause ?? "")})`;
              return null;
            });
            if (!r) return false;
            grants = r.body.grants as View[];
            return grants.length === accepted.size && grants.every((g) => TERMINAL.includes(g.state));
          },
          "every grant to reach a terminal state",
          90_000,
          500,
        );
      } catch (e) {
        const open = grants.filter((g) => !TERMINAL.includes(g.state)).map((g) => `${g.request_id}:${g.backend}:${g.state}`);
        throw new Error(`${(e as Error).message}${lastCallError}; ${grants.length} grants listed, open: ${open.join(", ")}`);
      }
      const drainMs = Date.now() - started;

      // ---- leftovers: poll until the fakes settle (deletes take their delay), then count ----
      const liveEc2 = () => ec2.instances.filter((i) => i.state !== "terminated");
      const liveGce = () => gce.listInstances({ project: GCP_PROJECT });
      const liveArm = () => (["virtualMachines", "networkInterfaces", "publicIPAddresses", "disks"] as const).flatMap((ty) => arm.list(ty, RG).map((r) => `${ty}/${String(r["name"])}`));
      const leftovers = () => ({ aws: liveEc2().map((i) => i.instanceId), gcp: liveGce().map((i) => String(i["name"])), azure: liveArm(), local: [...liveLocalRuns(stateDir).keys()], baremetal: baremetal?.activeUnits() ?? [] });
      await poll(() => Object.values(leftovers()).every((l) => l.length === 0), "the fakes to settle", 15_000, 100).catch(() => undefined);
      const left = leftovers();

      // ---- creations per request id at the fakes ----
      // The request id each creation was for, as the create call itself said (tag / metadata).
      const gceRid = (body: Record<string, unknown>) =>
        ((body["metadata"] as { items?: { key: string; value: string }[] } | undefined)?.items ?? []).find((m) => m.key === META_REQUEST_ID)?.value ?? `?${String(body["name"])}`;
      const starts = countBy(readFileSync(startsFile, "utf8").split("\n").filter(Boolean));
      const finalBackend = new Map(grants.map((g) => [g.request_id, g.backend]));
      const creates: Record<string, Map<string, number>> = {
        aws: countBy(ec2.instances.map((i) => i.tags[EC2_REQUEST_TAG] ?? "?")),
        gcp: countBy(gce.creates.filter((c) => c.outcome === "ok").map((c) => gceRid(c.body))),
        azure: allocations,
        // Local and bare-metal workloads append to one starts file: attributed to the grant's backend.
        baremetal: new Map([...starts].filter(([rid]) => finalBackend.get(rid) === "baremetal")),
        local: new Map([...starts].filter(([rid]) => finalBackend.get(rid) !== "baremetal")),
      };
      const perGrant = new Map<string, number>();
      for (const m of Object.values(creates)) for (const [rid, n] of m) perGrant.set(rid, (perGrant.get(rid) ?? 0) + n);
      const duplicates = [...perGrant].filter(([, n]) => n > 1);
      const tokenDuplicates = [...ec2.createsByToken].filter(([, n]) => n > 1);
      const bootDuplicates = [...guests.boots].filter(([, b]) => b.length > 1);

      // ---- ComputeLogs ----
      const card = (await call(base, "GET", "/v1/provider-card")).body as { public_key: string };
      const logs = new Map<string, { exit_code: number | null; exit_reason: string; backend: string | null; request_id: string; signature: string }>();
      for (const g of grants) {
        const r = await call(base, "GET", `/v1/grants/${g.request_id}/log`);
        assert.equal(r.status, 200, `ComputeLog of ${g.request_id} (${g.state}): ${r.status} ${r.text}`);
        assert.equal(r.body.request_id, g.request_id);
        assert.ok(verifySignedDoc(r.body, card.public_key), `ComputeLog of ${g.request_id} is signed by the bridge`);
        logs.set(g.request_id, r.body);
      }
      // compute-log.jsonl is at-least-once across crashes (store.ts): a kill between the commit and
      // marking the line written repeats it, identically.
      const jsonl = readFileSync(path.join(stateDir, "compute-log.jsonl"), "utf8").trim().split("\n");
      const logLines = new Map<string, Set<string>>();
      for (const line of jsonl) {
        const id = (JSON.parse(line) as { request_id: string }).request_id;
        logLines.set(id, (logLines.get(id) ?? new Set()).add(line));
      }
      const repeatedLines = jsonl.length - logLines.size;

      // ---- figures ----
      const byBackend = new Map<string, Map<string, number>>();
      for (const g of grants) {
        const b = g.backend ?? "(none)";
        const m = byBackend.get(b) ?? new Map<string, number>();
        m.set(g.state, (m.get(g.state) ?? 0) + 1);
        byBackend.set(b, m);
      }
      const failovers = grants.filter((g) => g.attempts.length > 0);
      const failed = grants.filter((g) => g.state === "failed");
      const injected = {
        aws: ec2.calls.filter((c) => c.code === "RequestLimitExceeded" || c.code === "InternalError").length,
        gcp: gce.calls.filter((c) => c.injected).length,
        azure: arm.calls.filter((c) => c.fault === "throttle" || c.fault === "serverError").length,
      };
      const capacity = {
        aws: ec2.calls.filter((c) => c.code === "InsufficientInstanceCapacity").length,
        gcp: gce.creates.filter((c) => c.outcome !== "ok").length,
        azure: allocationFailures,
      };
      const wallMs = Date.now() - started;
      const states = ["completed", "failed", "expired", "cancelled"];
      const rows: (string | number)[][] = [["backend", ...states, "total", "api calls", "throttled+5xx", "capacity", "creates", "duplicates", "leftovers"]];
      for (const b of ["aws", "gcp", "azure", ...(baremetal ? ["baremetal"] : []), "local"]) {
        const m = byBackend.get(b) ?? new Map<string, number>();
        const calls = b === "aws" ? ec2.calls.length : b === "gcp" ? gce.calls.length : b === "azure" ? arm.calls.length : "-";
        const inj = b === "aws" ? injected.aws : b === "gcp" ? injected.gcp : b === "azure" ? injected.azure : "-";
        const cap = b === "aws" ? capacity.aws : b === "gcp" ? capacity.gcp : b === "azure" ? capacity.azure : "-";
        const cr = creates[b] ?? new Map<string, number>();
        const crN = [...cr.values()].reduce((a, x) => a + x, 0);
        const dup = [...cr.values()].filter((n) => n > 1).length;
        const lo = (left as Record<string, string[]>)[b]?.length ?? 0;
        rows.push([b, ...states.map((s) => m.get(s) ?? 0), [...m.values()].reduce((a, x) => a + x, 0), calls, inj, cap, crN, dup, lo]);
      }
      const none = byBackend.get("(none)");
      if (none) rows.push(["(none)", ...states.map((s) => none.get(s) ?? 0), [...none.values()].reduce((a, x) => a + x, 0), "-", "-", "-", "-", "-", "-"]);
      const killsByPhase = countBy(kills.map((k) => k.phase));
      const summary = [
        `chaos seed ${SEED}: ${GRANTS} grants, ${kills.length} kills (${[...killsByPhase].map(([p, n]) => `${n} ${p}`).join(", ")}), wall time ${(wallMs / 1000).toFixed(1)} s`,
        table(rows),
        `kills: ${kills.map((k) => `#${k.n} ${k.phase}@${(k.atMs / 1000).toFixed(1)}s (${k.trigger}; restart ${k.restartMs} ms)`).join("; ")}`,
        `failovers: ${failovers.length} grants (${[...countBy(failovers.flatMap((g) => g.attempts.map((a) => `${a.backend}:${a.error_kind}`)))].map(([k, n]) => `${k} x${n}`).join(", ") || "none"}); failed: ${[...countBy(failed.map((g) => g.error?.kind ?? "?"))].map(([k, n]) => `${k} x${n}`).join(", ") || "none"}`,
        `POST answers: ${[...postStatus].map(([s, n]) => `${s} x${n}`).join(", ")} (422 retried: ${declined}; given up after valid_to: ${lapsed.size}); cancels sent: ${cancels}; slow-boot windows: ec2 ${slow.ec2}, gce ${slow.gce}, arm ${slow.arm}; bare-metal SSH drops: ${sshDrops.length} (${sshDrops.reduce((a, x) => a + x, 0)} sshd session processes killed)`,
        `compute-log.jsonl: ${jsonl.length} lines for ${logLines.size} grants (${repeatedLines} repeated after a kill, identical)`,
        `guest exits ${guests.exits} (${guests.lateExits} after the bridge had deleted the instance); creates: ${perGrant.size} grants created somewhere, duplicates=${duplicates.length}, leftovers=${Object.values(left).reduce((a, l) => a + l.length, 0)}`,
        `POST latency (incl. waiting out kills): p50 ${pct(postMs, 0.5)} ms, p90 ${pct(postMs, 0.9)} ms, max ${pct(postMs, 1)} ms`,
        `timings: first start ${firstStartMs} ms, restarts ${Math.min(...kills.map((k) => k.restartMs))}-${Math.max(...kills.map((k) => k.restartMs))} ms, submitting ${(submitMs / 1000).toFixed(1)} s, all terminal at ${(drainMs / 1000).toFixed(1)} s, total ${(wallMs / 1000).toFixed(1)} s`,
      ].join("\n");
      for (const line of summary.split("\n")) t.diagnostic(line);
      if (process.env.CB_SYSTEM_DUMP) t.diagnostic(dumpLives("chaos", lives).trim());
      process.stdout.write(`\n${summary}\n\n`);

      // ---- invariants ----
      assert.equal(accepted.size + lapsed.size, GRANTS, "every grant accepted, or given up by the market once its validity ran out");
      assert.equal(grants.length, accepted.size);
      for (const id of lapsed) assert.ok(!grants.some((g) => g.request_id === id), `${id} was answered "in the past" yet is stored`);
      assert.equal(kills.length, KILLS);
      for (const g of grants) {
        const p = byId.get(g.request_id)!;
        const log = logs.get(g.request_id)!;
        assert.deepEqual([...(logLines.get(g.request_id) ?? [])].map((l) => JSON.parse(l)), [log], `${g.request_id}: its ComputeLog in compute-log.jsonl (repeats identical)`);
        if (g.state === "completed") {
          assert.ok(!("hang" in p.guest), `${g.request_id} never ends on its own, yet completed`);
          assert.equal(log.exit_code, "code" in p.guest ? p.guest.code : null, `${g.request_id} (${g.backend}) exit code`);
          assert.equal(perGrant.get(g.request_id), 1, `${g.request_id} completed on ${g.backend}: created exactly once`);
        } else if (g.state === "expired") {
          assert.ok("hang" in p.guest, `${g.request_id} (${g.backend}) expired although its guest ends after ${"runMs" in p.guest ? p.guest.runMs : "?"} ms`);
        } else if (g.state === "cancelled") {
          assert.ok(p.cancelAfterMs !== null, `${g.request_id} cancelled without a cancel`);
        } else {
          // Failing is acceptable only for lack of capacity everywhere the grant could go.
          assert.ok(["capacity", "quota"].includes(g.error?.kind ?? ""), `${g.request_id} (${g.backend}) failed: ${JSON.stringify(g.error)} attempts ${JSON.stringify(g.attempts)}`);
        }
        if ("hang" in p.guest) assert.ok(["expired", "failed", "cancelled"].includes(g.state), `${g.request_id} hangs: ${g.state}`);
      }
      assert.deepEqual(duplicates, [], "no grant provisioned twice (creations per request id across every fake and host)");
      assert.deepEqual(tokenDuplicates, [], "no EC2 ClientToken created twice");
      assert.deepEqual(bootDuplicates.map(([rid, b]) => `${rid}: ${b.map((x) => x.key).join(", ")}`), [], "no grant booted twice");
      assert.deepEqual(left, { aws: [], gcp: [], azure: [], local: [], baremetal: [] }, "nothing left running on any fake or host");
      assert.deepEqual(ec2.internalErrors, [], "the EC2 fake itself never failed");
      for (const [i, d] of lives.entries()) assert.ok(!d.stderr().includes(GUARD_MARKER), `life ${i + 1}: only 127.0.0.1 contacted\n${d.stderr()}`);

      assert.equal(await daemon!.stop(), 0, "graceful stop exits 0");
    } catch (e) {
      if (e instanceof Error) e.message += dumpLives("chaos", lives);
      throw e;
    }
  });
});
