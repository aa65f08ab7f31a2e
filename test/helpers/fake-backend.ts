import type { ManagedBackend, Satisfaction } from "../../src/backends/backend.js";
import type { Capabilities, ComputeGrant, ExitObservation, ProvisionedInstance } from "../../src/domain/index.js";

/** A declarative in-memory backend for routing tests (not a cloud stand-in). */
export function staticBackend(name: string, caps: Capabilities, opts: { atCapacity?: boolean } = {}): ManagedBackend {
  return {
    name,
    capabilities: () => caps,
    canSatisfy(g: ComputeGrant): Satisfaction {
      if (!caps.regions.includes(g.region)) return { ok: false, code: "region_not_served", message: `${name} does not serve ${g.region}` };
      if (g.tdx_required && !caps.tdx_capable) return { ok: false, code: "tdx_not_supported", message: `${name} has no TDX` };
      if (g.cpu_millicores > caps.max_cpu_millicores || g.ram_mib > caps.max_ram_mib) return { ok: false, code: "too_large", message: `${name} is too small` };
      if (opts.atCapacity) return { ok: false, code: "at_capacity", message: `${name} is full` };
      return { ok: true };
    },
    provision: async (): Promise<ProvisionedInstance> => {
      throw new Error("not used in routing tests");
    },
    watchUntilExit: async (): Promise<ExitObservation> => {
      throw new Error("not used in routing tests");
    },
    terminate: async () => undefined,
  };
}
