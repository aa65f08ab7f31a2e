import {
  errorKind,
  isFailoverable,
  NotFoundError,
  TransientError,
  type ManagedBackend,
} from "../backends/backend.js";
import { grantRequestDigest, type Almanac, type ComputeGrant, type Decline, type Envelope, type ExitObservation, type GrantRequest, type ProvisionedInstance } from "../domain/index.js";
import { windowOf } from "../fleet/budget.js";
import { costOf } from "../fleet/pricing.js";
import { NoBackendError, reservationOf, type Fleet, type Route } from "../fleet/fleet.js";
import type { Reservation } from "../fleet/reservations.js";
import { isStorageFull, isStoreUnavailable } from "../store/errors.js";
import { LeaseLostError, type AcceptResult, type Attempt, type GrantChanges, type GrantRecord, type Outcome, type Store } from "../store/store.js";
import { backoffMs, isAbort, type Clock } from "../util/clock.js";
import type { Identity } from "../util/identity.js";
import type { Logger } from "../util/logger.js";
import { generateEd25519 } from "../util/ssh-key.js";
import { buildComputeLog } from "./compute-log.js";
import { ProvisionQueue } from "./provision-queue.js";

export interface ManagerOptions {
  store: Store;
  fleet: Fleet;
  almanac: Almanac;
  identity: Identity;
  log: Logger;
  clock: Clock;
  providerId: string;
  /** Backends a grant may try after capacity errors (fleet.max_attempts). */
  maxAttempts: number;
  /** After valid_to, how long a backend's watch gets to report before the bridge terminates anyway. */
  expiryGraceMs?: number;
  /** Retry pacing for terminate and transient provision errors. */
  retryBaseMs?: number;
  retryCapMs?: number;
  /** Provision calls at most in flight per backend and region (fleet.provision_concurrency). */
  provisionConcurrency?: number;
  /** Enqueue ComputeLogs for the market publisher. */
  publishLogs?: boolean;
  onLogWritten?: () => void;
  events?: ManagerEvents;
  /** Image URL policy (util/image-policy.ts): a refused envelope.image.url is a ValidationError. */
  imagePolicy?: { refusal(url: string): Promise<string | null> };
}

/** Hooks for metrics; all optional. */
export interface ManagerEvents {
  transition?(backend: string | null, from: string, to: string): void;
  decline?(declines: Decline[]): void;
  provisioned?(backend: string, seconds: number): void;
  /** From accept to running (the instance reachable). */
  ready?(backend: string, seconds: number): void;
  failover?(from: string, kind: string): void;
  /** A grant got its provisioning slot after waiting in its backend's queue. */
  dequeued?(backend: string, seconds: number): void;
  /** This replica took over a grant another replica's lease held (issue #19). */
  takeover?(from: string): void;
  /** This replica lost the lease of a grant it drove: another replica took it over, or it lapsed. */
  leaseLost?(): void;
}

export class ValidationError extends Error {
  override name = "ValidationError";
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(`${field}: ${message}`);
  }
}

export type SubmitResult =
  | { status: "created" | "duplicate"; record: GrantRecord }
  | { status: "conflict"; record: GrantRecord }
  | { status: "declined"; declines: Decline[] };

class Shutdown extends Error {
  override name = "AbortError";
  constructor() {
    super("bridge shutting down");
  }
}

/**
 * One grant's task. A bridge holds one for every grant in flight, most of them waiting on a
 * backend for minutes, so it stays small: the promise a watch races against cancellation is made
 * only when a watch asks for it.
 */
class Task {
  readonly shutdown = new AbortController();
  done: Promise<void> = Promise.resolve();
  /** The provisioning slot (queue key) this task holds, released once its provision call ends. */
  slot: string | null = null;
  cancelRequested = false;
  /** What a cancel interrupts: the provisioning wait, or the watch. */
  onCancel: (() => void) | null = null;

  cancel(): void {
    this.cancelRequested = true;
    this.onCancel?.();
  }

  /** Resolves once cancellation is requested (at once if it already was). */
  cancelled(): Promise<void> {
    return this.cancelRequested ? Promise.resolve() : new Promise((r) => (this.onCancel = r));
  }
}

const TRANSIENT_PROVISION_RETRIES = 3;
const TERMINAL: readonly string[] = ["completed", "failed", "expired", "cancelled"];

/** Why a provisioning wait was cut short: the grant ends with this outcome. */
class Interrupted extends Error {
  override name = "AbortError";
  constructor(readonly state: "cancelled" | "expired") {
    super(state === "cancelled" ? "cancel requested" : "valid_to passed");
  }
}

/**
 * A grant waiting for a provisioning slot: only its request_id (the record is read back from the
 * store when its turn comes, so thousands waiting cost a few hundred bytes each), or a live task
 * woken by a failover.
 */
type Waiter = string | { wake: () => void };

/**
 * Drives each grant through provisioning -> running -> terminating -> terminal (domain TRANSITIONS),
 * writing every transition before the side effect it announces, so that after a crash
 * resumeAll() can continue each grant from its last committed state. Backends are idempotent
 * per request_id, so "continue" is always "call the same method again".
 */
export class GrantManager {
  private readonly tasks = new Map<string, Task>();
  private readonly queue: ProvisionQueue<Waiter>;
  private stopping = false;
  /** resumeAll() ran: from then on an open grant without a task here is driven by no one. */
  private resumed = false;
  private readonly graceMs: number;
  private readonly baseMs: number;
  private readonly capMs: number;

