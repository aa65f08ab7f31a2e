import type { Clock } from "../util/clock.js";

/** One grant waiting for a provisioning slot: a few fields and its value, no task, no signal. */
interface Entry<T> {
  readonly id: string;
  readonly key: string;
  readonly deadlineMs: number;
  readonly queuedAt: number;
  readonly value: T;
  /** Index in the deadline heap; -1 once it left the queue. */
  heapAt: number;
}

interface Lane<T> {
  running: number;
  /** FIFO; entries that left it early (cancel, expiry) are skipped when reached. */
  waiting: (Entry<T> | null)[];
  head: number;
}

export interface QueueOptions<T> {
  /** Provisioning calls at most in flight per key (backend and region). */
  limit: number;
  clock: Clock;
  /** A grant got its slot: the caller starts it, and calls release(key) when its call is done. */
  start(value: T, key: string): void;
  /** A waiting grant reached its deadline: it has left the queue and must be ended by the caller. */
  onExpired(value: T): void;
  /** A grant got its slot after waiting `waitedMs`. */
  onStarted?(key: string, waitedMs: number): void;
}

/**
 * Bounded provisioning (issue #15): at most `limit` provision calls in flight per backend and
 * region, in arrival order. A grant waiting here holds its record and this entry, not a live task
 * with signals and async frames, so a burst of thousands of accepted grants costs little memory
 * and never fires thousands of concurrent create calls. Waiting grants still obey valid_to (one
 * timer for the earliest deadline, kept in a heap) and cancel (take()).
 */
export class ProvisionQueue<T> {
  private readonly lanes = new Map<string, Lane<T>>();
  private readonly byId = new Map<string, Entry<T>>();
  private readonly heap: Entry<T>[] = [];
  private timer: AbortController | null = null;
  private timerAt = Infinity;
  private closed = false;

  constructor(private readonly o: QueueOptions<T>) {}

  get waiting(): number {
    return this.byId.size;
  }

  /**
   * Start the grant now if its key has a free slot, else once one frees up, or hand it to
   * onExpired at `deadlineMs` (Infinity: never), or never once take() removed it.
   */
  enqueue(id: string, key: string, deadlineMs: number, value: T): void {
    const lane = this.lane(key);
    if (lane.running < this.o.limit && lane.head === lane.waiting.length) {
      lane.running++;
      this.o.onStarted?.(key, 0);
      this.o.start(value, key);
      return;
    }
    const e: Entry<T> = { id, key, deadlineMs, queuedAt: this.o.clock.now(), value, heapAt: -1 };
    lane.waiting.push(e);
    this.byId.set(id, e);
    if (deadlineMs !== Infinity) {
      this.heapPush(e);
      this.arm();
    }
  }

  /** A slot-holding call finished: the next waiting grant of the key starts. */
  release(key: string): void {
    const lane = this.lanes.get(key);
    if (!lane) return;
    lane.running = Math.max(0, lane.running - 1);
    this.pump(key, lane);
  }

  /** Remove a waiting grant (cancelled): its value, or undefined if it is not waiting. */
  take(id: string): T | undefined {
    const e = this.byId.get(id);
    if (!e) return undefined;
    this.drop(e);
    return e.value;
  }

  /** The ids of every waiting grant. */
  ids(): string[] {
    return [...this.byId.keys()];
  }

  /** Where a waiting grant stands: for the grant record. O(queue length). */
  info(id: string): { queued_at: string; position: number } | null {
    const e = this.byId.get(id);
    if (!e) return null;
    const lane = this.lanes.get(e.key)!;
    let position = 1;
    for (let i = lane.head; i < lane.waiting.length; i++) {
      const w = lane.waiting[i];
      if (w === e) break;
      if (w) position++;
    }
    return { queued_at: new Date(e.queuedAt).toISOString(), position };
  }

  /** Per key: calls in flight and grants waiting (metrics). */
  stats(): { key: string; running: number; waiting: number; oldestWaitMs: number }[] {
    const now = this.o.clock.now();
    const out: { key: string; running: number; waiting: number; oldestWaitMs: number }[] = [];
    for (const [key, lane] of this.lanes) {
      let waiting = 0;
      let oldest: Entry<T> | null = null;
      for (let i = lane.head; i < lane.waiting.length; i++) {
        const w = lane.waiting[i];
        if (!w) continue;
        waiting++;
        oldest ??= w;
      }
      out.push({ key, running: lane.running, waiting, oldestWaitMs: oldest ? now - oldest.queuedAt : 0 });
    }
    return out;
  }

