import { hostname } from "node:os";

// Leases of several replicas on one database (issue #19): what every engine and the manager share.

/** A write refused because this replica's lease on the grant was taken over: drop the grant. */
export class LeaseLostError extends Error {
  override name = "LeaseLostError";
  constructor(readonly requestId: string) {
    super(`grant ${requestId}: this replica's lease was taken over by another replica; its write was refused`);
  }
}

/**
 * A replica's default name: the host and the process, unique among replicas running at once (a
 * restarted replica is a new one: the leases of the old one lapse, or were released at its stop).
 */
export function defaultReplicaId(): string {
  return `${hostname()}-${process.pid}`;
}