  /** Use GrantManager.open(), which restores the ledgers from the store. */
  private constructor(private readonly o: ManagerOptions) {
    this.graceMs = o.expiryGraceMs ?? 5000;
    this.baseMs = o.retryBaseMs ?? 1000;
    this.capMs = o.retryCapMs ?? 60_000;
    this.queue = new ProvisionQueue<Waiter>({
      limit: o.provisionConcurrency ?? DEFAULT_PROVISION_CONCURRENCY,
      clock: o.clock,
      start: (w, key) => (typeof w === "string" ? this.launchStored(w, key) : w.wake()),
      // Past valid_to while waiting: its task starts outside the limit and ends it as expired.
      onExpired: (w) => (typeof w === "string" ? this.launchStored(w, null) : w.wake()),
      onStarted: (key, ms) => {
        if (ms > 0) this.o.events?.dequeued?.(key.slice(0, key.indexOf("|")), ms / 1000);
      },
    });
  }

  /**
   * A manager whose ledgers hold what the store promised before a restart: open it before the
   * listener can accept anything (the daemon does).
   */
  static async open(o: ManagerOptions): Promise<GrantManager> {
    const m = new GrantManager(o);
    await m.restoreLedgers();
    return m;
  }

  private async restoreLedgers(): Promise<void> {
    const o = this.o;
    // With other replicas, later changes to the ledgers arrive with each admission (applyLedger).
    await o.store.ledgerStart();
    // Capacity promised before a restart is still promised: the ledger is rebuilt from the open
    // grants before the listener can accept anything.
    for (const rec of await o.store.nonTerminal()) if (rec.backend) o.fleet.reservations.reserve(reservationOf(rec.grant, rec.backend, rec.placement));
    // Spend caps: every grant accepted this month is charged again, an open one its worst case
    // from its accept, an ended one what it cost.
    if (o.fleet.spend?.budgets.active) {
      const monthStart = `${windowOf("month", o.clock.now())}-01T00:00:00.000Z`;
      for (const rec of await o.store.acceptedSince(monthStart)) this.charge(rec);
    }
  }

  /** Charge a stored grant to the spend caps (restore, adopt). */
  private charge(rec: GrantRecord): void {
    const spend = this.o.fleet.spend;
    if (!spend?.budgets.active || !rec.backend) return;
    const at = Date.parse(rec.created_at);
    const open = !TERMINAL.includes(rec.state);
    const amount = open ? spend.worstCase(rec.backend, rec.grant, rec.price_per_hour, at) : (rec.cost ?? 0);
    spend.budgets.charge({ request_id: rec.request_id, backend: rec.backend, amount, at_ms: at, settled: !open });
  }

  /**
   * Other replicas' admissions, moves and ends (and this one's, again: applying is idempotent),
   * reported by the store under its admission lock: the ledgers then count every replica's grants,
   * so that replicas together never over-admit.
   */
  private applyLedger(changes: GrantRecord[]): void {
    const fleet = this.o.fleet;
    for (const rec of changes) {
      if (TERMINAL.includes(rec.state)) fleet.reservations.release(rec.request_id);
      else if (rec.backend) fleet.reservations.reserve(reservationOf(rec.grant, rec.backend, rec.placement));
      this.charge(rec);
    }
  }

  /**
   * A re-post answered as a duplicate of an open grant nothing here drives: its accept committed
   * although the answer to it failed (PostgreSQL: a connection lost during the commit; the first
   * post got 503). Once open grants have resumed, it is driven from its record here, with its
   * reservation and charge as a restart would rebuild them.
   */
  private adoptIfUndriven(rec: GrantRecord): void {
    // With leases, its lease lapses (it was never renewed) and a replica's next claim takes it.
    if (this.o.store.shared) return;
    if (!this.resumed || this.stopping || TERMINAL.includes(rec.state) || !rec.backend) return;
    if (this.tasks.has(rec.request_id) || this.queue.info(rec.request_id) || this.o.fleet.reservations.get(rec.request_id)) return;
    this.o.fleet.reservations.reserve(reservationOf(rec.grant, rec.backend, rec.placement));
    this.charge(rec);
    this.o.log.warn({ request_id: rec.request_id, backend: rec.backend, state: rec.state }, "a re-posted grant was accepted earlier without being driven (its accept's answer failed); driving it now");
    this.start(rec);
  }

  /** Grants the bridge is responsible for right now: driven by a task or waiting for a slot. */
  get activeCount(): number {
    return this.tasks.size + this.queue.waiting;
  }

  /** Per backend and region: provision calls in flight and grants waiting (metrics). */
  queueStats(): { backend: string; region: string; running: number; waiting: number; oldestWaitMs: number }[] {
    return this.queue.stats().map(({ key, ...s }) => {
      const i = key.indexOf("|");
      return { backend: key.slice(0, i), region: key.slice(i + 1), ...s };
    });
  }

  /**
   * What a grant has cost: its ComputeLog's figure once ended, else its price times the billed
   * time it has run so far; null without a price.
   */
  cost(rec: GrantRecord): { amount: number; currency: string; final: boolean } | null {
    const spend = this.o.fleet.spend;
    if (!spend || rec.price_per_hour === null) return null;
    if (rec.cost !== null) return { amount: rec.cost, currency: spend.currency, final: true };
    const started = rec.instance ? Date.parse(rec.instance.started_at) : null;
    const seconds = started === null ? 0 : (this.o.clock.now() - started) / 1000;
    return { amount: costOf(rec.price_per_hour, seconds, spend.prices.rule(rec.backend ?? "")), currency: spend.currency, final: false };
  }

