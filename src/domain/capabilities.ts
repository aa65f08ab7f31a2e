import { z } from "zod";
import { Region } from "./grant.js";

export const Capabilities = z.strictObject({
  regions: z.array(Region),
  tdx_capable: z.boolean(),
  max_cpu_millicores: z.number().int().nonnegative(),
  max_ram_mib: z.number().int().nonnegative(),
});
export type Capabilities = z.infer<typeof Capabilities>;
