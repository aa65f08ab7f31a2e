/**
 * Shared pieces of the system tests that run the real daemon in a child process against every
 * backend's fake (test/system/chaos.test.ts, test/system/secrets.test.ts):
 *
 * - spawnInjected(): the daemon via ./run-daemon-injected.ts (the CLI's `run`, plus injected
 *   backend options and a loopback-only network guard), kill -9-able, with its output captured;
 * - small loopback servers: an SSH banner server (the cloud backends' readiness probe), an image
 *   server, a free-port finder;
 * - GuestSim: plays the guests of the EC2, GCE and ARM fakes — it powers each running instance
 *   off with the exit marker the boot script would print (or really runs the instance's boot
 *   script), so the bridge sees exactly what a real VM would show it;
 * - a seeded PRNG, polling helpers and TOML value formatting.
 *
 * Everything listens on, and connects to, 127.0.0.1 only.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import http from "node:http";
import net, { type AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { TAG_REQUEST } from "../../src/backends/azure/naming.js";
import { exitMarker, failMarker } from "../../src/backends/common/cloud-init.js";
import { lastSegment, META_REQUEST_ID } from "../../src/backends/gcp/naming.js";
import type { ArmFake } from "../fakes/arm.js";
import type { Ec2Fake } from "../fakes/ec2.js";
import type { GceFake, JsonObject } from "../fakes/gce.js";
import type { InjectSpec } from "./run-daemon-injected.js";

export type { InjectSpec };

/** The line run-daemon-injected.ts prints when its network guard refused a connection. */
export const GUARD_MARKER = "CB-TEST-GUARD refused";
export const EC2_REQUEST_TAG = "compute-bridge:request-id";
export const TERMINAL = ["completed", "failed", "expired", "cancelled"];

type T = { after: (fn: () => unknown) => void };

// ---- randomness and waiting ---------------------------------------------------------------------

/** Deterministic PRNG (mulberry32): a failing run can be replayed from its seed. */
export function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) | 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Poll `fn` until it returns something truthy; throws naming `what` after `timeoutMs`. */
export async function poll<V>(fn: () => V | null | undefined | false | Promise<V | null | undefined | false>, what: string, timeoutMs: number, intervalMs = 20): Promise<V> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

// ---- loopback servers -----------------------------------------------------------------------------

