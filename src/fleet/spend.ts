import type { BootConfig, BudgetConfig } from "../config/schema.js";
import { BACKEND_NAMES } from "../config/schema.js";
import type { Almanac, ComputeGrant } from "../domain/index.js";
import type { Clock } from "../util/clock.js";
import { Budgets } from "./budget.js";
import { costOf, PriceBook, type Offer } from "./pricing.js";

/**
 * What routing needs to know of money: each offer's hourly price, the worst case of a grant (its
 * price until valid_to, billed by the backend's rule), the spend caps and the routing policy.
 */
export class Spend {
  constructor(
    readonly prices: PriceBook,
    readonly budgets: Budgets,
    readonly policy: "ordered" | "cheapest",
    private readonly almanac: Almanac,
    readonly clock: Clock,
  ) {}

  static fromConfig(cfg: BootConfig, almanac: Almanac, clock: Clock): Spend {
    const perBackend = new Map<string, BudgetConfig>();
    for (const n of BACKEND_NAMES) {
      const b = cfg.backends[n]?.budget;
      if (b) perBackend.set(n, b);
    }
    return new Spend(new PriceBook(cfg), new Budgets(cfg.fleet.budget, perBackend), cfg.fleet.policy, almanac, clock);
  }

  get currency(): string {
    return this.prices.currency;
  }

  hourly(backend: string, grant: ComputeGrant, offer: Offer): number | null {
    return this.prices.hourly(backend, grant, offer);
  }

  /** The most a grant can cost on `backend` at `pricePerHour`: running from `fromMs` until valid_to. */
  worstCase(backend: string, grant: ComputeGrant, pricePerHour: number | null, fromMs = this.clock.now()): number {
    if (pricePerHour === null) return 0;
    return costOf(pricePerHour, (this.almanac.toWallMs(grant.valid_to) - fromMs) / 1000, this.prices.rule(backend));
  }
}

/**
 * The price table and the spend caps of a config, one row each (scope, what, value), for
 * `check-config` and `doctor`: what an operator who reads a monthly bill wants to see first.
 */
export function pricingRows(cfg: BootConfig): [string, string, string][] {
  const cur = cfg.fleet.currency;
  const rows: [string, string, string][] = [["fleet", "policy", cfg.fleet.policy], ["fleet", "currency", cur]];
  const caps = (scope: string, b: BudgetConfig | undefined) => {
    if (b?.per_day !== undefined) rows.push([scope, "budget per UTC day", `${b.per_day} ${cur}`]);
    if (b?.per_month !== undefined) rows.push([scope, "budget per UTC month", `${b.per_month} ${cur}`]);
  };
  caps("fleet", cfg.fleet.budget);
  for (const [backend, table] of Object.entries(new PriceBook(cfg).table())) {
    for (const [shape, p] of Object.entries(table)) {
      const value =
        typeof p === "number"
          ? `${p} ${cur}/h`
          : `${p.per_cpu_hour ?? "unpriced"} ${cur} per 1,000 millicores-hour, ${p.per_gib_hour ?? "unpriced"} ${cur} per GiB-hour`;
      rows.push([backend, `price ${shape}`, value]);
    }
    caps(backend, cfg.backends[backend as (typeof BACKEND_NAMES)[number]]?.budget);
  }
  return rows;
}
