/**
 * Bare-metal grant-to-running latency: provision() until the unit runs (systemd-run returned),
 * over the backend's pre-established SSH session versus opening a new SSH connection per grant
 * (a fresh backend each time: TCP + key exchange + public-key auth before the first command).
 * Same run, same machine (a real OpenSSH sshd on 127.0.0.1 with the systemd stand-ins), same
 * cached image; the two modes alternate grant by grant so drift hits both equally.
 *
 * Also counted: SSH round trips (remote commands) per warm provision over the kept session, for a
 * systemd machine and for a virsh machine (image cached and already inspected there).
 *
 *   node --import tsx bench/baremetal.ts [grants]
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";
import type { BareMetalBackend } from "../src/backends/baremetal.js";
import { startSshd } from "../test/fakes/sshd.js";
import { scriptImage } from "../test/helpers/images.js";
import { backend, grant, imageServer, machine, qcow2, recorder, virshBinDir } from "../test/backends/baremetal/harness.js";

export interface LatencyStats {
  grants: number;
  meanMs: number;
  p50Ms: number;
  p95Ms: number;
  minMs: number;
  maxMs: number;
}

export interface BareMetalBenchResult {
  pooled: LatencyStats;
  connectionPerGrant: LatencyStats;
  /** The first grant on a machine, which downloads and verifies the image (pooled session). */
  coldImageMs: number;
  /** Remote commands per warm provision over the kept session (image cached), per mode. */
  roundTrips: { systemd: number; virsh: number };
}

function stats(samples: number[]): LatencyStats {
  const s = [...samples].sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.max(0, Math.ceil(p * s.length) - 1))]!;
  const r = (x: number) => Math.round(x * 10) / 10;
  return { grants: s.length, meanMs: r(s.reduce((a, b) => a + b, 0) / s.length), p50Ms: r(q(0.5)), p95Ms: r(q(0.95)), minMs: r(s[0]!), maxMs: r(s[s.length - 1]!) };
}

export async function run(o: { grants?: number } = {}): Promise<BareMetalBenchResult> {
  const n = o.grants ?? 30;
  const dir = mkdtempSync(path.join(os.tmpdir(), "cb-bm-bench-"));
  const srv = await imageServer();
  const sshd = await startSshd();
  const never = new AbortController().signal;
  const open: BareMetalBackend[] = [];
  try {
    const img = scriptImage(dir, "workload", "exec sleep 600");
    const image = { ...srv.put("workload", readFileSync(img.file)), format: "bundle" as const };
    const machines = [machine("bench", sshd, path.join(dir, "work"), { cpu_millicores: 1_000_000, ram_mib: 1_000_000 })];
    const cfg = { poll_interval_ms: 1000 };

    // The pooled backend: its session is opened at start (reconcile), as in the daemon.
    const rec = recorder();
    const commands = () => [...rec.calls.values()].reduce((x, y) => x + y, 0);
    const pooled = backend(machines, { cfg, rec });
    open.push(pooled);
    await pooled.reconcile(new Set());
    let t = performance.now();
    const cold = await pooled.provision(grant("bench-cold"), { image }, never);
    const coldImageMs = performance.now() - t;
    await pooled.terminate(cold);

    const a: number[] = [];
    const b: number[] = [];
    const trips: number[] = [];
    for (let i = 0; i < n; i++) {
      const g1 = grant(`bench-pooled-${i}`);
      const c0 = commands();
      t = performance.now();
      const i1 = await pooled.provision(g1, { image }, never);
      a.push(performance.now() - t);
      trips.push(commands() - c0);
      await pooled.terminate(i1);

      const fresh = backend(machines, { cfg });
      const g2 = grant(`bench-fresh-${i}`);
      t = performance.now();
      const i2 = await fresh.provision(g2, { image }, never);
      b.push(performance.now() - t);
      await fresh.terminate(i2);
      await fresh.close();
    }
    return { pooled: stats(a), connectionPerGrant: stats(b), coldImageMs: Math.round(coldImageMs * 10) / 10, roundTrips: { systemd: Math.max(...trips), virsh: await virshRoundTrips(dir, srv, open) } };
  } finally {
    await Promise.allSettled(open.map((x) => x.close()));
    await sshd.stop();
    await srv.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Remote commands per warm provision on a virsh machine (stand-ins; the guest idles), the most seen over a few grants. */
async function virshRoundTrips(dir: string, srv: Awaited<ReturnType<typeof imageServer>>, open: BareMetalBackend[]): Promise<number> {
  const sshd = await startSshd({ binDir: virshBinDir(path.join(dir, "virsh-tools")) });
  const never = new AbortController().signal;
  try {
    const disk = { ...srv.put("disk.qcow2", qcow2(1024 ** 3)), format: "disk" as const };
    const rec = recorder();
    const commands = () => [...rec.calls.values()].reduce((x, y) => x + y, 0);
    const b = backend([machine("virsh", sshd, path.join(dir, "work-virsh"), { mode: "virsh", cpu_millicores: 1_000_000, ram_mib: 1_000_000 })], { cfg: { poll_interval_ms: 1000 }, rec });
    open.push(b);
    await b.reconcile(new Set());
    await b.terminate(await b.provision(grant("bench-virsh-cold"), { image: disk }, never));
    let most = 0;
    for (let i = 0; i < 5; i++) {
      const c0 = commands();
      const inst = await b.provision(grant(`bench-virsh-${i}`), { image: disk }, never);
      most = Math.max(most, commands() - c0);
      await b.terminate(inst);
    }
    return most;
  } finally {
    await sshd.stop();
  }
}

export function table(r: BareMetalBenchResult): string {
  const rows = [
    ["mode", "grants", "mean ms", "p50 ms", "p95 ms", "min ms", "max ms"],
    ...([
      ["pre-established session", r.pooled],
      ["new SSH connection per grant", r.connectionPerGrant],
    ] as const).map(([name, s]) => [name, String(s.grants), String(s.meanMs), String(s.p50Ms), String(s.p95Ms), String(s.minMs), String(s.maxMs)]),
  ];
  const w = rows[0]!.map((_, c) => Math.max(...rows.map((row) => row[c]!.length)));
  const line = (row: string[]) => `| ${row.map((v, c) => (c === 0 ? v.padEnd(w[c]!) : v.padStart(w[c]!))).join(" | ")} |`;
  return [line(rows[0]!), `|${w.map((x) => "-".repeat(x + 2)).join("|")}|`, ...rows.slice(1).map(line)].join("\n");
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const n = Number(process.argv[2] ?? 30);
  const r = await run({ grants: n });
  console.log(`bare-metal grant-to-running latency (provision() until systemd-run returned; image cached; sshd on 127.0.0.1)`);
  console.log(table(r));
  console.log(`first grant on the machine (downloads + verifies the image): ${r.coldImageMs} ms`);
  console.log(`SSH round trips per warm provision over the kept session (image cached): systemd ${r.roundTrips.systemd}, virsh ${r.roundTrips.virsh} (goal 1)`);
  console.log(`speed-up of the pre-established session: ${(r.connectionPerGrant.p50Ms / r.pooled.p50Ms).toFixed(1)}x at p50 (goal >= 5x), saving ${Math.round((r.connectionPerGrant.meanMs - r.pooled.meanMs) * 10) / 10} ms per grant on average`);
}
