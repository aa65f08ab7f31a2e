/**
 * Batched status polling for cloud instances, shared by the cloud backends.
 *
 * Polling one instance per call trips cloud rate limits at scale. Here every waiter registers
 * (scope, id, condition); one poller per scope (an EC2 region, a GCE zone, an Azure resource
 * group) calls ONE injected `describe(scope, ids)` per interval for every id watched in that
 * scope, and resolves each waiter whose condition holds. API calls per interval are therefore
 * O(scopes), not O(instances).
 *
 * - A poller starts with an immediate poll when its scope gains its first waiter, then polls
 *   every `intervalMs` (fixed rate, measured from the start of each poll), and stops once its
 *   scope has no waiters.
 * - An error from `describe` is counted and retried on the next tick; waiters keep waiting (the
 *   caller bounds the wait with its own deadline and can read `lastError(scope)` for its message).
 * - An id that `describe` does not return is "missing"; after `missingAfter` consecutive misses
 *   (eventual consistency right after a create can hide an instance for a poll or two) the
 *   waiter resolves with `{ kind: "missing" }`.
 * - Time comes from the injected Clock, so tests drive it without sleeping.
 *
 * `BatchLookup` (below) is the same idea for one-off questions asked by many grants at once
 * (e.g. "does an instance for this request exist?" after a restart): one call per scope per turn.
 */
import { abortError, type Clock } from "../../util/clock.js";

export interface PollEvent {
  scope: string;
  /** Distinct ids described in this poll. */
  ids: number;
  ok: boolean;
  error?: unknown;
  /** Consecutive failed polls in this scope (0 after a success). */
  consecutiveErrors: number;
  /** Waiters resolved by this poll. */
  resolved: number;
  durationMs: number;
}

export interface BatchWatcherOptions<S> {
  /**
   * Current status of each id found, in one logical call for the whole scope (paging inside it
   * is the implementation's business). Ids absent from the map count as missing.
   */
  describe(scope: string, ids: readonly string[], signal: AbortSignal): Promise<ReadonlyMap<string, S>>;
  intervalMs: number;
  clock: Clock;
  /** Consecutive polls an id may be absent before its waiters resolve as missing. Default 3. */
  missingAfter?: number;
  /** Called after every poll (metrics, logs, tests). Must not throw. */
  onPoll?(e: PollEvent): void;
}

export interface WaitOptions<S> {
  /** Resolve once this holds for the id's status. */
  until(status: S): boolean;
  signal?: AbortSignal;
  /** Overrides the watcher's missingAfter for this waiter. */
  missingAfter?: number;
}

export type WaitResult<S> = { kind: "match"; status: S } | { kind: "missing"; last: S | undefined };

export interface BatchWatcherStats {
  /** Scopes with a running poller. */
  scopes: number;
  waiters: number;
  polls: number;
  errors: number;
}

interface Waiter<S> {
  id: string;
  until: (s: S) => boolean;
  missingAfter: number;
  misses: number;
  resolve: (r: WaitResult<S>) => void;
  reject: (e: unknown) => void;
  cleanup: () => void;
}

interface Scope<S> {
  name: string;
  waiters: Set<Waiter<S>>;
  /** Aborted to cut the poller's current sleep short (scope emptied, or closing). */
  wake: AbortController;
  /** Aborted when the watcher closes: stops the poller and any describe in flight. */
  stop: AbortController;
  consecutiveErrors: number;
  lastError: unknown;
}

export class WatcherClosedError extends Error {
  override name = "AbortError";
  constructor() {
    super("the batch watcher was closed");
  }
}

export class BatchWatcher<S> {
  private readonly scopes = new Map<string, Scope<S>>();
  private readonly last = new Map<string, S>();
  private readonly missingAfter: number;
  private closed = false;
  private polls = 0;
  private errors = 0;

  constructor(private readonly o: BatchWatcherOptions<S>) {
    if (!(o.intervalMs > 0)) throw new RangeError("intervalMs must be > 0");
    this.missingAfter = o.missingAfter ?? 3;
  }

