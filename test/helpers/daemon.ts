import { Writable } from "node:stream";
import path from "node:path";
import { startDaemon, type Daemon, type DaemonOptions } from "../../src/daemon.js";
import { writeLocalConfig, type TestConfigOptions } from "./config.js";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import { killLocalRuns } from "./proc.js";

/** Captures the daemon's JSON log lines in memory. */
export class LogSink extends Writable {
  lines: string[] = [];
  override _write(chunk: Buffer, _enc: string, cb: () => void) {
    this.lines.push(...chunk.toString().split("\n").filter(Boolean));
    cb();
  }
  get text(): string {
    return this.lines.join("\n");
  }
}

export interface TestDaemon {
  d: Daemon;
  url: string;
  dir: string;
  stateDir: string;
  configFile: string;
  logs: LogSink;
  restart(): Promise<TestDaemon>;
}

/** An in-process daemon with the local backend on a random loopback port. */
export async function startTestDaemon(
  t: { after: (fn: () => void | Promise<void>) => void },
  opts: Partial<TestConfigOptions> = {},
  daemonOpts: Partial<DaemonOptions> = {},
): Promise<TestDaemon> {
  // The directory goes only after every daemon started on it has closed (hooks run in order).
  const dir = mkdtempSync(path.join(os.tmpdir(), "cb-test-"));
  const daemons: Daemon[] = [];
  const stateDir = path.join(dir, "state");
  t.after(async () => {
    await Promise.allSettled(daemons.map((d) => d.close()));
    killLocalRuns(stateDir);
    // A supervisor killed a moment ago may still be finishing a write: removal retries on ENOTEMPTY.
    rmSync(dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 50 });
  });
  const configFile = writeLocalConfig(dir, { stateDir, logLevel: "info", ...opts });
  const launch = async (): Promise<TestDaemon> => {
    const logs = new LogSink();
    const d = await startDaemon({ configFile, logDestination: logs, expiryGraceMs: 1500, retryBaseMs: 20, ...daemonOpts });
    daemons.push(d);
    const td: TestDaemon = {
      d,
      url: d.url,
      dir,
      stateDir,
      configFile,
      logs,
      restart: async () => {
        await d.close();
        return launch();
      },
    };
    return td;
  };
  return launch();
}