  /** Where a grant waits for a provisioning slot, if it does (for its record). */
  queued(id: string): { queued_at: string; position: number } | null {
    return this.queue.info(id);
  }

  /** Validate, route and durably accept a grant; provisioning continues in the background. */
  async submit(req: GrantRequest): Promise<SubmitResult> {
    const { grant, envelope } = req;
    const refused = await this.o.imagePolicy?.refusal(envelope.image.url);
    if (refused) throw new ValidationError("envelope.image.url", refused);
    // A re-post is answered from the store whatever has changed since (valid_to passed, capacity
    // taken): it is looked up whenever the new grant would be refused, and otherwise inside the
    // accept commit itself (where the writer digests the body), so the common path reads the
    // database once, in the writer.
    const known = async (): Promise<SubmitResult | null> => {
      const existing = await this.o.store.get(grant.request_id);
      return existing ? { status: existing.body_digest === grantRequestDigest(req) ? "duplicate" : "conflict", record: existing } : null;
    };
    if (this.o.almanac.toWallMs(grant.valid_to) <= this.o.clock.now()) {
      const k = await known();
      if (k) return k;
      throw new ValidationError("grant.valid_to", `tick ${grant.valid_to} (${this.o.almanac.toDate(grant.valid_to).toISOString()}) is already in the past`);
    }
    // A grant still open holds its reservation: answered from the store, never routed again.
    const held = this.o.fleet.reservations.get(grant.request_id);
    if (held) return this.answerHeld(req, held, known);
    // Routed and its capacity reserved in this same turn of the event loop; the reservation is
    // made durable by the accept commit (the grant row names its backend and placement). With
    // other replicas the decision is made under the store's admission lock, after taking in
    // their admissions and ends since this replica's last one.
    let route = { ok: false, declines: [] } as Route;
    let r: AcceptResult | null;
    try {
      r = await this.o.store.admit((changes) => {
        this.applyLedger(changes);
        // Another replica accepted it since this one last looked: answered as a re-post below.
        if (this.o.fleet.reservations.get(grant.request_id)) return null;
        route = this.o.fleet.admit(grant, envelope);
        if (!route.ok) return null;
        let privateKey: string | null = null;
        let publicKey: string | null = null;
        if (!envelope.ssh_public_key) {
          const kp = generateEd25519(`compute-bridge-${grant.request_id}`);
          privateKey = kp.private;
          publicKey = kp.public.trim();
        }
        return { request_id: grant.request_id, grant, envelope, backend: route.backend.name, placement: route.placement, price_per_hour: route.price_per_hour, private_key: privateKey, public_key: publicKey };
      });
    } catch (e) {
      // Only what this admission reserved (not another replica's grant of this id the feed brought).
      if (route.ok) this.o.fleet.release(grant.request_id);
      throw e;
    }
    if (!r || !route.ok) {
      const other = this.o.fleet.reservations.get(grant.request_id);
      if (other) return this.answerHeld(req, other, known);
      const declines = route.ok ? [] : route.declines;
      const k = await known();
      if (k) return k;
      this.o.events?.decline?.(declines);
      this.o.log.info({ request_id: grant.request_id, region: grant.region, declines }, "grant declined");
      return { status: "declined", declines };
    }
    // A grant that had ended already (a re-post or a conflict) holds nothing.
    if (r.status !== "created") {
      this.o.fleet.release(grant.request_id);
      if (r.status === "duplicate") this.adoptIfUndriven(r.record);
    } else {
      this.o.events?.transition?.(route.backend.name, "none", "provisioning");
      this.o.log.info(
        { request_id: grant.request_id, backend: route.backend.name, state: "provisioning", region: grant.region, ...(route.price_per_hour !== null ? { price_per_hour: route.price_per_hour, worst_case: route.worst_case } : {}) },
        "grant accepted",
      );
      this.start(r.record);
    }
    return r;
  }

  /** A re-post of a grant that holds a reservation (it is open): answered from the store. */
  private async answerHeld(req: GrantRequest, held: Reservation, known: () => Promise<SubmitResult | null>): Promise<SubmitResult> {
    const k = await known();
    if (k) return k;
    // Its accept is being committed right now (a concurrent re-post): the writer answers this one
    // after it, as a duplicate or a conflict. Only if that accept failed is this one created.
    const { grant, envelope } = req;
    const r = await this.o.store.accept({ request_id: grant.request_id, grant, envelope, backend: held.backend, placement: held.placement, private_key: null, public_key: null });
    if (r.status === "created") {
      this.o.fleet.reservations.reserve(held);
      this.start(r.record);
    }
    return r;
  }

  /**
   * Continue every grant that was not terminal when the bridge last stopped. With other replicas:
   * the open grants no replica holds a lease on; from then on, leases are renewed and lapsed ones
   * taken over (leaseLoop).
   */
  async resumeAll(): Promise<number> {
    // The listener is up before this runs: grants accepted since the start already have a task.
    const n = await this.claimAndStart();
    this.resumed = true;
    if (this.o.store.shared && !this.stopping) this.leases = this.leaseLoop();
    return n;
  }

