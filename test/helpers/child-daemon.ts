import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";

const RUNNER = fileURLToPath(new URL("./run-daemon.ts", import.meta.url));
/** Exits the way bin/compute-bridge.js does: only once nothing is left pending. */
export const BIN_LIKE_RUNNER = fileURLToPath(new URL("./run-daemon-like-bin.ts", import.meta.url));

export interface ChildDaemon {
  proc: ChildProcess;
  url: string;
  output: () => string;
  kill9(): Promise<void>;
  stop(): Promise<number | null>;
}

/** Start the daemon as a separate process and wait for its "listening" log line (written whatever the log level). */
export async function spawnDaemon(configFile: string, env: Record<string, string> = {}, runner = RUNNER): Promise<ChildDaemon> {
  const proc = spawn(process.execPath, ["--import", "tsx", runner, configFile], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } });
  let out = "";
  proc.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  proc.stderr!.on("data", (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
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
    // Killed then: a daemon that starts after the test gave up would otherwise outlive it.
    setTimeout(() => {
      proc.kill("SIGKILL");
      reject(new Error(`daemon did not start listening within 90 s:\n${out}`));
    }, 90_000).unref();
  });
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