  close(): void {
    this.closed = true;
    this.timer?.abort();
    this.timer = null;
  }

  // ---- internals ------------------------------------------------------------------------------

  private lane(key: string): Lane<T> {
    let l = this.lanes.get(key);
    if (!l) this.lanes.set(key, (l = { running: 0, waiting: [], head: 0 }));
    return l;
  }

  private pump(key: string, lane: Lane<T>): void {
    while (lane.running < this.o.limit && lane.head < lane.waiting.length) {
      const e = lane.waiting[lane.head];
      lane.waiting[lane.head++] = null;
      if (!e) continue;
      this.byId.delete(e.id);
      this.heapRemove(e);
      lane.running++;
      this.o.onStarted?.(key, this.o.clock.now() - e.queuedAt);
      this.o.start(e.value, key);
    }
    if (lane.head === lane.waiting.length) {
      lane.waiting.length = 0;
      lane.head = 0;
      if (lane.running === 0) this.lanes.delete(key);
    } else if (lane.head > 1024 && lane.head * 2 > lane.waiting.length) {
      lane.waiting = lane.waiting.slice(lane.head);
      lane.head = 0;
    }
  }

  private drop(e: Entry<T>): void {
    this.byId.delete(e.id);
    this.heapRemove(e);
    const lane = this.lanes.get(e.key);
    if (!lane) return;
    const i = lane.waiting.indexOf(e, lane.head);
    if (i >= 0) lane.waiting[i] = null;
    this.pump(e.key, lane);
  }

  /** One timer, for the earliest deadline of any waiting grant. */
  private arm(): void {
    if (this.closed) return;
    const next = this.heap[0];
    if (!next) {
      this.timer?.abort();
      this.timer = null;
      this.timerAt = Infinity;
      return;
    }
    if (this.timer && this.timerAt <= next.deadlineMs) return;
    this.timer?.abort();
    const ctl = new AbortController();
    this.timer = ctl;
    this.timerAt = next.deadlineMs;
    this.o.clock.sleep(Math.max(0, next.deadlineMs - this.o.clock.now()), ctl.signal).then(
      () => {
        if (this.timer !== ctl) return;
        this.timer = null;
        this.timerAt = Infinity;
        this.expire();
      },
      () => undefined,
    );
  }

  private expire(): void {
    const now = this.o.clock.now();
    const due: Entry<T>[] = [];
    while (this.heap[0] && this.heap[0].deadlineMs <= now) {
      const e = this.heap[0];
      this.heapRemove(e);
      due.push(e);
    }
    for (const e of due) {
      this.drop(e);
      this.o.onExpired(e.value);
    }
    this.arm();
  }

  // A binary min-heap on deadlineMs, each entry knowing its index so it can leave from anywhere.
  private heapPush(e: Entry<T>): void {
    e.heapAt = this.heap.length;
    this.heap.push(e);
    this.up(e.heapAt);
  }

  private heapRemove(e: Entry<T>): void {
    const i = e.heapAt;
    if (i < 0) return;
    e.heapAt = -1;
    const last = this.heap.pop()!;
    if (last === e) return;
    this.heap[i] = last;
    last.heapAt = i;
    this.down(i);
    this.up(last.heapAt);
  }

  private up(i: number): void {
    const h = this.heap;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (h[p]!.deadlineMs <= h[i]!.deadlineMs) break;
      this.swap(i, p);
      i = p;
    }
  }

  private down(i: number): void {
    const h = this.heap;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < h.length && h[l]!.deadlineMs < h[m]!.deadlineMs) m = l;
      if (r < h.length && h[r]!.deadlineMs < h[m]!.deadlineMs) m = r;
      if (m === i) return;
      this.swap(i, m);
      i = m;
    }
  }

  private swap(a: number, b: number): void {
    const h = this.heap;
    const x = h[a]!;
    const y = h[b]!;
    h[a] = y;
    h[b] = x;
    x.heapAt = b;
    y.heapAt = a;
  }
}