export async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const port = (s.address() as AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** A TCP server that greets like sshd: all the cloud backends' readiness probe needs. */
export async function bannerServer(t: T): Promise<number> {
  const server = net.createServer((s) => {
    s.on("error", () => undefined);
    s.end("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n");
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  return (server.address() as AddressInfo).port;
}

export interface ImageServer {
  base: string;
  /** Serve `body` at /name; returns the URL and its sha256. */
  add(name: string, body: Buffer | string): { url: string; sha256: string };
  requests: number;
}

export async function imageServer(t: T): Promise<ImageServer> {
  const files = new Map<string, Buffer>();
  const out: ImageServer = {
    base: "",
    requests: 0,
    add(name, body) {
      const buf = Buffer.isBuffer(body) ? body : Buffer.from(body);
      files.set(`/${name}`, buf);
      return { url: `${out.base}/${name}`, sha256: createHash("sha256").update(buf).digest("hex") };
    },
  };
  const server = http.createServer((req, res) => {
    out.requests++;
    const body = files.get(new URL(req.url ?? "/", "http://x").pathname);
    if (!body) res.writeHead(404).end();
    else res.writeHead(200, { "content-length": body.length, "content-type": "application/octet-stream" }).end(body);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  out.base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  t.after(() => {
    server.closeAllConnections();
    return new Promise<void>((r) => server.close(() => r()));
  });
  return out;
}

// ---- the daemon as a child process -------------------------------------------------------------

const RUNNER = fileURLToPath(new URL("./run-daemon-injected.ts", import.meta.url));

export interface InjectedDaemon {
  proc: ChildProcess;
  url: string;
  /** stdout (JSON log lines) and stderr, as captured so far. */
  stdout(): string;
  stderr(): string;
  kill9(): Promise<void>;
  /** SIGTERM; resolves with the exit code. */
  stop(): Promise<number | null>;
  exited: Promise<number | null>;
}

/** Start the daemon (run-daemon-injected.ts) and wait for its "listening on" line. */
export async function spawnInjected(configFile: string, spec: InjectSpec, env: Record<string, string> = {}): Promise<InjectedDaemon> {
  const proc = spawn(process.execPath, ["--import", "tsx", RUNNER, configFile], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, AWS_EC2_METADATA_DISABLED: "true", CB_TEST_INJECT: JSON.stringify(spec), ...env },
  });
  let out = "";
  let err = "";
  proc.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  proc.stderr!.on("data", (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  const url = await new Promise<string>((resolve, reject) => {
    const onData = () => {
      const m = /compute-bridge listening on (https?:\/\/\S+)/.exec(err);
      if (m) {
        proc.stderr!.off("data", onData);
        resolve(m[1]!);
      }
    };
    proc.stderr!.on("data", onData);
    void exited.then((code) => reject(new Error(`daemon exited (${code}) before listening:\n${err}\n${out.slice(-4000)}`)));
    setTimeout(() => reject(new Error(`daemon did not start listening within 60 s:\n${err}`)), 60_000).unref();
  });
  return {
    proc,
    url,
    stdout: () => out,
    stderr: () => err,
    exited,
    kill9: async () => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      await exited;
    },
    stop: async () => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
      return exited;
    },
  };
}

/**
 * Write every life's stdout and stderr to a file in the temp directory (kept after the test) and
 * return a line naming it: for the message of a failing system test.
 */
export function dumpLives(name: string, lives: readonly InjectedDaemon[]): string {
  const file = path.join(os.tmpdir(), `cb-${name}-${process.pid}-${Date.now()}.log`);
  writeFileSync(file, lives.map((d, i) => `===== life ${i + 1}: stderr\n${d.stderr()}\n===== life ${i + 1}: stdout\n${d.stdout()}\n`).join("\n"));
  return `\n(daemon output of ${lives.length} li${lives.length === 1 ? "fe" : "ves"}: ${file})`;
}

// ---- TOML ---------------------------------------------------------------------------------------

/** A TOML value for strings, numbers, booleans, arrays and inline tables (JSON strings are TOML basic strings). */
export function tv(v: unknown): string {
  if (typeof v === "string") return JSON.stringify(v);
  if (typeof v === "number" || typeof v === "boolean") return String(v);
  if (Array.isArray(v)) return `[${v.map(tv).join(", ")}]`;
  if (v && typeof v === "object") return `{ ${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)} = ${tv(x)}`).join(", ")} }`;
  throw new Error(`no TOML for ${String(v)}`);
}

/** `[name]` followed by `key = value` lines. */
export function tomlSection(name: string, kv: Record<string, unknown>): string {
  return `[${name}]\n${Object.entries(kv)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k} = ${tv(v)}`)
    .join("\n")}\n`;
}

// ---- the guests ----------------------------------------------------------------------------------

/** What a guest does: run for `runMs` then exit with `code`; `hang` never ends on its own. */
export type GuestPlan = { runMs: number; code: number } | { hang: true };

export interface GuestSimOptions {
  ec2?: Ec2Fake;
  gce?: { fake: GceFake; project: string };
  arm?: { fake: ArmFake; resourceGroup: string };
  /**
   * "marker": after the plan's run time, power the instance off with the exit marker the boot
   * script prints. "script": really execute the instance's boot script (user data / startup-script
   * / custom data) with the serial console and poweroff replaced by files, then power off with
   * what it printed.
   */
  mode: { marker: (requestId: string) => GuestPlan } | { script: { dir: string } };
  intervalMs?: number;
}

interface Booted {
  backend: "aws" | "gcp" | "azure";
  requestId: string;
  key: string;
}

/**
 * Plays every cloud guest. Each poll lists the fakes' instances; one that is running and not seen
 * before "boots": it is recorded (distinct instances per request id: a second one would be a
 * grant provisioned twice) and then ends as its mode says.
 */
export class GuestSim {
  private readonly seen = new Set<string>();
  private readonly timers = new Set<NodeJS.Timeout>();
  private readonly timer: NodeJS.Timeout;
  private stopped = false;
  /** request id -> instances seen running for it, per backend. */
  readonly boots = new Map<string, Booted[]>();
  /** Power-offs that failed because the instance was already being deleted (the bridge was faster). */
  lateExits = 0;
  exits = 0;
  /** Boot scripts run in script mode, by request id: their console text. */
  readonly consoles = new Map<string, string>();

  constructor(private readonly o: GuestSimOptions) {
    this.timer = setInterval(() => this.step(), o.intervalMs ?? 40);
  }

  stop(): void {
    this.stopped = true;
    clearInterval(this.timer);
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }

  bootsOf(requestId: string): Booted[] {
    return this.boots.get(requestId) ?? [];
  }

  private record(b: Booted): boolean {
    if (this.seen.has(b.key)) return false;
    this.seen.add(b.key);
    this.boots.set(b.requestId, [...this.bootsOf(b.requestId), b]);
    return true;
  }

