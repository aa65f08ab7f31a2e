/**
 * AWS EC2 backend: the shared VM backend (cloud/vm-backend.ts) with the EC2 adapter
 * (aws/adapter.ts). EC2 has no Intel TDX instances: tdx_capable is false.
 */
import type { AwsConfig } from "../config/schema.js";
import type { BackendContext } from "./backend.js";
import { CloudVmBackend, type VmBackendOptions } from "./cloud/vm-backend.js";
import { Ec2Adapter, type Ec2AdapterOptions } from "./aws/adapter.js";

/** Overrides for tests and benchmarks; production takes everything from the config. */
export interface AwsBackendOptions extends Ec2AdapterOptions, Pick<VmBackendOptions, "onPoll" | "maxImageBytes" | "consoleConcurrency"> {
  /** Exit-watch poll interval; default poll_interval_seconds. */
  pollIntervalMs?: number;
  /** Poll interval while an instance boots; default min(poll interval, 1 s). */
  readyPollIntervalMs?: number;
  /** Pause between SSH probes; default the ready poll interval. */
  sshProbeIntervalMs?: number;
}

export class AwsBackend extends CloudVmBackend {
  constructor(cfg: AwsConfig, ctx: BackendContext, opts: AwsBackendOptions = {}) {
    const pollMs = opts.pollIntervalMs ?? cfg.poll_interval_seconds * 1000;
    const launchPollMs = opts.readyPollIntervalMs ?? Math.min(pollMs, 1000);
    super(new Ec2Adapter(cfg, ctx, { ...opts, pollIntervalMs: pollMs, confirmPollMs: opts.confirmPollMs ?? launchPollMs }), ctx, {
      launchPollMs,
      sshProbeMs: opts.sshProbeIntervalMs ?? launchPollMs,
      ...(opts.onPoll ? { onPoll: opts.onPoll } : {}),
      ...(opts.maxImageBytes !== undefined ? { maxImageBytes: opts.maxImageBytes } : {}),
      ...(opts.consoleConcurrency !== undefined ? { consoleConcurrency: opts.consoleConcurrency } : {}),
    });
  }
}