  /** Wait until `opts.until(status)` holds for `id` in `scope`, or the id goes missing. */
  waitFor(scope: string, id: string, opts: WaitOptions<S>): Promise<WaitResult<S>> {
    if (this.closed) return Promise.reject(new WatcherClosedError());
    if (opts.signal?.aborted) return Promise.reject(abortError(opts.signal));
    return new Promise<WaitResult<S>>((resolve, reject) => {
      const s = this.scope(scope);
      const onAbort = () => {
        this.remove(s, w);
        reject(abortError(opts.signal!));
      };
      const w: Waiter<S> = {
        id,
        until: opts.until,
        missingAfter: opts.missingAfter ?? this.missingAfter,
        misses: 0,
        resolve,
        reject,
        cleanup: () => opts.signal?.removeEventListener("abort", onAbort),
      };
      opts.signal?.addEventListener("abort", onAbort, { once: true });
      s.waiters.add(w);
    });
  }

  /** The status last seen for an id (any waiter's poll), if any. */
  lastStatus(scope: string, id: string): S | undefined {
    return this.last.get(`${scope}\u0000${id}`);
  }

  /** The error of the scope's most recent failed poll while failures persist, else undefined. */
  lastError(scope: string): unknown {
    const s = this.scopes.get(scope);
    return s && s.consecutiveErrors > 0 ? s.lastError : undefined;
  }

  /** Scopes whose describe is currently failing (consecutive errors > 0), sorted. */
  failingScopes(): string[] {
    return [...this.scopes.values()].filter((s) => s.consecutiveErrors > 0).map((s) => s.name).sort();
  }

  stats(): BatchWatcherStats {
    let waiters = 0;
    for (const s of this.scopes.values()) waiters += s.waiters.size;
    return { scopes: this.scopes.size, waiters, polls: this.polls, errors: this.errors };
  }

  /** Stop every poller; pending waiters reject with an AbortError. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const s of this.scopes.values()) {
      s.stop.abort(new WatcherClosedError());
      s.wake.abort();
      for (const w of s.waiters) {
        w.cleanup();
        w.reject(new WatcherClosedError());
      }
      s.waiters.clear();
    }
    this.scopes.clear();
  }

  // ---- internals ------------------------------------------------------------------------------

  private scope(name: string): Scope<S> {
    let s = this.scopes.get(name);
    if (!s) {
      s = { name, waiters: new Set(), wake: new AbortController(), stop: new AbortController(), consecutiveErrors: 0, lastError: undefined };
      this.scopes.set(name, s);
      void this.run(s).catch(() => undefined);
    }
    return s;
  }

  private remove(s: Scope<S>, w: Waiter<S>): void {
    w.cleanup();
    s.waiters.delete(w);
    // Let an idle poller notice at once instead of at the end of its sleep.
    if (s.waiters.size === 0) s.wake.abort();
  }

  private async run(s: Scope<S>): Promise<void> {
    // The first poll waits for the current macrotask turn to end, so waiters registered together
    // (e.g. every grant resumed after a restart) share it.
    await new Promise<void>((r) => setImmediate(r));
    try {
      while (!s.stop.signal.aborted && s.waiters.size > 0) {
        const startedAt = this.o.clock.now();
        await this.pollOnce(s, startedAt);
        if (s.stop.signal.aborted || s.waiters.size === 0) break;
        const wait = startedAt + this.o.intervalMs - this.o.clock.now();
        if (wait <= 0) continue;
        s.wake = new AbortController();
        try {
          await this.o.clock.sleep(wait, s.wake.signal);
        } catch {
          /* woken early (scope emptied, or closing): re-check */
        }
      }
    } finally {
      // Synchronous with the last emptiness check: no waiter can slip in between.
      if (this.scopes.get(s.name) === s) this.scopes.delete(s.name);
    }
  }

  private async pollOnce(s: Scope<S>, startedAt: number): Promise<void> {
    const ids = [...new Set([...s.waiters].map((w) => w.id))];
    let found: ReadonlyMap<string, S>;
    try {
      found = await this.o.describe(s.name, ids, s.stop.signal);
    } catch (e) {
      if (s.stop.signal.aborted) return;
      this.polls++;
      this.errors++;
      s.consecutiveErrors++;
      s.lastError = e;
      this.emit({ scope: s.name, ids: ids.length, ok: false, error: e, consecutiveErrors: s.consecutiveErrors, resolved: 0, durationMs: this.o.clock.now() - startedAt });
      return;
    }
    this.polls++;
    s.consecutiveErrors = 0;
    s.lastError = undefined;
    let resolved = 0;
    for (const id of ids) {
      const st = found.get(id);
      if (st !== undefined) this.last.set(`${s.name}\u0000${id}`, st);
    }
    for (const w of [...s.waiters]) {
      const st = found.get(w.id);
      if (st === undefined) {
        // Only ids that were part of this poll can be missing from it.
        if (!ids.includes(w.id)) continue;
        if (++w.misses < w.missingAfter) continue;
        s.waiters.delete(w);
        w.cleanup();
        resolved++;
        w.resolve({ kind: "missing", last: this.last.get(`${s.name}\u0000${w.id}`) });
        continue;
      }
      w.misses = 0;
      let match = false;
      try {
        match = w.until(st);
      } catch (e) {
        s.waiters.delete(w);
        w.cleanup();
        w.reject(e);
        continue;
      }
      if (!match) continue;
      s.waiters.delete(w);
      w.cleanup();
      resolved++;
      w.resolve({ kind: "match", status: st });
    }
    // Forget statuses nobody waits for any more (bounded memory over a long run).
    const still = new Set([...s.waiters].map((w) => w.id));
    for (const id of ids) if (!still.has(id)) this.last.delete(`${s.name}\u0000${id}`);
    this.emit({ scope: s.name, ids: ids.length, ok: true, consecutiveErrors: 0, resolved, durationMs: this.o.clock.now() - startedAt });
  }

  private emit(e: PollEvent): void {
    try {
      this.o.onPoll?.(e);
    } catch {
      /* observers must not break polling */
    }
  }
}