  /** Take the leases of open grants nobody drives (SQLite: every open grant) and start them. */
  private async claimAndStart(): Promise<number> {
    // Never a grant this replica still drives: a task dropped after losing its lease may still be
    // unwinding, and a new token under it would let its stale writes through (or leave the grant
    // leased here, renewed, with no task once it ends). The filter after the claim is for SQLite,
    // whose claim is every open grant, and for tasks started while the claim ran.
    const driven = this.drivenIds();
    const claimed = (await this.o.store.claim(CLAIM_BATCH, driven)).filter((c) => !this.tasks.has(c.record.request_id) && !this.queue.info(c.record.request_id));
    for (const { record: rec, previous } of claimed) {
      if (previous !== null && previous !== this.o.store.replicaId) {
        this.o.events?.takeover?.(previous);
        this.o.log.warn({ request_id: rec.request_id, backend: rec.backend, state: rec.state, from_replica: previous }, "taking over a grant whose replica's lease lapsed");
      } else this.o.log.info({ request_id: rec.request_id, backend: rec.backend, state: rec.state }, "resuming grant after restart");
      this.start(rec);
    }
    return claimed.length;
  }

  private leases: Promise<void> | null = null;
  private readonly leaseStop = new AbortController();

  /**
   * Several replicas: every third of the lease TTL, renew the leases held (dropping the grants
   * another replica took, cancelling those whose cancel was recorded elsewhere), then take over
   * lapsed ones. A replica that cannot renew for a whole TTL drops everything it drives: other
   * replicas may hold those grants by now.
   */
  private async leaseLoop(): Promise<void> {
    const store = this.o.store;
    const every = Math.max(100, Math.floor(store.leaseTtlMs / 3));
    let renewedAt = this.o.clock.now();
    for (;;) {
      try {
        await this.o.clock.sleep(every, this.leaseStop.signal);
      } catch {
        return;
      }
      try {
        const r = await store.renew();
        renewedAt = this.o.clock.now();
        for (const id of r.lost) this.drop(id, "another replica took its lease over");
        for (const id of r.cancelled) this.cancelLocal(id);
      } catch (e) {
        const silent = this.o.clock.now() - renewedAt;
        this.o.log.warn({ err: { message: messageOf(e) }, since_ms: silent }, "could not renew this replica's leases");
        if (silent >= store.leaseTtlMs) for (const id of this.drivenIds()) this.drop(id, "its lease could not be renewed for a whole TTL");
        continue;
      }
      try {
        await this.claimAndStart();
      } catch (e) {
        this.o.log.warn({ err: { message: messageOf(e) } }, "could not take over lapsed leases; trying again at the next renewal");
      }
    }
  }

  /** Every grant this replica drives: a task, or a place in a provisioning queue. */
  private drivenIds(): string[] {
    return [...this.tasks.keys(), ...this.queue.ids()];
  }

  /** Stop driving a grant whose lease this replica lost, without writing or acting on it. */
  private drop(id: string, why: string): void {
    const task = this.tasks.get(id);
    // A live task waiting for a slot (a failover) leaves the queue through its own abort.
    const queued = task ? undefined : this.queue.take(id);
    if (!task && !queued) return;
    this.o.store.forget(id);
    task?.shutdown.abort(new LeaseLostError(id));
    this.o.events?.leaseLost?.();
    this.o.log.warn({ request_id: id, reason: why }, "lease lost: this replica stops driving the grant");
  }

  /** A cancel recorded through another replica: acted on here, where the grant is driven. */
  private cancelLocal(id: string): void {
    const task = this.tasks.get(id);
    if (task && !task.cancelRequested) {
      this.o.log.info({ request_id: id }, "cancel requested (recorded by another replica)");
      task.cancel();
    }
    // Still waiting for a slot: it starts now, outside the limit, only to end as cancelled.
    if (!task && this.queue.take(id)) this.launchStored(id, null);
  }

  /**
   * A grant dropped for its lease is still open, driven by another replica: it stays in this
   * replica's ledgers (this task may have settled it just before its final write was fenced), as
   * the database has it, until the change feed reports its end.
   */
  private async keepCounted(id: string, last: GrantRecord): Promise<void> {
    const rec = (await this.o.store.get(id).catch(() => null)) ?? last;
    if (TERMINAL.includes(rec.state) || !rec.backend) return;
    this.o.fleet.reservations.reserve(reservationOf(rec.grant, rec.backend, rec.placement));
    this.charge(rec);
  }

  /** Before a side effect (create, terminate): this replica's lease on the grant must still be current. */
  private async leaseCheck(id: string): Promise<void> {
    if (this.o.store.shared && !(await this.o.store.holds(id))) throw new LeaseLostError(id);
  }

  /** Request cancellation; the grant ends as `cancelled` once its instance is terminated. */
  async cancel(id: string): Promise<GrantRecord | null> {
    const rec = await this.o.store.get(id);
    if (!rec || rec.outcome || ["completed", "failed", "expired", "cancelled"].includes(rec.state)) return rec;
    // Recorded before acting on it: a restart still cancels.
    const updated = await this.o.store.requestCancel(id);
    // A grant still waiting for a slot starts now, outside the limit, only to end as cancelled.
    if (updated && this.queue.take(id)) this.launch(updated, null);
    this.tasks.get(id)?.cancel();
    this.o.log.info({ request_id: id, backend: rec.backend, state: rec.state }, "cancel requested");
    return updated;
  }

