/**
 * Azure backend: the shared VM backend (cloud/vm-backend.ts) with the ARM adapter
 * (azure/adapter.ts): VMs with a public IP and a NIC per grant, Intel TDX confidential VMs for
 * grants that require TDX.
 */
import type { AzureConfig } from "../config/schema.js";
import type { BackendContext } from "./backend.js";
import { CloudVmBackend, type VmBackendOptions } from "./cloud/vm-backend.js";
import { AzureAdapter, type AzureAdapterOptions } from "./azure/adapter.js";

/** Overrides for tests and benchmarks; production takes everything from the config. */
export interface AzureBackendOptions extends AzureAdapterOptions, Pick<VmBackendOptions, "onPoll" | "maxImageBytes" | "consoleConcurrency"> {}

export class AzureBackend extends CloudVmBackend {
  constructor(cfg: AzureConfig, ctx: BackendContext, opts: AzureBackendOptions = {}) {
    const { onPoll, maxImageBytes, consoleConcurrency, ...adapter } = opts;
    super(new AzureAdapter(cfg, ctx, adapter), ctx, {
      ...(onPoll ? { onPoll } : {}),
      ...(maxImageBytes !== undefined ? { maxImageBytes } : {}),
      ...(consoleConcurrency !== undefined ? { consoleConcurrency } : {}),
    });
  }
}
