/**
 * Helpers for the bare-metal backend tests and bench: an image server on 127.0.0.1, machine
 * configs pointing at test/fakes/sshd.ts servers, a recording metrics sink, and (for virsh
 * machines) a bin dir = the harness's stand-ins plus a small `qemu-img` stand-in, which the
 * harness does not provide.
 */
import { createHash } from "node:crypto";
import { chmodSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync, existsSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import path from "node:path";
import { BareMetalBackend, type BareMetalBackendOptions } from "../../../src/backends/baremetal.js";
import type { BackendMetrics } from "../../../src/backends/backend.js";
import { OfferingCache } from "../../../src/backends/offering-cache.js";
import { BareMetalConfig, type BareMetalMachine } from "../../../src/config/schema.js";
import { Almanac, type ComputeGrant } from "../../../src/domain/index.js";
import { systemClock } from "../../../src/util/clock.js";
import { shJoin } from "../../../src/util/shell.js";
import { createLogger, type Logger } from "../../../src/util/logger.js";
import { STANDINS_BIN_DIR, type FakeSshd } from "../../fakes/sshd.js";
import { until as untilWithin } from "../../helpers/http.js";
import { tempDir } from "../../helpers/tmp.js";

/** Genesis at the epoch and 1 ms ticks: valid_to in ticks is a wall-clock ms timestamp. */
export const MS_ALMANAC = new Almanac(new Date(0), 0.001);

export interface ImageServer {
  url(name: string): string;
  /** Serve `body` at /<name>. */
  put(name: string, body: Buffer | string): { url: string; sha256: string };
  requests: string[];
  /** Hold every request for /<name> until the returned function is called (a slow download). */
  hold(name: string): () => void;
  /** Requests currently held. */
  held(): number;
  close(): Promise<void>;
}

export async function imageServer(): Promise<ImageServer> {
  const files = new Map<string, Buffer>();
  const requests: string[] = [];
  const holds = new Map<string, Array<() => void>>();
  let heldNow = 0;
  const srv = http.createServer((req, res) => {
    requests.push(req.url ?? "");
    const name = decodeURIComponent((req.url ?? "/").slice(1).split("?")[0]!);
    const body = files.get(name) ?? files.get(name.split("/")[0]!);
    if (!body) {
      res.statusCode = 404;
      res.end("not found");
      return;
    }
    const send = () => {
      res.setHeader("content-length", body.length);
      res.end(body);
    };
    const waiting = holds.get(name);
    if (waiting) {
      heldNow++;
      waiting.push(() => {
        heldNow--;
        send();
      });
    } else send();
  });
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", () => r()));
  const port = (srv.address() as AddressInfo).port;
  const url = (name: string) => `http://127.0.0.1:${port}/${name}`;
  return {
    url,
    put(name, body) {
      const buf = Buffer.isBuffer(body) ? body : Buffer.from(body);
      files.set(name, buf);
      return { url: url(name), sha256: createHash("sha256").update(buf).digest("hex") };
    },
    requests,
    hold(name) {
      holds.set(name, []);
      return () => {
        const w = holds.get(name) ?? [];
        holds.delete(name);
        for (const f of w) f();
      };
    },
    held: () => heldNow,
    close: () =>
      new Promise<void>((r) => {
        srv.closeAllConnections();
        srv.close(() => r());
      }),
  };
}

export interface Recorder {
  metrics: BackendMetrics;
  events: string[];
  calls: Map<string, number>;
}

export function recorder(): Recorder {
  const events: string[] = [];
  const calls = new Map<string, number>();
  return {
    events,
    calls,
    metrics: {
      apiCall: (_b, op, code) => calls.set(`${op}:${code}`, (calls.get(`${op}:${code}`) ?? 0) + 1),
      retry: (_b, op) => events.push(`retry:${op}`),
      throttled: () => undefined,
      sshSession: (_b, machine, up) => events.push(`${machine}:${up ? "up" : "down"}`),
      orphanSwept: (_b, kind) => events.push(`orphan:${kind}`),
    },
  };
}

export function machine(name: string, sshd: FakeSshd, workRoot: string, over: Partial<BareMetalMachine> & Record<string, unknown> = {}): Record<string, unknown> {
  return {
    name,
    host: sshd.host,
    port: sshd.port,
    user: sshd.user,
    private_key_file: sshd.privateKeyPath,
    host_key_sha256: sshd.hostKeySha256,
    region: "r1",
    cpu_millicores: 4000,
    ram_mib: 4096,
    mode: "systemd",
    work_dir: path.join(workRoot, name),
    ...over,
  };
}

/** A logger whose JSON lines land in `lines`. */
export function lineLogger(lines: string[]): Logger {
  return createLogger("info", { write: (line: string) => void lines.push(line) });
}

export function backend(machines: Record<string, unknown>[], o: { rec?: Recorder; opts?: BareMetalBackendOptions; cfg?: Record<string, unknown>; dir?: string; log?: Logger } = {}): BareMetalBackend {
  // A generous handshake bound: on a loaded machine sshd can take seconds to answer (a refused or
  // unreachable port still fails at once).
  const cfg = BareMetalConfig.parse({ machines, poll_interval_ms: 40, connect_timeout_ms: 30_000, ...(o.cfg ?? {}) });
  // Its own state dir (orphans.jsonl lands there), removed when the test process exits.
  const dir = o.dir ?? tempDir(undefined, "cb-bm-state-");
  return new BareMetalBackend(
    cfg,
    {
      providerId: "test-provider",
      stateDir: dir,
      configDir: dir,
      log: o.log ?? createLogger(process.env.CB_TEST_LOG ?? "silent"),
      clock: systemClock,
      almanac: MS_ALMANAC,
      unavailable: new OfferingCache(1000, systemClock),
      ...(o.rec ? { metrics: o.rec.metrics } : {}),
    },
    { reconnectBaseMs: 40, reconnectCapMs: 400, ...(o.opts ?? {}) },
  );
}

export function grant(id: string, validInMs = 60_000, over: Partial<ComputeGrant> = {}): ComputeGrant {
  return { request_id: id, region: "r1", tdx_required: false, cpu_millicores: 500, ram_mib: 256, valid_to: Date.now() + validInMs, ...over };
}

/** Transient units the systemd stand-in currently holds on a machine ("loaded"). */
export function unitsOn(sshd: FakeSshd): string[] {
  const d = path.join(sshd.stateDir, "systemd", "units");
  if (!existsSync(d)) return [];
  return readdirSync(d).filter((n) => n.endsWith(".service") && !n.startsWith(".")).sort();
}

/** A unit's properties as the systemctl stand-in keeps them (conf.sh). */
export function unitConf(sshd: FakeSshd, unit: string): string {
  return readFileSync(path.join(sshd.stateDir, "systemd", "units", unit, "conf.sh"), "utf8");
}

export function domainsOn(sshd: FakeSshd): string[] {
  const d = path.join(sshd.stateDir, "libvirt", "domains");
  if (!existsSync(d)) return [];
  return readdirSync(d).filter((n) => !n.startsWith(".")).sort();
}

export { alive } from "../../helpers/proc.js";

// ---- virsh machines: stand-ins + qemu-img ----------------------------------------------------

/**
 * A minimal qcow2 (v3 header only): enough for the qemu-img stand-in, which reads the magic, the
 * virtual size and the backing file name exactly where QEMU does.
 */
export function qcow2(virtualSize: number, backing?: string): Buffer {
  const buf = Buffer.alloc(4096);
  buf.write("QFI\xfb", 0, "latin1");
  buf.writeUInt32BE(3, 4);
  if (backing) {
    buf.writeBigUInt64BE(512n, 8);
    buf.writeUInt32BE(Buffer.byteLength(backing), 16);
    buf.write(backing, 512);
  }
  buf.writeUInt32BE(16, 20);
  buf.writeBigUInt64BE(BigInt(virtualSize), 24);
  buf.writeUInt32BE(104, 100);
  return buf;
}

const QEMU_IMG = String.raw`#!/usr/bin/env node
// Test stand-in for qemu-img (QEMU 7.2): "info -f qcow2 --output=json FILE",
// "create -q -f qcow2 -F qcow2 -b BACKING FILE", "--version".
const fs = require('node:fs');
const path = require('node:path');
const a = process.argv.slice(2);
const die = (m) => { process.stderr.write('qemu-img: ' + m + '\n'); process.exit(1); };
if (a[0] === '--version') { console.log('qemu-img version 7.2.0 (Debian 1:7.2+dfsg-7+deb12u7)'); process.exit(0); }
const opt = (k) => { const i = a.indexOf(k); return i >= 0 ? a[i + 1] : undefined; };
function header(file) {
  let b;
  try { b = fs.readFileSync(file); } catch { die("Could not open '" + file + "': No such file or directory"); }
  if (b.length < 72 || b.toString('latin1', 0, 4) !== 'QFI\xfb') die("Could not open '" + file + "': Image is not in qcow2 format");
  const off = Number(b.readBigUInt64BE(8)), len = b.readUInt32BE(16);
  return { size: Number(b.readBigUInt64BE(24)), backing: off ? b.toString('utf8', off, off + len) : null, actual: b.length };
}
if (a[0] === 'info') {
  if (opt('-f') !== 'qcow2' || opt('--output') === undefined && !a.includes('--output=json')) die('test stand-in: only info -f qcow2 --output=json');
  const file = a[a.length - 1];
  const h = header(file);
  const o = { 'virtual-size': h.size, filename: file, 'cluster-size': 65536, format: 'qcow2', 'actual-size': h.actual };
  if (h.backing) { o['backing-filename'] = h.backing; o['full-backing-filename'] = path.resolve(path.dirname(file), h.backing); }
  o['format-specific'] = { type: 'qcow2', data: { compat: '1.1', 'compression-type': 'zlib', 'lazy-refcounts': false, 'refcount-bits': 16, corrupt: false, 'extended-l2': false } };
  o['dirty-flag'] = false;
  console.log(JSON.stringify(o, null, 4));
  process.exit(0);
}
if (a[0] === 'create') {
  const base = opt('-b'), file = a[a.length - 1];
  if (opt('-f') !== 'qcow2' || opt('-F') !== 'qcow2' || !base) die('test stand-in: only create -f qcow2 -F qcow2 -b BASE FILE');
  const h = header(base);
  const out = Buffer.alloc(4096);
  out.write('QFI\xfb', 0, 'latin1'); out.writeUInt32BE(3, 4);
  out.writeBigUInt64BE(512n, 8); out.writeUInt32BE(Buffer.byteLength(base), 16); out.write(base, 512);
  out.writeUInt32BE(16, 20); out.writeBigUInt64BE(BigInt(h.size), 24); out.writeUInt32BE(104, 100);
  fs.writeFileSync(file, out);
  process.exit(0);
}
die('test stand-in: unsupported command ' + a[0]);
`;

/**
 * A bin dir for virsh machines: symlinks to the harness's stand-ins (they find their library
 * through ../standins, linked too) plus the qemu-img stand-in above.
 */
export function virshBinDir(root: string): string {
  const bin = path.join(root, "bin");
  mkdirSync(bin, { recursive: true });
  for (const t of readdirSync(STANDINS_BIN_DIR)) symlinkSync(path.join(STANDINS_BIN_DIR, t), path.join(bin, t));
  symlinkSync(path.join(STANDINS_BIN_DIR, "..", "standins"), path.join(root, "standins"));
  writeFileSync(path.join(bin, "qemu-img"), QEMU_IMG);
  chmodSync(path.join(bin, "qemu-img"), 0o755);
  return bin;
}

/**
 * The guest workload for the virsh stand-in ($CB_FAKE_STATE/libvirt/guest-command): like a TDX
 * guest's boot unit it reads its credentials (from the domain XML the stand-in keeps) and, when it
 * is a TD, runs the bridge's compute-bridge.attest credential script for real against a stand-in
 * configfs-tsm whose outblob is a real TD quote ($CB_FAKE_STATE/libvirt/td-quote.bin), writing to
 * its serial console log; then runs until $CB_FAKE_STATE/poweroff-<domain> exists and powers off.
 */
export function installGuestCommand(sshd: FakeSshd): void {
  const script = String.raw`ddir=$(tr '\0' '\n' < /proc/$PPID/cmdline | sed -n 3p)
xml=$ddir/domain.xml
dom=$(sed -n 's:.*<name>\(.*\)</name>.*:\1:p' "$xml" | head -n 1)
rid=@{dom#cb-}
console=$(sed -n "s:.*<source path='\([^']*console.log\)'.*:\1:p" "$xml" | head -n 1)
nonce=$(sed -n 's/.*compute-bridge.attestation_nonce=\([0-9a-f]*\).*/\1/p' "$xml")
att=$(sed -n 's/.*compute-bridge.attest=\([A-Za-z0-9+\/=]*\).*/\1/p' "$xml")
if [ -n "$nonce" ] && [ -n "$att" ] && [ -n "$console" ]; then
  g=$ddir/td
  mkdir -p "$g/creds" "$g/tsm/cb-$rid"
  printf '%s' "$rid" > "$g/creds/compute-bridge.request_id"
  printf '%s' "$nonce" > "$g/creds/compute-bridge.attestation_nonce"
  printf '%s' "$att" | base64 -d > "$g/attest.sh"
  echo tdx_guest > "$g/tsm/cb-$rid/provider"
  echo 1 > "$g/tsm/cb-$rid/generation"
  cp "$CB_FAKE_STATE/libvirt/td-quote.bin" "$g/tsm/cb-$rid/outblob"
  printf '[    1.234] tdx-guest: attestation unit starting
' >> "$console"
  CREDENTIALS_DIRECTORY=$g/creds CB_CONSOLE=$console CB_STATE=$g/state CB_TSM=$g/tsm CB_SSH_HOST_KEY=$g/no-key sh "$g/attest.sh"
fi
while [ ! -e "$CB_FAKE_STATE/poweroff-$dom" ]; do sleep 0.05; done
exit 0
`.replace(/@\{/g, "${");
  mkdirSync(path.join(sshd.stateDir, "libvirt"), { recursive: true });
  writeFileSync(path.join(sshd.stateDir, "libvirt", "guest-command"), script);
  writeFileSync(path.join(sshd.stateDir, "libvirt", "td-quote.bin"), TD_QUOTE);
}

/** The real TD quote (go-tdx-guest's GCE vector) the stand-in configfs-tsm hands out. */
export const TD_QUOTE = readFileSync(new URL("../../attestation/vectors/go-tdx-guest_cos-113-tdx-quote.dat", import.meta.url)).subarray(0, 4935);

/** Run one command on a fake machine through its real sshd (test-side observation). */
/** Wait for a condition; the default ceiling is generous for a loaded machine (it only bounds a failure). */
export const until = <T>(fn: Parameters<typeof untilWithin<T>>[0], what: string, timeoutMs = 120_000) => untilWithin<T>(fn, what, timeoutMs);

export function readPid(file: string): number {
  return Number(readFileSync(file, "utf8").trim());
}

/**
 * Destroys the guests and stops the units a test left on these hosts: run after each test, so one
 * that failed half-way does not fail the next (a passing test has asserted it left nothing).
 */
export async function removeLeftovers(hosts: readonly FakeSshd[]): Promise<void> {
  for (const s of hosts) {
    const doms = domainsOn(s).filter((d) => /^[A-Za-z0-9._-]+$/.test(d));
    const units = unitsOn(s).filter((u) => /^[A-Za-z0-9._-]+\.service$/.test(u));
    if (doms.length + units.length === 0) continue;
    const script = 'n=$1; shift; i=0; for x; do i=$((i+1)); if [ $i -le "$n" ]; then virsh destroy "$x"; virsh undefine --nvram "$x"; else systemctl stop "$x"; systemctl reset-failed "$x"; fi; done >/dev/null 2>&1; exit 0';
    await sshRun(s, shJoin(["/bin/sh", "-c", script, "cb-cleanup", String(doms.length), ...doms, ...units]));
  }
}

export async function sshRun(sshd: FakeSshd, command: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const { Client } = (await import("ssh2")).default;
  const c = new Client();
  await new Promise<void>((resolve, reject) => {
    c.once("ready", () => resolve());
    c.once("error", reject);
    c.connect({ host: sshd.host, port: sshd.port, username: sshd.user, privateKey: sshd.privateKey, hostVerifier: () => true, readyTimeout: 60_000 });
  });
  try {
    return await new Promise((resolve, reject) => {
      c.exec(command, (err, ch) => {
        if (err) return reject(err);
        let stdout = "";
        let stderr = "";
        let code: number | null = null;
        ch.on("data", (d: Buffer) => (stdout += d.toString()));
        ch.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
        ch.on("exit", (x: number | null) => (code = x));
        ch.on("close", () => resolve({ code, stdout, stderr }));
        ch.end();
      });
    });
  } finally {
    c.end();
  }
}

/** A unit's state as `systemctl show` reports it on the machine (test-side observation). */
export async function unitState(sshd: FakeSshd, unit: string): Promise<Record<string, string>> {
  const r = await sshRun(sshd, `systemctl show ${unit} -p LoadState,ActiveState,SubState,Result`);
  const out: Record<string, string> = {};
  for (const line of r.stdout.split("\n")) {
    const i = line.indexOf("=");
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1);
  }
  return out;
}

/**
 * Put an image into a machine's cache the way a finished download leaves it (`<work_dir>/images/
 * <sha256>`): a warm machine. For tests whose valid_to is a second or two away, which would
 * otherwise (rightly) also bound the image download.
 */
export async function precache(machineWorkDir: string, image: { url: string; sha256: string }): Promise<void> {
  const body = Buffer.from(await (await fetch(image.url)).arrayBuffer());
  mkdirSync(path.join(machineWorkDir, "images"), { recursive: true });
  writeFileSync(path.join(machineWorkDir, "images", image.sha256), body, { mode: 0o644 });
}
