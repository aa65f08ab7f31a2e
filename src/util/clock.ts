/** Time source; tests inject their own so nothing waits on the wall clock. */
export interface Clock {
  now(): number;
  /** Resolves after `ms`, or rejects with an AbortError when `signal` aborts. */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

/** setTimeout's limit (2^31 - 1 ms, ~24.8 days); a longer delay would fire at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export const systemClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) =>
    new Promise<void>((resolve, reject) => {
      if (signal?.aborted) return reject(abortError(signal));
      const end = Date.now() + Math.max(0, ms);
      let t: NodeJS.Timeout;
      // Long waits (a grant valid for months) go in steps below the timer limit.
      const arm = () => {
        const left = end - Date.now();
        t = setTimeout(left > MAX_TIMER_MS ? arm : done, Math.min(Math.max(0, left), MAX_TIMER_MS));
      };
      const done = () => {
        signal?.removeEventListener("abort", onAbort);
        resolve();
      };
      const onAbort = () => {
        clearTimeout(t);
        reject(abortError(signal!));
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      arm();
    }),
};

export function abortError(signal: AbortSignal): Error {
  const r: unknown = signal.reason;
  if (r instanceof Error) return r;
  const e = new Error(typeof r === "string" ? r : "aborted");
  e.name = "AbortError";
  return e;
}

export function isAbort(e: unknown, signal?: AbortSignal): boolean {
  return (signal?.aborted ?? false) || (e instanceof Error && e.name === "AbortError");
}

/** Capped exponential backoff with full jitter (AWS architecture blog), in ms. */
export function backoffMs(attempt: number, baseMs: number, capMs: number, random: () => number = Math.random): number {
  const exp = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * exp);
}

/** ms -> ISO timestamp, formatted once per distinct millisecond (for paths that stamp every write). */
export function isoFormatter(): (ms: number) => string {
  let lastMs = Number.NaN;
  let lastIso = "";
  return (ms) => {
    if (ms !== lastMs) {
      lastMs = ms;
      lastIso = new Date(ms).toISOString();
    }
    return lastIso;
  };
}