/**
 * Coalesces point lookups into batched calls: every `get(scope, key)` made in the same macrotask
 * turn for one scope becomes part of ONE `lookup(scope, keys)` call (at most `maxBatch` keys per
 * call). Used where many grants ask the same question at once, e.g. "does an instance for this
 * request already exist?" from every grant resumed after a restart: one call per region instead
 * of one per grant, so a restart cannot trip the cloud's rate limits by itself.
 */
export class BatchLookup<V> {
  private readonly pending = new Map<string, Map<string, { resolve: (v: V[]) => void; reject: (e: unknown) => void }[]>>();
  private calls = 0;

  constructor(
    private readonly lookup: (scope: string, keys: readonly string[]) => Promise<ReadonlyMap<string, V[]>>,
    private readonly maxBatch = 200,
  ) {
    if (!(maxBatch >= 1)) throw new RangeError("maxBatch must be >= 1");
  }

  /** The values found for `key` (empty when none). `signal` abandons this caller only. */
  get(scope: string, key: string, signal?: AbortSignal): Promise<V[]> {
    if (signal?.aborted) return Promise.reject(abortError(signal));
    return new Promise<V[]>((resolve, reject) => {
      let byKey = this.pending.get(scope);
      if (!byKey) {
        byKey = new Map();
        this.pending.set(scope, byKey);
        setImmediate(() => this.flush(scope));
      }
      const onAbort = () => reject(abortError(signal!));
      signal?.addEventListener("abort", onAbort, { once: true });
      const list = byKey.get(key) ?? [];
      list.push({
        resolve: (v) => {
          signal?.removeEventListener("abort", onAbort);
          resolve(v);
        },
        reject: (e) => {
          signal?.removeEventListener("abort", onAbort);
          reject(e);
        },
      });
      byKey.set(key, list);
    });
  }

  /** Batched calls made so far. */
  get callCount(): number {
    return this.calls;
  }

  private flush(scope: string): void {
    const byKey = this.pending.get(scope);
    this.pending.delete(scope);
    if (!byKey) return;
    const keys = [...byKey.keys()];
    for (let i = 0; i < keys.length; i += this.maxBatch) {
      const chunk = keys.slice(i, i + this.maxBatch);
      this.calls++;
      this.lookup(scope, chunk).then(
        (found) => {
          for (const k of chunk) for (const w of byKey.get(k)!) w.resolve([...(found.get(k) ?? [])]);
        },
        (e: unknown) => {
          for (const k of chunk) for (const w of byKey.get(k)!) w.reject(e);
        },
      );
    }
  }
}