  /** Stop driving grants without terminating anything; the next start resumes them. */
  async shutdown(timeoutMs = 8000): Promise<void> {
    this.stopping = true;
    this.leaseStop.abort();
    await this.leases;
    // Waiting grants stay as they are in the store: the next start queues them again.
    this.queue.close();
    for (const t of this.tasks.values()) t.shutdown.abort(new Shutdown());
    const all = Promise.allSettled([...this.tasks.values()].map((t) => t.done));
    await Promise.race([all, new Promise((r) => setTimeout(r, timeoutMs).unref())]);
    // Other replicas take the grants over at once instead of after a TTL (a write still in flight
    // stays fenced by its token).
    if (this.o.store.shared)
      await this.o.store.releaseAll().catch((e: unknown) => this.o.log.warn({ err: { message: messageOf(e) } }, "could not release this replica's leases; they lapse after their TTL"));
  }

  /** Resolves when the grant's task (if any) has finished; for tests and the CLI. */
  async settled(id: string): Promise<void> {
    await this.tasks.get(id)?.done;
  }

  // ---- the state machine ----------------------------------------------------------------------

  /** Grants yet to be provisioned wait for a slot of their backend and region; the rest start now. */
  private start(rec: GrantRecord): void {
    if (this.stopping || this.tasks.has(rec.request_id)) return;
    if (rec.state === "provisioning" && !rec.cancel_requested && rec.backend)
      this.queue.enqueue(rec.request_id, slotKey(rec.backend, rec.grant.region), this.o.almanac.toWallMs(rec.grant.valid_to), rec.request_id);
    else this.launch(rec, null);
  }

  /** The grant's task; `slot`: the provisioning slot it was given (null: it holds none). */
  private launch(rec: GrantRecord, slot: string | null): void {
    if (this.stopping || this.tasks.has(rec.request_id)) {
      if (slot) this.queue.release(slot);
      return;
    }
    const task = new Task();
    task.slot = slot;
    if (rec.cancel_requested) task.cancel();
    this.tasks.set(rec.request_id, task);
    task.done = this.drive(rec, task);
  }

  /** A waiting grant's turn: its task starts from what the store holds now. */
  private launchStored(id: string, slot: string | null): void {
    this.o.store.get(id).then(
      (rec) => {
        if (rec && !TERMINAL.includes(rec.state)) return this.launch(rec, slot);
        if (slot) this.queue.release(slot);
      },
      (e: unknown) => {
        // Unreadable now (the database unreachable): the slot is freed and the grant resumes on
        // the next start, or the next resume pass.
        if (slot) this.queue.release(slot);
        this.o.log.error({ request_id: id, err: e }, "could not read a queued grant from the store; it resumes on the next start");
      },
    );
  }

  private releaseSlot(task: Task): void {
    if (task.slot) this.queue.release(task.slot);
    task.slot = null;
  }

  /**
   * The whole life of one grant from its last committed state, its end handled, in one async
   * frame: every frame still waiting stays on the heap for as long as the grant provisions.
   */
  private async drive(initial: GrantRecord, task: Task): Promise<void> {
    const id = initial.request_id;
    const signal = task.shutdown.signal;
    let rec = initial;
    try {
      for (let failures = 1; ; failures++) {
        try {
          await this.driveFrom(rec, task);
          return;
        } catch (e) {
          // Dropped by the lease renewal (counted and logged there), or fenced at a write or a check.
          const dropped = signal.reason instanceof LeaseLostError;
          if (dropped || e instanceof LeaseLostError) {
            if (!dropped) {
              this.o.events?.leaseLost?.();
              this.o.log.warn({ request_id: id, backend: rec.backend }, "lease lost: another replica drives this grant now; dropping it here");
            }
            await this.keepCounted(id, rec);
            return;
          }
          if (isAbort(e, signal)) return;
          // A state write that did not happen (disk full, I/O error): the grant continues from its
          // last committed state after a pause, by the same idempotent calls, instead of stalling
          // until a restart.
          if (!isStoreUnavailable(e)) throw e;
          this.o.log.warn({ request_id: id, backend: rec.backend, err: { kind: isStorageFull(e) ? "storage_full" : "store_unavailable", message: messageOf(e) }, failures }, "a state database write failed; retrying from the last committed state");
          await this.o.clock.sleep(backoffMs(failures, this.baseMs, this.capMs) + this.baseMs, signal);
          // The last committed state, read again (a database that cannot be read yet is waited for).
          for (;;) {
            try {
              rec = (await this.o.store.get(id)) ?? rec;
              break;
            } catch (e2) {
              if (!isStoreUnavailable(e2)) throw e2;
              failures++;
              await this.o.clock.sleep(backoffMs(failures, this.baseMs, this.capMs) + this.baseMs, signal);
            }
          }
          if (TERMINAL.includes(rec.state)) return;
        }
      }
    } catch (e) {
      if (!isAbort(e, signal)) {
        this.o.log.error({ request_id: id, backend: rec.backend, err: e }, "grant task failed unexpectedly; it resumes on the next start");
        // With other replicas, at the next claim (perhaps by this one).
        this.o.store.forget(id);
      }
    } finally {
      this.releaseSlot(task);
      this.tasks.delete(id);
    }
  }

