import { fleetOrder, type BootConfig } from "../config/schema.js";
import type { Capabilities, ComputeGrant, Decline, Envelope } from "../domain/index.js";
import type { BackendContext, ManagedBackend } from "../backends/backend.js";
import { OfferingCache } from "../backends/offering-cache.js";
import { createBackend, type BackendOptions } from "../backends/registry.js";
import type { Clock } from "../util/clock.js";
import { Spend } from "./spend.js";
import { Reservations, type Reservation } from "./reservations.js";

/** A backend chosen for a grant: where its capacity goes, its hourly price and worst-case cost. */
export interface Chosen {
  ok: true;
  backend: ManagedBackend;
  placement: string | null;
  price_per_hour: number | null;
  worst_case: number;
}
export type Route = Chosen | { ok: false; declines: Decline[] };

/** Thrown by provisionForGrant when no backend takes the grant; `declines` is machine-readable. */
export class NoBackendError extends Error {
  override name = "NoBackendError";
  constructor(readonly declines: Decline[]) {
    super(`no backend can satisfy the grant: ${declines.map((d) => `${d.backend}: ${d.code} (${d.message})`).join("; ")}`);
  }
}

/**
 * The configured backends in the operator's preference order. Routing is first-match-wins:
 * the first backend whose canSatisfy() is true, given the reservations it already holds, gets the
 * grant; admit() reserves its capacity in the same synchronous step.
 */
export class Fleet {
  readonly reservations = new Reservations();

  constructor(
    readonly backends: readonly ManagedBackend[],
    readonly unavailable: OfferingCache,
    /** Prices, spend caps and the routing policy; absent: ordered, unpriced, uncapped. */
    readonly spend: Spend | null = null,
  ) {}

  static async build(cfg: BootConfig, ctx: Omit<BackendContext, "unavailable">, options: BackendOptions = {}): Promise<Fleet> {
    const unavailable = new OfferingCache(cfg.fleet.unavailable_ttl_seconds * 1000, ctx.clock);
    const backends: ManagedBackend[] = [];
    for (const name of fleetOrder(cfg)) backends.push(await createBackend(name, cfg, { ...ctx, unavailable }, options));
    return new Fleet(backends, unavailable, Spend.fromConfig(cfg, ctx.almanac, ctx.clock));
  }

  /** A fleet from ready-made backends (tests, benchmarks). */
  static of(backends: ManagedBackend[], clock: Clock, ttlMs = 300_000, spend: Spend | null = null): Fleet {
    return new Fleet(backends, new OfferingCache(ttlMs, clock), spend);
  }

  get(name: string): ManagedBackend | undefined {
    return this.backends.find((b) => b.name === name);
  }

  /**
   * First backend (in order, skipping `exclude`) whose canSatisfy is true against what it holds,
   * or every decline. Reserves nothing: see admit().
   */
  route(grant: ComputeGrant, envelope?: Envelope, exclude: ReadonlySet<string> = NONE): Route {
    const declines: Decline[] = [];
    const spend = this.spend;
    let best: Chosen | null = null;
    for (const b of this.backends) {
      if (exclude.has(b.name)) continue;
      const s = b.canSatisfy(grant, this.reservations.held(b.name), envelope);
      if (!s.ok) {
        declines.push({ backend: b.name, code: s.code, message: s.message });
        continue;
      }
      const placement = s.placement ?? null;
      if (!spend) return { ok: true, backend: b, placement, price_per_hour: null, worst_case: 0 };
      const price = spend.hourly(b.name, grant, s);
      const worst = spend.worstCase(b.name, grant, price);
      const over = spend.budgets.active ? spend.budgets.check(b.name, worst, spend.clock.now(), grant.request_id) : null;
      if (over) {
        const cap = `${over.scope === "fleet" ? "fleet" : `${b.name}`} per_${over.period} budget (${over.limit} ${spend.currency})`;
        declines.push({ backend: b.name, code: "budget_exhausted", message: `its worst case of ${worst} ${spend.currency} (until valid_to) exceeds what is left of the ${cap}: ${over.remaining}`, remaining: over.remaining, currency: spend.currency });
        continue;
      }
      const chosen: Chosen = { ok: true, backend: b, placement, price_per_hour: price, worst_case: worst };
      if (spend.policy === "ordered") return chosen;
      // cheapest: the lowest hourly price among those that can take it, ties by the operator's order.
      if (!best || (price ?? Infinity) < (best.price_per_hour ?? Infinity)) best = chosen;
    }
    return best ?? { ok: false, declines };
  }

  /**
   * Route and reserve in one synchronous step, so that grants admitted together never share the
   * last unit of capacity. A grant that holds a reservation already is moved (failover): its old
   * one is released first, and kept if nothing else takes it.
   */
  admit(grant: ComputeGrant, envelope?: Envelope, exclude?: ReadonlySet<string>): Route {
    const previous = this.reservations.release(grant.request_id);
    const r = this.route(grant, envelope, exclude);
    if (r.ok) {
      this.reservations.reserve(reservationOf(grant, r.backend.name, r.placement));
      const budgets = this.spend?.budgets;
      // Charged to the day it was first accepted in, wherever it moves.
      if (budgets?.active) budgets.charge({ request_id: grant.request_id, backend: r.backend.name, amount: r.worst_case, at_ms: budgets.get(grant.request_id)?.at_ms ?? this.spend!.clock.now() });
    } else if (previous) this.reservations.reserve(previous);
    return r;
  }

  /** Admit or throw NoBackendError; the caller provisions on the returned backend. */
  provisionForGrant(grant: ComputeGrant, envelope?: Envelope, exclude?: ReadonlySet<string>): Chosen {
    const r = this.admit(grant, envelope, exclude);
    if (!r.ok) throw new NoBackendError(r.declines);
    return r;
  }

  /** A grant that was never accepted after all (a re-post, a failed commit) holds nothing. */
  release(requestId: string): void {
    this.reservations.release(requestId);
    this.spend?.budgets.release(requestId);
  }

  /** A grant ended: its capacity is free again, and its actual cost replaces its worst case. */
  settle(requestId: string, cost: number | null): void {
    this.reservations.release(requestId);
    this.spend?.budgets.settle(requestId, cost ?? 0);
  }

  capabilities(): { name: string; capabilities: Capabilities; status: Record<string, unknown> }[] {
    return this.backends.map((b) => ({ name: b.name, capabilities: b.capabilities(), status: b.status?.() ?? {} }));
  }

  async close(): Promise<void> {
    await Promise.allSettled(this.backends.map((b) => b.close?.()));
  }
}

const NONE: ReadonlySet<string> = new Set();

export function reservationOf(grant: ComputeGrant, backend: string, placement: string | null): Reservation {
  return { request_id: grant.request_id, backend, placement, cpu_millicores: grant.cpu_millicores, ram_mib: grant.ram_mib };
}
