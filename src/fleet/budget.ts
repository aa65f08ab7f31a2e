import type { BudgetConfig } from "../config/schema.js";
import { money } from "./pricing.js";

/** A window a budget caps: a UTC day ("2026-12-01") or a UTC month ("2026-12"). */
export type Period = "day" | "month";

export function windowOf(period: Period, atMs: number): string {
  const iso = new Date(atMs).toISOString();
  return period === "day" ? iso.slice(0, 10) : iso.slice(0, 7);
}

/** One grant's charge: its worst case while it is open, its actual cost once it ended. */
export interface Charge {
  request_id: string;
  backend: string;
  amount: number;
  /** When the grant was accepted: the day and month it is charged to. */
  at_ms: number;
  settled: boolean;
}

export interface Exhausted {
  scope: string;
  period: Period;
  limit: number;
  remaining: number;
}

/**
 * Spend caps per fleet and per backend, per UTC day and month (issue #20). Every grant is charged
 * to the day and month it was accepted in: its worst case (price x billed time until valid_to)
 * from admission, replaced by its actual cost when it ends. Admission is synchronous (the Fleet
 * checks and charges in one turn of the event loop), so concurrent grants never overshoot: the
 * sum of charges in a window never exceeds its cap. Durability is the store's: the grant rows
 * carry price and cost, and the ledger is rebuilt from them at start (GrantManager).
 */
export class Budgets {
  private readonly charges = new Map<string, Charge>();
  /** Sum of charges by "scope|period|window". */
  private readonly totals = new Map<string, number>();

  constructor(
    private readonly fleet: BudgetConfig | undefined,
    private readonly perBackend: ReadonlyMap<string, BudgetConfig>,
  ) {}

  /** Whether any cap is configured at all (no caps: nothing to check or keep). */
  get active(): boolean {
    return this.fleet !== undefined || this.perBackend.size > 0;
  }

  /** The first cap that `amount` more on `backend` now would exceed, or null. */
  check(backend: string, amount: number, nowMs: number, except?: string): Exhausted | null {
    for (const [scope, cfg] of this.scopes(backend)) {
      for (const period of ["day", "month"] as const) {
        const limit = period === "day" ? cfg.per_day : cfg.per_month;
        if (limit === undefined) continue;
        let spent = this.totals.get(key(scope, period, windowOf(period, nowMs))) ?? 0;
        const own = except ? this.charges.get(except) : undefined;
        if (own && this.inScope(own, scope) && windowOf(period, own.at_ms) === windowOf(period, nowMs)) spent -= own.amount;
        if (spent + amount > limit + 1e-9) return { scope, period, limit, remaining: money(Math.max(0, limit - spent)) };
      }
    }
    return null;
  }

  /** Charge (or re-charge, e.g. on failover to another backend) a grant. */
  charge(c: Omit<Charge, "settled"> & { settled?: boolean }): void {
    this.release(c.request_id);
    const charge: Charge = { ...c, amount: money(c.amount), settled: c.settled ?? false };
    this.charges.set(c.request_id, charge);
    this.add(charge, 1);
  }

  /** The grant ended: its actual cost replaces its worst case, in the windows it was charged to. */
  settle(requestId: string, actual: number): void {
    const c = this.charges.get(requestId);
    if (!c) return;
    this.charge({ ...c, amount: actual, settled: true });
  }

  release(requestId: string): void {
    const c = this.charges.get(requestId);
    if (!c) return;
    this.charges.delete(requestId);
    this.add(c, -1);
  }

  get(requestId: string): Charge | undefined {
    return this.charges.get(requestId);
  }

  /** Spend and reservations in the current windows, per scope (metrics, doctor). */
  report(nowMs: number): { scope: string; period: Period; window: string; spent: number; reserved: number; limit: number | null }[] {
    const out: { scope: string; period: Period; window: string; spent: number; reserved: number; limit: number | null }[] = [];
    const scopes = new Set<string>(["fleet", ...this.perBackend.keys()]);
    for (const c of this.charges.values()) scopes.add(c.backend);
    for (const scope of scopes) {
      const cfg = scope === "fleet" ? this.fleet : this.perBackend.get(scope);
      for (const period of ["day", "month"] as const) {
        const w = windowOf(period, nowMs);
        let spent = 0;
        let reserved = 0;
        for (const c of this.charges.values()) {
          if (!this.inScope(c, scope) || windowOf(period, c.at_ms) !== w) continue;
          if (c.settled) spent += c.amount;
          else reserved += c.amount;
        }
        const limit = (period === "day" ? cfg?.per_day : cfg?.per_month) ?? null;
        out.push({ scope, period, window: w, spent: money(spent), reserved: money(reserved), limit });
      }
    }
    return out;
  }

  /**
   * Forget settled charges of windows that have passed (the current month's stay: its cap still
   * counts them). Called now and then; a charge is a few dozen bytes.
   */
  prune(nowMs: number): void {
    const month = windowOf("month", nowMs);
    for (const c of this.charges.values()) if (c.settled && windowOf("month", c.at_ms) !== month) this.release(c.request_id);
  }

  private *scopes(backend: string): Iterable<[string, BudgetConfig]> {
    if (this.fleet) yield ["fleet", this.fleet];
    const b = this.perBackend.get(backend);
    if (b) yield [backend, b];
  }

  private inScope(c: Charge, scope: string): boolean {
    return scope === "fleet" || c.backend === scope;
  }

  private add(c: Charge, sign: 1 | -1): void {
    for (const scope of ["fleet", c.backend]) {
      for (const period of ["day", "month"] as const) {
        const k = key(scope, period, windowOf(period, c.at_ms));
        const n = money((this.totals.get(k) ?? 0) + sign * c.amount);
        if (Math.abs(n) < 1e-9) this.totals.delete(k);
        else this.totals.set(k, n);
      }
    }
  }
}

function key(scope: string, period: Period, window: string): string {
  return `${scope}|${period}|${window}`;
}