  /** One pass of drive() from a committed state; a failed store write escapes to drive(). */
  private async driveFrom(initial: GrantRecord, task: Task): Promise<void> {
    let rec = initial;
    const id = rec.request_id;
    const signal = task.shutdown.signal;
    const deadlineMs = this.o.almanac.toWallMs(rec.grant.valid_to);
    if (rec.state === "terminating") {
      this.releaseSlot(task);
      await this.terminateAndFinish(rec, rec.outcome ?? this.failOutcome("backend", "resumed while terminating without a recorded outcome"), signal);
      return;
    }

    if (rec.state === "provisioning") {
      const early = this.preProvisionOutcome(rec, deadlineMs, task);
      if (early) {
        this.releaseSlot(task);
        // A create call may have been in flight: terminate by request_id before finishing.
        await this.terminateAndFinish(await this.toTerminating(rec, early), early, signal);
        return;
      }
      let instance: ProvisionedInstance;
      // Cancel and valid_to cut every provisioning wait short (create, boot, image fetch, SSH).
      const wait = this.provisionWait(task, deadlineMs);
      try {
        ({ rec, instance } = await this.provisionWithFailover(rec, task, wait.signal));
      } catch (e) {
        // A lost lease is no provisioning failure: this replica writes and terminates nothing (drive() drops the grant).
        if (signal.aborted || e instanceof LeaseLostError) throw e;
        const cut = wait.signal.reason instanceof Interrupted ? wait.signal.reason : null;
        const outcome = cut ? this.outcome(cut.state, null) : this.failOutcome(e instanceof NoBackendError ? "declined" : errorKind(e), messageOf(e));
        if (cut) this.o.log.info({ request_id: id, backend: rec.backend, reason: cut.message }, "provisioning stopped");
        else this.o.log.warn({ request_id: id, backend: rec.backend, err: { kind: outcome.error_kind, message: outcome.error_message } }, "provisioning failed");
        rec = (await this.o.store.get(id))!;
        // Whatever a failed or interrupted create left behind is found by request_id and removed.
        await this.terminateAndFinish(await this.toTerminating(rec, outcome), outcome, signal);
        return;
      } finally {
        wait.done();
        this.releaseSlot(task);
      }
      rec = await this.transition(rec, "running", { instance, note: `instance ${instance.instance_id}` });
      this.o.events?.ready?.(instance.backend, (this.o.clock.now() - Date.parse(rec.created_at)) / 1000);
    }
    this.releaseSlot(task);

    // running: watch until exit, expiry or cancel
    const outcome = await this.watch(rec, deadlineMs, task);
    await this.terminateAndFinish(await this.toTerminating(rec, outcome), outcome, signal);
  }

  private preProvisionOutcome(rec: GrantRecord, deadlineMs: number, task: Task): Outcome | null {
    const now = this.o.clock.now();
    if (rec.cancel_requested || task.cancelRequested) return this.outcome("cancelled", null);
    if (now >= deadlineMs) return this.outcome("expired", null);
    return null;
  }

  /** A signal for the provisioning phase: shutdown, a cancel or valid_to abort it at once. */
  private provisionWait(task: Task, deadlineMs: number): { signal: AbortSignal; done(): void } {
    const ctl = new AbortController();
    const shutdown = task.shutdown.signal;
    const onShutdown = () => ctl.abort(shutdown.reason);
    shutdown.addEventListener("abort", onShutdown, { once: true });
    task.onCancel = () => ctl.abort(new Interrupted("cancelled"));
    if (task.cancelRequested) task.onCancel();
    this.o.clock.sleep(Math.max(0, deadlineMs - this.o.clock.now()), ctl.signal).then(
      () => ctl.abort(new Interrupted("expired")),
      () => undefined,
    );
    return {
      signal: ctl.signal,
      done: () => {
        shutdown.removeEventListener("abort", onShutdown);
        task.onCancel = null;
        ctl.abort();
      },
    };
  }

  /** Hold the provisioning slot of `key`, waiting in its queue for one if needed (a failover). */
  private async holdSlot(task: Task, id: string, key: string, signal: AbortSignal): Promise<void> {
    if (task.slot === key) return;
    this.releaseSlot(task);
    await new Promise<void>((resolve, reject) => {
      if (signal.aborted) return reject(signal.reason);
      const onAbort = () => {
        if (this.queue.take(id)) reject(signal.reason);
      };
      signal.addEventListener("abort", onAbort, { once: true });
      this.queue.enqueue(id, key, Infinity, {
        wake: () => {
          signal.removeEventListener("abort", onAbort);
          task.slot = key;
          resolve();
        },
      });
    });
  }

