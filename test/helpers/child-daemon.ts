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

/** Start the daemon as a separate process and wait for its "listening" log line. */
export async function spawnDaemon(configFile: string, env: Record<string, string> = {}, runner = RUNNER): Promise<ChildDaemon> {
  const proc = spawn(process.execPath, ["--import", "tsx", runner, configFile], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } });
  let out = "";
  proc.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  proc.stderr!.on("data", (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  const url = await new Promise<string>((resolve, reject) => {
    // The CLI always prints this line to stderr, whatever the log level.
    const onData = () => {
      const m = out.match(/compute-bridge listening on (https?:\/\/\S+)/);
      if (m) {
        proc.stderr!.off("data", onData);
        resolve(m[1]!);
      }
    };
    proc.stderr!.on("data", onData);
    void exited.then((code) => reject(new Error(`daemon exited (${code}) before listening:\n${out}`)));
    setTimeout(() => reject(new Error(`daemon did not start listening within 30 s:\n${out}`)), 30_000).unref();
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
