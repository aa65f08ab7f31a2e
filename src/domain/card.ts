import { z } from "zod";
import { Capabilities } from "./capabilities.js";

export const BackendCardEntry = z.strictObject({
  name: z.string(),
  capabilities: Capabilities,
  /** Operational detail (e.g. machines down) that the market may use; empty when healthy. */
  status: z.record(z.string(), z.unknown()),
});
export type BackendCardEntry = z.infer<typeof BackendCardEntry>;

export const UnsignedProviderCard = z.strictObject({
  provider_id: z.string(),
  bridge_version: z.string(),
  regions: z.array(z.string()),
  tdx_capable: z.boolean(),
  max_cpu_millicores: z.number().int().nonnegative(),
  max_ram_mib: z.number().int().nonnegative(),
  backends: z.array(BackendCardEntry),
  /** sha256 of the canonical JSON of the enabled backend set and their non-secret config. */
  config_digest: z.string().regex(/^[0-9a-f]{64}$/),
  /** base64 raw ed25519 public key of the bridge identity. */
  public_key: z.string(),
  /** Only with [fleet] publish_prices = true: price per hour of each shape / machine rates. */
  prices: z
    .strictObject({
      currency: z.string(),
      backends: z.record(z.string(), z.record(z.string(), z.union([z.number(), z.strictObject({ per_cpu_hour: z.number().nullable(), per_gib_hour: z.number().nullable() })]))),
    })
    .optional(),
});
export type UnsignedProviderCard = z.infer<typeof UnsignedProviderCard>;

export const ProviderCard = UnsignedProviderCard.extend({ signature: z.string() });
export type ProviderCard = z.infer<typeof ProviderCard>;