  private async provisionWithFailover(initial: GrantRecord, task: Task, signal: AbortSignal): Promise<{ rec: GrantRecord; instance: ProvisionedInstance }> {
    let rec = initial;
    const grant = rec.grant;
    const attempts: Attempt[] = [...rec.attempts];
    let backend = this.o.fleet.get(rec.backend ?? "");
    let placement = rec.placement;
    let price = rec.price_per_hour;
    if (!backend) {
      // Its backend left the config before provisioning: admitted again, to whichever takes it.
      ({ backend, placement, price_per_hour: price } = this.o.fleet.provisionForGrant(grant, rec.envelope));
    }
    let transient = 0;
    for (;;) {
      if (rec.state !== "provisioning" || rec.backend !== backend.name)
        rec = await this.transition(rec, "provisioning", { backend: backend.name, placement, price_per_hour: price, attempts, note: `idempotency key derived from request_id ${grant.request_id}` });
      await this.holdSlot(task, grant.request_id, slotKey(backend.name, grant.region), signal);
      await this.leaseCheck(grant.request_id);
      const t0 = this.o.clock.now();
      try {
        const instance = await backend.provision(grant, this.envelopeFor(rec), signal, placement ?? undefined);
        this.o.events?.provisioned?.(backend.name, (this.o.clock.now() - t0) / 1000);
        return { rec, instance };
      } catch (e) {
        if (isAbort(e, signal)) throw e;
        if (e instanceof TransientError && transient < TRANSIENT_PROVISION_RETRIES) {
          transient++;
          this.o.log.warn({ request_id: grant.request_id, backend: backend.name, err: { kind: "transient", message: messageOf(e) } }, "transient provisioning error; retrying");
          await this.o.clock.sleep(backoffMs(transient, this.baseMs, this.capMs), signal);
          continue;
        }
        if (!isFailoverable(e)) throw e;
        const kind = errorKind(e);
        attempts.push({ backend: backend.name, error_kind: kind, message: messageOf(e), at: new Date(this.o.clock.now()).toISOString() });
        const off = (e as { offering?: { region: string; shape: string } }).offering;
        if (off) this.o.fleet.unavailable.markUnavailable(backend.name, off.region, off.shape);
        this.o.events?.failover?.(backend.name, kind);
        // Anything half-created on the backend that declined is removed before moving on.
        await this.terminateWithRetry(backend, placeholder(grant, backend.name), signal);
        const tried = new Set(attempts.map((a) => a.backend));
        // The reservation moves with the grant; with nowhere to go it stays until the grant ends.
        // Routed again as an admission is (under the store's admission lock, with other replicas).
        let next = null as Route | null;
        const moved = await this.moveTo(rec, (changes) => {
          this.applyLedger(changes);
          next = attempts.length < this.o.maxAttempts ? this.o.fleet.admit(grant, rec.envelope, tried) : null;
          return next?.ok ? { backend: next.backend.name, placement: next.placement, price_per_hour: next.price_per_hour, attempts, note: `idempotency key derived from request_id ${grant.request_id}` } : null;
        });
        if (!moved || !next?.ok) {
          rec = await this.transition(rec, "provisioning", { attempts, note: "no backend left to try" });
          throw e;
        }
        rec = moved;
        this.o.log.warn({ request_id: grant.request_id, backend: backend.name, next_backend: next.backend.name, err: { kind, message: messageOf(e) } }, "failing over to the next backend");
        backend = next.backend;
        placement = next.placement;
        price = next.price_per_hour;
        transient = 0;
      }
    }
  }

  private envelopeFor(rec: GrantRecord): Envelope {
    const nonce = rec.attestation_nonce ? { attestation_nonce: rec.attestation_nonce } : {};
    return rec.public_key ? { ...rec.envelope, ssh_public_key: rec.public_key, ...nonce } : { ...rec.envelope, ...nonce };
  }

  private async watch(rec: GrantRecord, deadlineMs: number, task: Task): Promise<Outcome> {
    const backend = this.backendOf(rec);
    const instance = rec.instance!;
    const signal = task.shutdown.signal;
    let failures = 0;
    for (;;) {
      const ctl = new AbortController();
      const onShutdown = () => ctl.abort(signal.reason);
      signal.addEventListener("abort", onShutdown, { once: true });
      try {
        const winner = await Promise.race([
          backend.watchUntilExit(instance, new Date(deadlineMs), ctl.signal).then((obs) => ({ t: "obs" as const, obs })),
          this.o.clock.sleep(Math.max(0, deadlineMs + this.graceMs - this.o.clock.now()), ctl.signal).then(() => ({ t: "deadline" as const })),
          task.cancelled().then(() => ({ t: "cancel" as const })),
        ]);
        if (winner.t === "cancel") return this.outcome("cancelled", null);
        if (winner.t === "deadline") {
          this.o.log.warn({ request_id: rec.request_id, backend: rec.backend }, "valid_to passed and the backend did not report: the bridge terminates it");
          return this.outcome("expired", null);
        }
        return this.fromObservation(winner.obs);
      } catch (e) {
        if (signal.aborted) throw e;
        if (e instanceof NotFoundError) return this.failOutcome("lost", messageOf(e));
        failures++;
        this.o.log.warn({ request_id: rec.request_id, backend: rec.backend, err: { kind: errorKind(e), message: messageOf(e) }, failures }, "watch failed; re-attaching");
        if (this.o.clock.now() >= deadlineMs + this.graceMs) return this.outcome("expired", null);
        await this.o.clock.sleep(backoffMs(failures, this.baseMs, this.capMs), signal);
      } finally {
        signal.removeEventListener("abort", onShutdown);
        ctl.abort();
      }
    }
  }

  private fromObservation(obs: ExitObservation): Outcome {
    if (obs.failure) return { ...this.failOutcome(obs.failure.kind, obs.failure.message), cpu_seconds: obs.cpu_seconds, ended_at: obs.ended_at };
    if (obs.kind === "expired") return { ...this.outcome("expired", null), cpu_seconds: obs.cpu_seconds, ended_at: obs.ended_at };
    if (obs.kind === "lost") return this.failOutcome("lost", "the instance disappeared");
    return { ...this.outcome("completed", obs.exit_code), cpu_seconds: obs.cpu_seconds, ended_at: obs.ended_at };
  }

