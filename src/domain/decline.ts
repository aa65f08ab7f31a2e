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
]);
export type DeclineCode = z.infer<typeof DeclineCode>;

export const Decline = z.strictObject({
  backend: z.string(),
  code: DeclineCode,
  message: z.string(),
});
export type Decline = z.infer<typeof Decline>;
