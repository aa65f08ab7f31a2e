import { z } from "zod";

export const GrantState = z.enum([
  "accepted",
  "provisioning",
  "running",
  "terminating",
  "completed",
  "failed",
  "expired",
  "cancelled",
]);
export type GrantState = z.infer<typeof GrantState>;

export const TERMINAL_STATES: ReadonlySet<GrantState> = new Set(["completed", "failed", "expired", "cancelled"]);
export const isTerminal = (s: GrantState): boolean => TERMINAL_STATES.has(s);
