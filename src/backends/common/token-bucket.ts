/**
 * Client-side pacing of cloud API calls: a token bucket per (scope, API class), the algorithm
 * the clouds themselves throttle with (EC2: "Request throttling for the Amazon EC2 API",
 * https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html — a bucket per action
 * category and Region, refilled every second). Pacing to the documented bucket means a burst of
 * grants waits here, in order, instead of being answered RequestLimitExceeded / 429 and retried.
 *
 * - `take(signal)` resolves when a token is available; waiters are served first come, first
 *   served (a later small caller never overtakes an earlier one), and leave the queue when their
 *   signal aborts.
 * - `throttled(retryAfterMs)` is the cloud's own word that we went too fast (a throttling code,
 *   or a 429 with Retry-After): the bucket is emptied so that its next token comes when the pause
 *   ends (the balance goes below zero), and refills at its rate from there.
 * - Time comes from the injected Clock, so tests drive it without sleeping.
 */
import { abortError, type Clock } from "../../util/clock.js";

export interface BucketSpec {
  /** Most tokens the bucket holds (the burst size). */
  bucket: number;
  /** Tokens added per second, up to `bucket`. */
  refill_per_second: number;
}

interface Waiter {
  resolve: () => void;
  reject: (e: Error) => void;
  signal: AbortSignal | undefined;
  onAbort: () => void;
}

export class TokenBucket {
  private tokens: number;
  private last: number;
  private readonly queue: Waiter[] = [];
  private pumping = false;
  /** Wakes the pump early (a throttle signal moved the time the head may go). */
  private wake: AbortController | null = null;

  constructor(
    readonly spec: BucketSpec,
    private readonly clock: Clock,
  ) {
    if (!(spec.bucket >= 1) || !(spec.refill_per_second > 0)) throw new RangeError("a token bucket needs bucket >= 1 and refill_per_second > 0");
    this.tokens = spec.bucket;
    this.last = clock.now();
  }

  /** Callers waiting for a token. */
  get waiting(): number {
    return this.queue.length;
  }

  /** Tokens available now (fractional while refilling). */
  available(): number {
    this.refill();
    return Math.max(0, this.tokens);
  }

  /** Resolves once a token is taken for the caller; rejects with an AbortError when `signal` aborts first. */
  take(signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(abortError(signal));
    if (this.queue.length === 0 && this.tryTake()) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const w: Waiter = {
        resolve,
        reject,
        signal,
        onAbort: () => {
          const i = this.queue.indexOf(w);
          if (i >= 0) this.queue.splice(i, 1);
          reject(abortError(signal!));
        },
      };
      signal?.addEventListener("abort", w.onAbort, { once: true });
      this.queue.push(w);
      void this.pump();
    });
  }

  /**
   * The cloud said we are too fast: nobody is served for `pauseMs` (its Retry-After, or by
   * default the time one token takes to refill); the next token comes when the pause ends.
   */
  throttled(pauseMs?: number): void {
    this.refill();
    const ms = pauseMs !== undefined && Number.isFinite(pauseMs) && pauseMs >= 0 ? pauseMs : 1000 / this.spec.refill_per_second;
    this.tokens = Math.min(this.tokens, 1 - (ms / 1000) * this.spec.refill_per_second);
    this.wake?.abort();
  }

  private refill(): void {
    const now = this.clock.now();
    if (now > this.last) this.tokens = Math.min(this.spec.bucket, this.tokens + ((now - this.last) / 1000) * this.spec.refill_per_second);
    this.last = Math.max(this.last, now);
  }

  private tryTake(): boolean {
    this.refill();
    // (Refill sums of fractions land a hair under 1 where they should be exactly 1.)
    if (this.tokens < 1 - 1e-9) return false;
    this.tokens -= 1;
    return true;
  }

  private waitMs(): number {
    return Math.max(1, Math.ceil(((1 - this.tokens) / this.spec.refill_per_second) * 1000 - 1e-6));
  }

  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.queue.length > 0) {
        if (this.tryTake()) {
          const w = this.queue.shift()!;
          w.signal?.removeEventListener("abort", w.onAbort);
          w.resolve();
          continue;
        }
        this.wake = new AbortController();
        try {
          await this.clock.sleep(this.waitMs(), this.wake.signal);
        } catch {
          /* woken early by throttled(): recompute the wait */
        }
        this.wake = null;
      }
    } finally {
      this.pumping = false;
    }
  }
}

/** Buckets per (scope, API class), created on first use from the class's spec. */
export class RateLimiter<C extends string> {
  private readonly buckets = new Map<string, TokenBucket>();

  constructor(
    private readonly specs: Readonly<Record<C, BucketSpec>>,
    private readonly clock: Clock,
  ) {}

  bucket(scope: string, cls: C): TokenBucket {
    const key = `${scope}\u0000${cls}`;
    let b = this.buckets.get(key);
    if (!b) this.buckets.set(key, (b = new TokenBucket(this.specs[cls], this.clock)));
    return b;
  }

  take(scope: string, cls: C, signal?: AbortSignal): Promise<void> {
    return this.bucket(scope, cls).take(signal);
  }

  throttled(scope: string, cls: C, pauseMs?: number): void {
    this.bucket(scope, cls).throttled(pauseMs);
  }
}
