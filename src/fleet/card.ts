import type { BootConfig } from "../config/schema.js";
import type { ProviderCard, UnsignedProviderCard } from "../domain/index.js";
import { canonicalJson, sha256Hex } from "../util/canonical-json.js";
import type { Identity } from "../util/identity.js";
import { VERSION } from "../version.js";
import type { Fleet } from "./fleet.js";

/**
 * sha256 over the canonical JSON of the enabled backend set and their config. The config holds
 * no secret values (only file paths / env var names), so all of it is measured: the same config
 * gives the same digest however its tables are ordered; another backend set gives another one.
 */
export function configDigest(cfg: BootConfig): string {
  // Prices and spend caps are commercial settings, not what the bridge is: they stay out of its
  // measured identity (a budget raised at noon is the same provider).
  const enabled = Object.fromEntries(Object.entries(cfg.backends).filter(([, v]) => v !== undefined).map(([k, v]) => [k, withoutCommercial(v as object)]));
  return sha256Hex(canonicalJson({ backend_set: Object.keys(enabled).sort(), backends: enabled }));
}

export function buildCard(cfg: BootConfig, fleet: Fleet, identity: Identity): ProviderCard {
  const entries = fleet.capabilities();
  const regions = [...new Set(entries.flatMap((e) => e.capabilities.regions))].sort();
  const unsigned: UnsignedProviderCard = {
    provider_id: cfg.bridge.provider_id,
    bridge_version: VERSION,
    regions,
    tdx_capable: entries.some((e) => e.capabilities.tdx_capable),
    max_cpu_millicores: entries.reduce((s, e) => s + e.capabilities.max_cpu_millicores, 0),
    max_ram_mib: entries.reduce((s, e) => s + e.capabilities.max_ram_mib, 0),
    backends: entries.map((e) => ({ name: e.name, capabilities: e.capabilities, status: e.status })),
    config_digest: configDigest(cfg),
    public_key: identity.publicKeyBase64,
    ...(cfg.fleet.publish_prices && fleet.spend ? { prices: { currency: fleet.spend.currency, backends: fleet.spend.prices.table() } } : {}),
  };
  return { ...unsigned, signature: identity.signDoc(unsigned) };
}

const COMMERCIAL = new Set(["prices", "budget", "price_per_cpu_hour", "price_per_gib_hour"]);

function withoutCommercial(v: object): object {
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) {
    if (COMMERCIAL.has(k)) continue;
    out[k] = Array.isArray(x) ? x.map((e) => (e && typeof e === "object" ? withoutCommercial(e as object) : e)) : x;
  }
  return out;
}
