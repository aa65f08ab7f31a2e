import { abortError } from "../../util/clock.js";

/**
 * A counting semaphore: at most `max` run() calls at once; the others wait in order, or give up
 * when their signal aborts. Shared by the backends that bound their concurrent API calls.
 */
export class Semaphore {
  private free: number;
  private waiters: (() => void)[] = [];

  constructor(max: number) {
    this.free = max;
  }

  async run<T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    await this.acquire(signal);
    try {
      return await fn();
    } finally {
      this.release();
    }
  }

  private async acquire(signal: AbortSignal | undefined): Promise<void> {
    if (signal?.aborted) throw abortError(signal);
    if (this.free > 0) {
      this.free--;
      return;
    }
    await new Promise<void>((resolve, reject) => {
      const grant = () => {
        signal?.removeEventListener("abort", onAbort);
        resolve();
      };
      const onAbort = () => {
        this.waiters = this.waiters.filter((w) => w !== grant);
        reject(abortError(signal!));
      };
      this.waiters.push(grant);
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  private release(): void {
    const next = this.waiters.shift();
    if (next) next();
    else this.free++;
  }
}
