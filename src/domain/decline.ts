import { z } from "zod";

/** Machine-readable reasons a backend declines a grant; the market relies on these codes. */
export const DeclineCode = z.enum([
  "region_not_served",
  "tdx_not_supported",
  "too_large",
  "image_format_not_supported",
  "at_capacity",
  "offering_unavailable",
  "backend_unavailable",
  "budget_exhausted",
]);
export type DeclineCode = z.infer<typeof DeclineCode>;

export const Decline = z.strictObject({
  backend: z.string(),
  code: DeclineCode,
  message: z.string(),
  /** budget_exhausted: what is left of the cap that declined it, in `currency`. */
  remaining: z.number().nonnegative().optional(),
  currency: z.string().optional(),
});
export type Decline = z.infer<typeof Decline>;
