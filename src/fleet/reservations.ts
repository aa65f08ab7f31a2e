import type { Held, Usage } from "../backends/backend.js";

/** One grant's claim on a backend's capacity, from its accept until it ends. */
export interface Reservation {
  request_id: string;
  backend: string;
  placement: string | null;
  cpu_millicores: number;
  ram_mib: number;
}

class Totals implements Usage {
  count = 0;
  cpu_millicores = 0;
  ram_mib = 0;
  add(r: Reservation, sign: 1 | -1): void {
    this.count += sign;
    this.cpu_millicores += sign * r.cpu_millicores;
    this.ram_mib += sign * r.ram_mib;
  }
}

const EMPTY: Usage = Object.freeze({ count: 0, cpu_millicores: 0, ram_mib: 0 });

/** What one backend holds, kept incrementally: canSatisfy reads it in O(1) on every route. */
class BackendHeld extends Totals implements Held {
  readonly byPlacement = new Map<string, Totals>();
  at(placement: string): Usage {
    return this.byPlacement.get(placement) ?? EMPTY;
  }
  put(r: Reservation, sign: 1 | -1): void {
    this.add(r, sign);
    if (r.placement === null) return;
    let p = this.byPlacement.get(r.placement);
    if (!p) this.byPlacement.set(r.placement, (p = new Totals()));
    p.add(r, sign);
    if (p.count === 0) this.byPlacement.delete(r.placement);
  }
}

/**
 * The Fleet's ledger of capacity promised to grants (issue #15). In memory, and synchronous: a
 * route and its reservation happen in one turn of the event loop, so two grants arriving together
 * can never both take the last slot. Durability is the store's: a reservation is the non-terminal
 * grant row itself (its backend and placement columns), written in the accept commit and released
 * by the commit that ends the grant, so rebuilding the ledger after a restart is loading the
 * non-terminal grants (GrantManager's constructor, before the listener is up).
 */
export class Reservations {
  private readonly byId = new Map<string, Reservation>();
  private readonly byBackend = new Map<string, BackendHeld>();

  get size(): number {
    return this.byId.size;
  }

  get(requestId: string): Reservation | undefined {
    return this.byId.get(requestId);
  }

  /** What `backend` holds. */
  held(backend: string): Held {
    let h = this.byBackend.get(backend);
    if (!h) this.byBackend.set(backend, (h = new BackendHeld()));
    return h;
  }

  /** Reserve (or move) a grant's capacity; replaces any reservation it had. */
  reserve(r: Reservation): void {
    this.release(r.request_id);
    this.byId.set(r.request_id, r);
    (this.held(r.backend) as BackendHeld).put(r, 1);
  }

  release(requestId: string): Reservation | undefined {
    const r = this.byId.get(requestId);
    if (!r) return undefined;
    this.byId.delete(requestId);
    (this.held(r.backend) as BackendHeld).put(r, -1);
    return r;
  }

  /** Per backend: reservations held and their totals (metrics, status). */
  usage(): Map<string, Usage> {
    const out = new Map<string, Usage>();
    for (const [name, h] of this.byBackend) out.set(name, { count: h.count, cpu_millicores: h.cpu_millicores, ram_mib: h.ram_mib });
    return out;
  }
}
