import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
/**
 * The production entry point (bin/compute-bridge.js, which runs dist/bundle/): what a supervisor
 * starts, and it starts in a fraction of the time a child running the sources through tsx's loader
 * takes. `npm test` builds the bundle first (only if src/ changed); a test file run on its own
 * builds it here.
 */
const RUNNER = path.join(ROOT, "bin", "compute-bridge.js");
let bundleChecked = false;
function ensureBundle(): void {
  if (bundleChecked) return;
  // One build at a time across test files running in parallel: a rebuild replaces dist/bundle/,
  // and a child starting meanwhile would miss its chunks. A lock older than 5 min is a dead one's.
  const lock = path.join(ROOT, "dist", ".test-build-lock");
  mkdirSync(path.dirname(lock), { recursive: true });
  for (const t0 = Date.now(); ; ) {
    try {
      mkdirSync(lock);
      break;
    } catch {
      if (Date.now() - (statSync(lock, { throwIfNoEntry: false })?.mtimeMs ?? Date.now()) > 300_000) rmSync(lock, { recursive: true, force: true });
      else if (Date.now() - t0 > 600_000) throw new Error(`${lock} is held for 10 min: remove it if no test run is building`);
      else Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 200);
    }
  }
  try {
    const r = spawnSync(process.execPath, [path.join(ROOT, "scripts", "build.mjs"), "--if-changed"], { cwd: ROOT, stdio: ["ignore", "ignore", "pipe"], encoding: "utf8" });
    if (r.status !== 0) throw new Error(`could not build dist/bundle for the child daemons: ${r.stderr}`);
  } finally {
    rmSync(lock, { recursive: true, force: true });
  }
  bundleChecked = true;
}
/** Exits the way bin/compute-bridge.js does: only once nothing is left pending. */
export const BIN_LIKE_RUNNER = fileURLToPath(new URL("./run-daemon-like-bin.ts", import.meta.url));

export interface ChildDaemon {
  proc: ChildProcess;
  url: string;
  output: () => string;
  kill9(): Promise<void>;
  stop(): Promise<number | null>;
}

/** Every child still running, killed when this test file's process exits (also when a test timed out). */
const children = new Set<ChildProcess>();
process.on("exit", () => {
  for (const c of children) c.kill("SIGKILL");
});

/**
 * Start the daemon as a separate process and wait for its "listening" log line (written whatever
 * the log level). A child that does not start in time is killed, never left behind.
 */
export async function spawnDaemon(configFile: string, env: Record<string, string> = {}, runner = RUNNER): Promise<ChildDaemon> {
  // SIGUSR2 makes the child write a diagnostic report (its JS stack and live handles): asked for
  // when it does not start in time, so the failure says where it stood.
  const reports = mkdtempSync(path.join(os.tmpdir(), "cb-child-report-"));
  if (runner === RUNNER) ensureBundle();
  const args = runner === RUNNER ? [runner, "run", "--config", configFile] : ["--import", "tsx", runner, configFile];
  const proc = spawn(process.execPath, ["--report-on-signal", "--report-signal=SIGUSR2", `--report-directory=${reports}`, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...env },
  });
  children.add(proc);
  proc.once("exit", () => {
    children.delete(proc);
    rmSync(reports, { recursive: true, force: true });
  });
  let out = "";
  proc.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  proc.stderr!.on("data", (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  let startTimer: NodeJS.Timeout | undefined;
  const url = await new Promise<string>((resolve, reject) => {
    // The daemon's start-up line (JSON): {"level":"info", ..., "url":"http://...", ..., "msg":"compute-bridge listening"}.
    const onData = () => {
      const line = out.split("\n").find((l) => l.includes('"msg":"compute-bridge listening"'));
      if (line) {
        proc.stdout!.off("data", onData);
        resolve((JSON.parse(line) as { url: string }).url);
      }
    };
    proc.stdout!.on("data", onData);
    void exited.then((code) => reject(new Error(`daemon exited (${code}) before listening:\n${out}`)));
    // Generous: on a loaded 2-core machine loading the modules alone has taken over 30 s.
    startTimer = setTimeout(() => {
      proc.kill("SIGUSR2");
      startTimer = setTimeout(() => {
        proc.kill("SIGKILL");
        reject(new Error(`daemon did not start listening within 90 s (killed):\n${out}\n${diagnosticReport(reports)}`));
      }, 5000).unref();
    }, 90_000).unref();
  }).finally(() => clearTimeout(startTimer));
  return {
    proc,
    url,
    output: () => out,
    kill9: async () => {
      proc.kill("SIGKILL");
      await exited;
    },
    stop: async () => {
      proc.kill("SIGTERM");
      return exited;
    },
  };
}

/** The JS stack and active handles from a child's diagnostic report, if it wrote one. */
function diagnosticReport(dir: string): string {
  try {
    const file = readdirSync(dir).find((f) => f.endsWith(".json"));
    if (!file) return "(no diagnostic report: the process did not answer SIGUSR2)";
    const r = JSON.parse(readFileSync(path.join(dir, file), "utf8")) as { javascriptStack?: { message?: string; stack?: string[] }; libuv?: { type: string; is_active: boolean }[] };
    const handles = (r.libuv ?? []).filter((h) => h.is_active).map((h) => h.type);
    return `diagnostic report: ${r.javascriptStack?.message ?? ""}\n${(r.javascriptStack?.stack ?? []).slice(0, 25).join("\n")}\nactive handles: ${handles.join(", ")}`;
  } catch (e) {
    return `(diagnostic report unreadable: ${(e as Error).message})`;
  }
}
