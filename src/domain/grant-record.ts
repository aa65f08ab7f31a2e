import { z } from "zod";

/**
 * A grant's states. Accepting a grant stores it as `provisioning` (routed, its capacity reserved,
 * waiting for or holding a provisioning slot: the record's `queue` tells which); there is no
 * stored state before that.
 */
export const GrantState = z.enum([
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

/**
 * Every transition a grant may make, and nothing else: the store's writer refuses any other
 * (issue #17). provisioning -> provisioning records a move to another backend (failover) or its
 * attempts; the four terminal states are reached only from terminating, with the ComputeLog.
 */
export const TRANSITIONS: Readonly<Record<GrantState, readonly GrantState[]>> = {
  provisioning: ["provisioning", "running", "terminating"],
  running: ["terminating"],
  terminating: ["completed", "failed", "expired", "cancelled"],
  completed: [],
  failed: [],
  expired: [],
  cancelled: [],
};

export function canTransition(from: string, to: string): boolean {
  return (TRANSITIONS as Record<string, readonly string[] | undefined>)[from]?.includes(to) ?? false;
}
