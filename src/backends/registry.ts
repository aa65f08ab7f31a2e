import type { BackendName, BootConfig } from "../config/schema.js";
import type { BackendContext, ManagedBackend } from "./backend.js";

/** Raised when a configured backend is not part of this build. */
export class NotBuiltError extends Error {
  override name = "NotBuiltError";
  constructor(readonly backend: BackendName) {
    super(`backends.${backend}: the ${backend} backend is not built yet in this version of compute-bridge; remove the [backends.${backend}] section`);
  }
}

type Factory = (cfg: BootConfig, ctx: BackendContext, opts: never) => Promise<ManagedBackend>;

/**
 * Per-backend constructor options that are not config: injected clients and pacing for tests
 * and benchmarks (e.g. a pre-authenticated GCP client, an Azure TokenCredential). Production
 * passes none.
 */
export type BackendOptions = Partial<Record<BackendName, unknown>>;

/**
 * One line per backend. Each module is imported only when its section is configured, so a
 * disabled backend's cloud SDK never enters the process.
 */
export const REGISTRY: Record<BackendName, Factory | null> = {
  aws: async (cfg, ctx, opts) => new (await import("./aws.js")).AwsBackend(cfg.backends.aws!, ctx, opts),
  gcp: async (cfg, ctx, opts) => new (await import("./gcp.js")).GcpBackend(cfg.backends.gcp!, ctx, opts),
  azure: async (cfg, ctx, opts) => new (await import("./azure.js")).AzureBackend(cfg.backends.azure!, ctx, opts),
  baremetal: async (cfg, ctx, opts) => new (await import("./baremetal.js")).BareMetalBackend(cfg.backends.baremetal!, ctx, opts),
  local: async (cfg, ctx) => new (await import("./local.js")).LocalBackend(cfg.backends.local!, ctx),
};

/** The backends this build drives (part of the card's measured identity). */
export function builtBackends(): BackendName[] {
  return (Object.keys(REGISTRY) as BackendName[]).filter((n) => REGISTRY[n] !== null).sort();
}

export async function createBackend(name: BackendName, cfg: BootConfig, ctx: BackendContext, options: BackendOptions = {}): Promise<ManagedBackend> {
  const factory = REGISTRY[name];
  if (!factory) throw new NotBuiltError(name);
  return factory(cfg, ctx, (options[name] ?? undefined) as never);
}
