/**
 * A variant of test/helpers/run-daemon.ts: runs the daemon in a child process (so a test can
 * `kill -9` it) exactly as `compute-bridge run` does — same "listening on" line on stderr, same
 * SIGTERM/SIGINT handling — but with backend options injected from the environment, because
 * the real CLI takes none:
 *
 *   CB_TEST_INJECT='{"gcp":{"accessToken":"..."},"azure":{"accessToken":"..."},"aws":{"retry":{"maxAttempts":8,"delayMs":5}},"daemon":{...}}'
 *
 * - gcp.accessToken   -> GcpBackendOptions.authClient: an OAuth2Client holding that static token
 *                        (the GCE fake's), so nothing ever talks to Google's OAuth server.
 * - azure.accessToken -> AzureBackendOptions.credential: a TokenCredential returning that token
 *                        (the ARM fake's). Without it the backend builds its own credential from
 *                        the config (client secret via authority_host), as in production.
 * - aws.retry         -> AwsBackendOptions.retryStrategy: a ConfiguredRetryStrategy with a fixed
 *                        short delay (the SDK's adaptive strategy backs off for seconds when a
 *                        fake throttles 30 % of calls).
 * - <backend>.options -> spread into that backend's options as given (plain JSON values only).
 * - daemon            -> DaemonOptions test knobs (expiryGraceMs, retryBaseMs, reconcileIntervalMs, ...).
 *
 * A network guard refuses, before any DNS lookup or packet, every connection to anything but
 * 127.0.0.1 (or ::1, localhost, a unix socket) and reports it on stderr as "CB-TEST-GUARD
 * refused ..." (tests assert the line never appears).
 */
import { installNetworkGuard } from "../helpers/net-guard.js";
import type { BackendOptions } from "../../src/backends/registry.js";
import type { DaemonOptions } from "../../src/daemon.js";

/** Keep in sync with GUARD_MARKER in ./helpers.ts. */
const GUARD_MARKER = "CB-TEST-GUARD refused";

export interface InjectSpec {
  aws?: { retry?: { maxAttempts: number; delayMs: number }; options?: Record<string, unknown> };
  gcp?: { accessToken?: string; options?: Record<string, unknown> };
  azure?: { accessToken?: string; options?: Record<string, unknown> };
  baremetal?: { options?: Record<string, unknown> };
  local?: { options?: Record<string, unknown> };
  daemon?: Pick<DaemonOptions, "expiryGraceMs" | "retryBaseMs" | "cardCheckIntervalMs" | "reconcileIntervalMs">;
}

async function backendOptions(spec: InjectSpec): Promise<BackendOptions> {
  const out: BackendOptions = {};
  if (spec.aws) {
    const o: Record<string, unknown> = { ...spec.aws.options };
    if (spec.aws.retry) {
      const { ConfiguredRetryStrategy } = await import("@smithy/core/retry");
      const { maxAttempts, delayMs } = spec.aws.retry;
      o.maxAttempts = maxAttempts;
      o.retryStrategy = () => new ConfiguredRetryStrategy(maxAttempts, () => delayMs);
    }
    out.aws = o;
  }
  if (spec.gcp) {
    const o: Record<string, unknown> = { ...spec.gcp.options };
    if (spec.gcp.accessToken) {
      const { OAuth2Client } = await import("google-auth-library");
      const c = new OAuth2Client();
      c.setCredentials({ access_token: spec.gcp.accessToken, expiry_date: Date.now() + 365 * 864e5 });
      o.authClient = c;
    }
    out.gcp = o;
  }
  if (spec.azure) {
    const o: Record<string, unknown> = { ...spec.azure.options };
    const token = spec.azure.accessToken;
    if (token) o.credential = { getToken: async () => ({ token, expiresOnTimestamp: Date.now() + 3_600_000 }) };
    out.azure = o;
  }
  if (spec.baremetal?.options) out.baremetal = { ...spec.baremetal.options };
  if (spec.local?.options) out.local = { ...spec.local.options };
  return out;
}

async function main(): Promise<number> {
  installNetworkGuard((host) => process.stderr.write(`${GUARD_MARKER} a connection to ${host}\n`));
  const configFile = process.argv[2];
  if (!configFile) throw new Error("usage: run-daemon-injected.ts CONFIG");
  const spec = JSON.parse(process.env.CB_TEST_INJECT ?? "{}") as InjectSpec;
  const { startDaemon } = await import("../../src/daemon.js");
  const d = await startDaemon({ configFile, backendOptions: await backendOptions(spec), ...spec.daemon });
  process.stderr.write(`compute-bridge listening on ${d.url} (provider ${d.config.bridge.provider_id}; backends: ${d.fleet.backends.map((b) => b.name).join(", ")})\n`);
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (sig: string) => {
      if (stopping) return;
      stopping = true;
      d.log.info({ signal: sig }, "shutting down");
      const hard = setTimeout(() => resolve(1), 10_000);
      hard.unref();
      d.close().then(
        () => {
          clearTimeout(hard);
          resolve(0);
        },
        () => resolve(1),
      );
    };
    process.once("SIGTERM", () => stop("SIGTERM"));
    process.once("SIGINT", () => stop("SIGINT"));
  });
}

// Tests import only types from this file (`import type`), so this runs only as the child's entry point.
main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    process.stderr.write(`compute-bridge: ${(e as Error).message}\n`);
    process.exit(1);
  },
);
