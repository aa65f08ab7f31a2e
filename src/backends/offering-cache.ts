import type { Clock } from "../util/clock.js";

/**
 * Short-lived memory of (backend, region, shape) offerings that just reported no capacity, so
 * the next grants skip them instead of paying for the same failure. Owned by the Fleet, read by
 * backends when they pick a shape.
 */
export class OfferingCache {
  private readonly until = new Map<string, number>();

  constructor(
    private readonly ttlMs: number,
    private readonly clock: Clock,
  ) {}

  private key(backend: string, region: string, shape: string): string {
    return `${backend}\u0000${region}\u0000${shape}`;
  }

  markUnavailable(backend: string, region: string, shape: string): void {
    if (this.ttlMs > 0) this.until.set(this.key(backend, region, shape), this.clock.now() + this.ttlMs);
  }

  isUnavailable(backend: string, region: string, shape: string): boolean {
    const k = this.key(backend, region, shape);
    const t = this.until.get(k);
    if (t === undefined) return false;
    if (t <= this.clock.now()) {
      this.until.delete(k);
      return false;
    }
    return true;
  }
}