  private toTerminating(rec: GrantRecord, outcome: Outcome): Promise<GrantRecord> {
    return this.transition(rec, "terminating", { outcome, note: `will end as ${outcome.state}` });
  }

  private async terminateAndFinish(rec: GrantRecord, outcome: Outcome, signal: AbortSignal): Promise<void> {
    const backend = this.backendOf(rec);
    await this.terminateWithRetry(backend, rec.instance ?? placeholder(rec.grant, backend.name), signal);
    await this.finish(rec, outcome);
  }

  /** Terminate until the backend confirms; a paid instance is never left behind. */
  private async terminateWithRetry(backend: ManagedBackend, instance: ProvisionedInstance, signal: AbortSignal): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      await this.leaseCheck(instance.request_id);
      try {
        await backend.terminate(instance);
        return;
      } catch (e) {
        if (e instanceof NotFoundError) return;
        if (signal.aborted) throw signal.reason;
        this.o.log.warn({ request_id: instance.request_id, backend: backend.name, instance_id: instance.instance_id, err: { kind: errorKind(e), message: messageOf(e) }, attempt }, "terminate failed; retrying");
        await this.o.clock.sleep(backoffMs(attempt, this.baseMs, this.capMs) + this.baseMs, signal);
      }
    }
  }

  private async finish(rec: GrantRecord, outcome: Outcome): Promise<void> {
    const spend = this.o.fleet.spend;
    const billing = spend ? { rule: spend.prices.rule(rec.backend ?? ""), currency: spend.currency } : undefined;
    const log = buildComputeLog(this.o.providerId, rec, outcome, this.o.clock.now(), this.o.identity, billing);
    // Out of the ledgers before the final commit is visible: whoever sees the grant ended (the market
    // polling it) finds its capacity free and its cost settled. Safe: everything billable is gone by
    // now (terminated, or never created); a failed commit is retried and settles again (idempotent),
    // and a restart rebuilds the ledgers from the store.
    this.o.fleet.settle(rec.request_id, log.usage.cost);
    const done = await this.o.store.finish(rec.request_id, outcome.state, log, { error_kind: outcome.error_kind, error_message: outcome.error_message }, this.o.publishLogs ?? false);
    this.o.events?.transition?.(rec.backend, rec.state, outcome.state);
    this.o.log.info(
      { request_id: rec.request_id, backend: rec.backend, instance_id: rec.instance?.instance_id, state: done.state, exit_code: log.exit_code, partial: log.partial, ...(outcome.error_kind ? { err: { kind: outcome.error_kind } } : {}) },
      "grant finished",
    );
    this.o.onLogWritten?.();
  }

  private async transition(rec: GrantRecord, to: GrantRecord["state"], changes: GrantChanges): Promise<GrantRecord> {
    return this.transitioned(rec, await this.o.store.transition(rec.request_id, to, changes));
  }

  /** A move to another backend decided under the admission lock (Store.admitMove); null: none. */
  private async moveTo(rec: GrantRecord, decide: (changes: GrantRecord[]) => GrantChanges | null): Promise<GrantRecord | null> {
    const next = await this.o.store.admitMove(rec.request_id, decide);
    return next && this.transitioned(rec, next);
  }

  /** Every committed transition is logged and counted here. */
  private transitioned(rec: GrantRecord, next: GrantRecord): GrantRecord {
    this.o.events?.transition?.(next.backend, rec.state, next.state);
    this.o.log.info({ request_id: rec.request_id, backend: next.backend, state: next.state, instance_id: next.instance?.instance_id }, `grant ${next.state}`);
    return next;
  }

  private backendOf(rec: GrantRecord): ManagedBackend {
    const b = this.o.fleet.get(rec.backend ?? "");
    if (!b) throw new Error(`grant ${rec.request_id} belongs to backend "${rec.backend}", which is no longer configured; re-add it to finish the grant`);
    return b;
  }

  private outcome(state: Outcome["state"], exitCode: number | null): Outcome {
    return { state, exit_code: exitCode, cpu_seconds: null, ended_at: null, error_kind: null, error_message: null };
  }

  private failOutcome(kind: string, message: string): Outcome {
    return { ...this.outcome("failed", null), error_kind: kind, error_message: message };
  }
}

/** Leases taken at most per claim (several replicas): a takeover of more spreads over renewals. */
const CLAIM_BATCH = 1000;

/** Provision calls in flight per backend and region unless fleet.provision_concurrency says otherwise. */
export const DEFAULT_PROVISION_CONCURRENCY = 32;

function slotKey(backend: string, region: string): string {
  return `${backend}|${region}`;
}

/** An instance known only by its request_id: backends locate its resources from that alone. */
export function placeholder(grant: ComputeGrant, backend: string): ProvisionedInstance {
  return {
    request_id: grant.request_id,
    backend,
    instance_id: "",
    region: grant.region,
    host: null,
    ssh_port: null,
    ssh_user: null,
    host_key_sha256: null,
    started_at: new Date(0).toISOString(),
    cpu_millicores: grant.cpu_millicores,
    ram_mib: grant.ram_mib,
    details: {},
  };
}

function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