  private step(): void {
    if (this.stopped) return;
    const { ec2, gce, arm } = this.o;
    if (ec2) {
      for (const i of ec2.instances) {
        if (i.state !== "running") continue;
        const rid = i.tags[EC2_REQUEST_TAG] ?? "";
        if (!this.record({ backend: "aws", requestId: rid, key: `aws/${i.instanceId}` })) continue;
        this.run(rid, () => i.userData ?? "", (text) => ec2.guestPowerOff(i.instanceId, text));
      }
    }
    if (gce) {
      for (const inst of gce.fake.listInstances({ project: gce.project })) {
        if (inst["status"] !== "RUNNING") continue;
        const name = String(inst["name"]);
        const zone = lastSegment(String(inst["zone"]));
        const items = ((inst["metadata"] as JsonObject | undefined)?.["items"] ?? []) as { key: string; value: string }[];
        const rid = items.find((m) => m.key === META_REQUEST_ID)?.value ?? "";
        if (!this.record({ backend: "gcp", requestId: rid, key: `gcp/${zone}/${name}/${String(inst["id"])}` })) continue;
        const script = items.find((m) => m.key === "startup-script")?.value ?? "";
        this.run(rid, () => script, (text) => gce.fake.guestPowerOff(gce.project, zone, name, text));
      }
    }
    if (arm) {
      for (const vm of arm.fake.list("virtualMachines", arm.resourceGroup)) {
        const name = String(vm["name"]);
        if (arm.fake.powerState(arm.resourceGroup, name) !== "running") continue;
        const rid = String((vm["tags"] as Record<string, string> | undefined)?.[TAG_REQUEST] ?? "");
        const vmId = String(vm["properties"]?.["vmId"] ?? "");
        if (!this.record({ backend: "azure", requestId: rid, key: `azure/${name}/${vmId}` })) continue;
        const customData = () => {
          const bodies = arm.fake.receivedBodies("virtualMachines", name);
          const b64 = String(bodies.at(-1)?.["properties"]?.["osProfile"]?.["customData"] ?? "");
          return Buffer.from(b64, "base64").toString("utf8");
        };
        this.run(rid, customData, (text) => arm.fake.guestPowerOff(arm.resourceGroup, name, text));
      }
    }
  }

  private run(rid: string, script: () => string, powerOff: (consoleText: string) => void): void {
    const off = (text: string) => {
      if (this.stopped) return;
      try {
        powerOff(text);
        this.exits++;
      } catch {
        this.lateExits++; // deleted meanwhile (cancelled or expired): nothing left to power off
      }
    };
    const mode = this.o.mode;
    if ("marker" in mode) {
      const plan = mode.marker(rid);
      if ("hang" in plan) return;
      const t = setTimeout(() => {
        this.timers.delete(t);
        off(`[    2.718281] cloud-init[812]: compute-bridge: starting the workload\n${exitMarker(rid, plan.code)}\n[    3.141592] reboot: Power down\n`);
      }, plan.runMs);
      this.timers.add(t);
      return;
    }
    void this.runScript(mode.script.dir, rid, script()).then((text) => {
      this.consoles.set(rid, text);
      off(text);
    });
  }

  /** Execute a boot script as the guest would (dash), with the VM-only paths moved into `dir`. */
  private async runScript(dir: string, rid: string, script: string): Promise<string> {
    const d = path.join(dir, `${rid}-${this.seen.size}`);
    const root = path.join(d, "root");
    const home = path.join(d, "home");
    mkdirSync(root, { recursive: true });
    mkdirSync(home, { recursive: true });
    const consoleFile = path.join(d, "console");
    const poweroff = path.join(d, "poweroff");
    writeFileSync(poweroff, "#!/bin/sh\nexit 0\n");
    chmodSync(poweroff, 0o755);
    if (!script.startsWith("#!")) return `${failMarker(rid, "setup", "no boot script on the instance")}\n`;
    writeFileSync(path.join(d, "boot.sh"), script, { mode: 0o700 });
    await new Promise<void>((resolve) => {
      const child = spawn("/bin/sh", [path.join(d, "boot.sh")], {
        cwd: d,
        stdio: "ignore",
        env: { CB_CONSOLE: consoleFile, CB_POWEROFF: poweroff, CB_ROOT: root, CB_HOME: home, PATH: process.env.PATH ?? "/usr/bin:/bin" },
      });
      child.on("close", () => resolve());
      child.on("error", () => resolve());
    });
    return existsSync(consoleFile) ? readFileSync(consoleFile, "utf8") : "";
  }
}
