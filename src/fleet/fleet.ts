import { fleetOrder, type BootConfig } from "../config/schema.js";
import type { Capabilities, ComputeGrant, Decline } from "../domain/index.js";
import type { BackendContext, ManagedBackend } from "../backends/backend.js";
import { OfferingCache } from "../backends/offering-cache.js";
import { createBackend, type BackendOptions } from "../backends/registry.js";
import type { Clock } from "../util/clock.js";

export type Route = { ok: true; backend: ManagedBackend } | { ok: false; declines: Decline[] };

/** Thrown by provisionForGrant when no backend takes the grant; `declines` is machine-readable. */
export class NoBackendError extends Error {
  override name = "NoBackendError";
  constructor(readonly declines: Decline[]) {
    super(`no backend can satisfy the grant: ${declines.map((d) => `${d.backend}: ${d.code} (${d.message})`).join("; ")}`);
  }
}

/**
 * The configured backends in the operator's preference order. Routing is first-match-wins:
 * the first backend whose canSatisfy() is true gets the grant.
 */
export class Fleet {
  constructor(
    readonly backends: readonly ManagedBackend[],
    readonly unavailable: OfferingCache,
  ) {}

  static async build(cfg: BootConfig, ctx: Omit<BackendContext, "unavailable">, options: BackendOptions = {}): Promise<Fleet> {
    const unavailable = new OfferingCache(cfg.fleet.unavailable_ttl_seconds * 1000, ctx.clock);
    const backends: ManagedBackend[] = [];
    for (const name of fleetOrder(cfg)) backends.push(await createBackend(name, cfg, { ...ctx, unavailable }, options));
    return new Fleet(backends, unavailable);
  }

  /** A fleet from ready-made backends (tests, benchmarks). */
  static of(backends: ManagedBackend[], clock: Clock, ttlMs = 300_000): Fleet {
    return new Fleet(backends, new OfferingCache(ttlMs, clock));
  }

  get(name: string): ManagedBackend | undefined {
    return this.backends.find((b) => b.name === name);
  }

  /** First backend (in order, skipping `exclude`) whose canSatisfy is true, or every decline. */
  route(grant: ComputeGrant, exclude: ReadonlySet<string> = new Set()): Route {
    const declines: Decline[] = [];
    for (const b of this.backends) {
      if (exclude.has(b.name)) continue;
      const s = b.canSatisfy(grant);
      if (s.ok) return { ok: true, backend: b };
      declines.push({ backend: b.name, code: s.code, message: s.message });
    }
    return { ok: false, declines };
  }

  /** Route or throw NoBackendError; the caller provisions on the returned backend. */
  provisionForGrant(grant: ComputeGrant, exclude?: ReadonlySet<string>): ManagedBackend {
    const r = this.route(grant, exclude);
    if (!r.ok) throw new NoBackendError(r.declines);
    return r.backend;
  }

  capabilities(): { name: string; capabilities: Capabilities; status: Record<string, unknown> }[] {
    return this.backends.map((b) => ({ name: b.name, capabilities: b.capabilities(), status: b.status?.() ?? {} }));
  }

  async close(): Promise<void> {
    await Promise.allSettled(this.backends.map((b) => b.close?.()));
  }
}
