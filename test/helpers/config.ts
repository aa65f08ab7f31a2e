import { writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";

export const TEST_TOKEN = "test-token-0123456789abcdef";

export interface TestConfigOptions {
  stateDir: string;
  genesis?: string;
  tickSeconds?: number;
  local?: Partial<{ region: string; cpu_millicores: number; ram_mib: number; max_concurrent: number; poll_interval_ms: number; terminate_grace_seconds: number; image_roots: string[]; image_idle_timeout_seconds: number; runs_dir: string }>;
  /** [bridge] image_allow_cidrs (e.g. ["127.0.0.0/8"] for an image server on loopback). */
  imageAllowCidrs?: string[];
  extra?: string;
  /** Extra lines in the [listener] section. */
  listenerExtra?: string;
  logLevel?: string;
}

/** Write a boot TOML for a daemon with the local backend into `dir`; returns its path. */
export function writeLocalConfig(dir: string, o: TestConfigOptions): string {
  writeFileSync(path.join(dir, "token"), `${TEST_TOKEN}\n`, { mode: 0o600 });
  const l = { region: "local", cpu_millicores: 4000, ram_mib: 8192, max_concurrent: 500, poll_interval_ms: 20, terminate_grace_seconds: 1, image_roots: [os.tmpdir()], ...o.local };
  const file = path.join(dir, "bridge.toml");
  writeFileSync(
    file,
    `[bridge]
provider_id = "test-provider"
state_dir = ${JSON.stringify(o.stateDir)}
${o.imageAllowCidrs ? `image_allow_cidrs = ${JSON.stringify(o.imageAllowCidrs)}` : ""}

[listener]
bind = "127.0.0.1:0"
token_file = "token"
${o.listenerExtra ?? ""}

[almanac]
genesis = ${JSON.stringify(o.genesis ?? "2026-01-01T00:00:00Z")}
tick_seconds = ${o.tickSeconds ?? 1}

[log]
level = ${JSON.stringify(o.logLevel ?? "warn")}

[backends.local]
${Object.entries(l)
  .map(([k, v]) => `${k} = ${JSON.stringify(v)}`)
  .join("\n")}
${o.extra ?? ""}
`,
  );
  return file;
}

/** The tick `seconds` from now, for tick_seconds = 1 and genesis 2026-01-01. */
export function tickIn(seconds: number, genesis = "2026-01-01T00:00:00Z", tickSeconds = 1): number {
  return Math.ceil((Date.now() + seconds * 1000 - Date.parse(genesis)) / (tickSeconds * 1000));
}
