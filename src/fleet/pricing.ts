import type { BackendName, BootConfig } from "../config/schema.js";
import type { ComputeGrant } from "../domain/index.js";

/**
 * How a kind of backend bills running time: a minimum, then per `incrementSeconds`. The bridge
 * charges every grant by these rules, so its spend follows the bill rather than the wall clock.
 */
export interface BillingRule {
  minimumSeconds: number;
  incrementSeconds: number;
  source: string;
}

export const BILLING: Record<BackendName, BillingRule> = {
  // Linux On-Demand, Spot and Reserved instances: per-second billing with a 60-second minimum.
  aws: { minimumSeconds: 60, incrementSeconds: 1, source: "https://aws.amazon.com/ec2/pricing/on-demand/ (per-second billing, 60-second minimum)" },
  // vCPUs and memory of VM instances: per second, with a one-minute minimum.
  gcp: { minimumSeconds: 60, incrementSeconds: 1, source: "https://cloud.google.com/compute/vm-instance-pricing#billing_model (per second, 1-minute minimum)" },
  // Per second; since 1 June 2025 a VM stopped within 300 s of its start is billed 300 s.
  azure: {
    minimumSeconds: 300,
    incrementSeconds: 1,
    source: "https://azure.microsoft.com/pricing/details/virtual-machines/linux/ (per second); 5-minute minimum from 2025-06-01: https://learn.microsoft.com/en-us/answers/questions/2259765/",
  },
  // The operator's own machines: what they cost per second of allocation, no minimum.
  baremetal: { minimumSeconds: 0, incrementSeconds: 1, source: "operator-owned machines: per second of allocation" },
  local: { minimumSeconds: 0, incrementSeconds: 1, source: "this host: per second of allocation" },
};

/** Seconds billed for `seconds` of running time (0 for something that never ran). */
export function billedSeconds(seconds: number, rule: BillingRule): number {
  if (!(seconds > 0)) return 0;
  const up = Math.ceil(seconds / rule.incrementSeconds - 1e-9) * rule.incrementSeconds;
  return Math.max(rule.minimumSeconds, up);
}

/** Money is kept to 6 decimals: exact enough for any currency, and free of float dust in logs. */
export function money(n: number): number {
  return Math.round(n * 1e6) / 1e6;
}

export function costOf(pricePerHour: number, seconds: number, rule: BillingRule): number {
  return money((pricePerHour * billedSeconds(seconds, rule)) / 3600);
}

/** What routing knows of where a grant would run: the shape a cloud would launch, the machine. */
export interface Offer {
  shape?: string;
  placement?: string;
}

/**
 * Prices from the config: per cloud shape, per bare-metal machine (per 1,000 millicores and per
 * GiB allocated, times the grant's size) and for local (absent: free). Null where a price is
 * missing, which only happens when neither a budget nor the cheapest policy asked for one.
 */
export class PriceBook {
  constructor(private readonly cfg: BootConfig) {}

  get currency(): string {
    return this.cfg.fleet.currency;
  }

  rule(backend: string): BillingRule {
    return BILLING[backend as BackendName] ?? BILLING.local;
  }

  hourly(backend: string, grant: ComputeGrant, offer: Offer): number | null {
    const b = this.cfg.backends;
    const sized = (cpu: number | undefined, gib: number | undefined) =>
      cpu === undefined || gib === undefined ? null : money((cpu * grant.cpu_millicores) / 1000 + (gib * grant.ram_mib) / 1024);
    switch (backend) {
      case "aws":
      case "gcp":
      case "azure": {
        const prices = b[backend]?.prices;
        return offer.shape !== undefined ? (prices?.[offer.shape] ?? null) : null;
      }
      case "baremetal": {
        const m = b.baremetal?.machines.find((x) => x.name === offer.placement);
        return m ? sized(m.price_per_cpu_hour, m.price_per_gib_hour) : null;
      }
      case "local":
        return sized(b.local?.price_per_cpu_hour ?? 0, b.local?.price_per_gib_hour ?? 0);
      default:
        return null;
    }
  }

  /** Every configured price, for the card (publish_prices), doctor and check-config. */
  table(): Record<string, Record<string, number | { per_cpu_hour: number | null; per_gib_hour: number | null }>> {
    const b = this.cfg.backends;
    const out: Record<string, Record<string, number | { per_cpu_hour: number | null; per_gib_hour: number | null }>> = {};
    for (const n of ["aws", "gcp", "azure"] as const) if (b[n]) out[n] = { ...b[n]!.prices };
    if (b.baremetal) out.baremetal = Object.fromEntries(b.baremetal.machines.map((m) => [m.name, { per_cpu_hour: m.price_per_cpu_hour ?? null, per_gib_hour: m.price_per_gib_hour ?? null }]));
    if (b.local) out.local = { local: { per_cpu_hour: b.local.price_per_cpu_hour ?? 0, per_gib_hour: b.local.price_per_gib_hour ?? 0 } };
    return out;
  }
}
