import type { MarketConfig } from "../config/schema.js";
import type { Store } from "../store/store.js";
import { backoffMs, type Clock } from "../util/clock.js";
import type { Logger } from "../util/logger.js";

/**
 * Delivers the signed ProviderCard (PUT card_url) and each ComputeLog (POST log_url) to the
 * market from the store's outbox: an item leaves the outbox only when the market answers 2xx,
 * so a market outage, or a bridge restart during one, loses nothing.
 */
export class MarketPublisher {
  private wake: (() => void) | null = null;
  private stopped = false;
  private loop: Promise<void> | null = null;
  private readonly ctl = new AbortController();
  /** Delivered / failed attempts, for metrics and tests. */
  delivered = 0;
  failures = 0;

  constructor(
    private readonly store: Store,
    private readonly cfg: MarketConfig,
    private readonly token: string,
    private readonly log: Logger,
    private readonly clock: Clock,
    private readonly requestTimeoutMs = 10_000,
  ) {}

  start(): void {
    this.loop ??= this.run();
  }

  /** Something was enqueued: deliver now rather than at the next scheduled retry. */
  notify(): void {
    this.wake?.();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.ctl.abort();
    this.wake?.();
    await this.loop;
  }

  private async run(): Promise<void> {
    while (!this.stopped) {
      const due = await this.store.dueOutbox(50);
      for (const item of due) {
        if (this.stopped) return;
        const url = item.kind === "card" ? this.cfg.card_url : this.cfg.log_url;
        if (!url) {
          await this.store.ackOutbox(item.id, item.payload);
          continue;
        }
        try {
          const res = await fetch(url, {
            method: item.kind === "card" ? "PUT" : "POST",
            headers: { "content-type": "application/json", authorization: `Bearer ${this.token}` },
            body: item.payload,
            signal: AbortSignal.any([this.ctl.signal, AbortSignal.timeout(this.requestTimeoutMs)]),
          });
          await res.arrayBuffer().catch(() => undefined);
          if (!res.ok) throw new Error(`HTTP ${res.status}`);
          await this.store.ackOutbox(item.id, item.payload);
          this.delivered++;
          this.log.debug({ kind: item.kind, key: item.key }, "delivered to the market");
        } catch (e) {
          if (this.stopped) return;
          this.failures++;
          const delay = Math.max(200, backoffMs(item.attempts + 1, 1000, this.cfg.retry_max_seconds * 1000));
          await this.store.retryOutbox(item.id, this.clock.now() + delay, (e as Error).message);
          this.log.warn({ kind: item.kind, key: item.key, attempt: item.attempts + 1, retry_in_ms: delay, err: { message: (e as Error).message } }, "market delivery failed; will retry");
        }
      }
      if (this.stopped) return;
      const next = await this.store.nextOutboxAt();
      const wait = next === null ? 60_000 : Math.max(0, next - this.clock.now());
      if (wait === 0 && due.length > 0) continue;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.max(wait, 10));
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = null;
    }
  }
}
