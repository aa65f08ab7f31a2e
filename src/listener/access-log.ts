import type { Logger } from "../util/logger.js";

export interface AccessEntry {
  method: string;
  path: string;
  status: number;
  reason: string;
  remote: string | undefined;
}

/**
 * One log line per refused request (401 and every other 4xx) with the reason, at most `perSecond`
 * lines a second on average with bursts of `burst`: a flood of bad requests cannot flood the log.
 * Lines dropped meanwhile are counted in the next line's `suppressed`. Only the method, the path
 * (no query string), the status, the reason and the peer address are logged: never a header, so
 * never the token.
 */
export class AccessLog {
  private tokens: number;
  private last: number;
  private suppressed = 0;

  constructor(
    private readonly log: Logger,
    private readonly perSecond = 10,
    private readonly burst = 50,
    private readonly now: () => number = Date.now,
  ) {
    this.tokens = burst;
    this.last = now();
  }

  refused(e: AccessEntry): void {
    const t = this.now();
    this.tokens = Math.min(this.burst, this.tokens + ((t - this.last) / 1000) * this.perSecond);
    this.last = t;
    if (this.tokens < 1) {
      this.suppressed++;
      return;
    }
    this.tokens -= 1;
    const line = { access: e, ...(this.suppressed > 0 ? { suppressed: this.suppressed } : {}) };
    this.suppressed = 0;
    if (e.status === 401 || e.status === 403) this.log.warn(line, "request refused");
    else this.log.info(line, "request refused");
  }
}
