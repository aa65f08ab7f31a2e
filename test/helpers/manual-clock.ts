import { abortError, type Clock } from "../../src/util/clock.js";

/** A Clock that moves only when a test calls advance(): sleeps resolve in due order, none early. */
export class ManualClock implements Clock {
  private timers: { at: number; resolve: () => void }[] = [];
  constructor(public t = Date.now()) {}
  now(): number {
    return this.t;
  }
  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      if (signal?.aborted) return reject(abortError(signal));
      const timer = { at: this.t + Math.max(0, ms), resolve: () => resolve() };
      this.timers.push(timer);
      signal?.addEventListener(
        "abort",
        () => {
          this.timers = this.timers.filter((x) => x !== timer);
          reject(abortError(signal));
        },
        { once: true },
      );
    });
  }
  advance(ms: number): void {
    this.t += ms;
    const due = this.timers.filter((x) => x.at <= this.t).sort((a, b) => a.at - b.at);
    this.timers = this.timers.filter((x) => x.at > this.t);
    for (const x of due) x.resolve();
  }
  /** Sleeps not yet due. */
  get pending(): number {
    return this.timers.length;
  }
}
