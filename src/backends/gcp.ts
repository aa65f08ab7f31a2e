/**
 * Google Compute Engine backend (Intel TDX on C3 machine types): the shared VM backend
 * (cloud/vm-backend.ts) with the GCE adapter (gcp/adapter.ts).
 */
import type { GcpConfig } from "../config/schema.js";
import type { BackendContext } from "./backend.js";
import { CloudVmBackend, type VmBackendOptions } from "./cloud/vm-backend.js";
import { GceAdapter } from "./gcp/adapter.js";
import type { GceApiOptions } from "./gcp/api.js";

/** Overrides for tests and benchmarks; production takes everything from the config. */
export interface GcpBackendOptions extends GceApiOptions, Pick<VmBackendOptions, "onPoll" | "maxImageBytes" | "consoleConcurrency"> {
  /** Pause between SSH banner probes (default: the poll interval, at most 5 s). */
  sshProbeIntervalMs?: number;
}

export class GcpBackend extends CloudVmBackend {
  constructor(cfg: GcpConfig, ctx: BackendContext, opts: GcpBackendOptions = {}) {
    const pollMs = cfg.poll_interval_seconds * 1000;
    super(new GceAdapter(cfg, ctx, opts), ctx, {
      // GCE lists an instance as soon as its insert is accepted: booting VMs are polled like running ones.
      launchPollMs: pollMs,
      launchMissingAfter: 3,
      sshProbeMs: opts.sshProbeIntervalMs ?? Math.min(pollMs, 5000),
      ...(opts.onPoll ? { onPoll: opts.onPoll } : {}),
      ...(opts.maxImageBytes !== undefined ? { maxImageBytes: opts.maxImageBytes } : {}),
      ...(opts.consoleConcurrency !== undefined ? { consoleConcurrency: opts.consoleConcurrency } : {}),
    });
  }
}
