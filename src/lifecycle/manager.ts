import ssh2 from "ssh2";
import {
  errorKind,
  isFailoverable,
  NotFoundError,
  TransientError,
  type ManagedBackend,
} from "../backends/backend.js";
import { grantRequestDigest, type Almanac, type ComputeGrant, type Decline, type Envelope, type ExitObservation, type GrantRequest, type ProvisionedInstance } from "../domain/index.js";
import { NoBackendError, type Fleet } from "../fleet/fleet.js";
import type { Attempt, GrantRecord, Outcome, Store } from "../store/store.js";
import { backoffMs, isAbort, type Clock } from "../util/clock.js";
import type { Identity } from "../util/identity.js";
import type { Logger } from "../util/logger.js";
import { buildComputeLog } from "./compute-log.js";

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
  /** Enqueue ComputeLogs for the market publisher. */
  publishLogs?: boolean;
  onLogWritten?: () => void;
  events?: ManagerEvents;
}

/** Hooks for metrics; all optional. */
export interface ManagerEvents {
  transition?(backend: string | null, from: string, to: string): void;
  decline?(declines: Decline[]): void;
  provisioned?(backend: string, seconds: number): void;
  /** From accept to running (the instance reachable). */
  ready?(backend: string, seconds: number): void;
  failover?(from: string, kind: string): void;
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
  private cancelRequested = false;
  private onCancel: (() => void) | null = null;

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

/**
 * Drives each grant through accepted -> provisioning -> running -> terminating -> terminal,
 * writing every transition before the side effect it announces, so that after a crash
 * resumeAll() can continue each grant from its last committed state. Backends are idempotent
 * per request_id, so "continue" is always "call the same method again".
 */
export class GrantManager {
  private readonly tasks = new Map<string, Task>();
  private stopping = false;
  private readonly graceMs: number;
  private readonly baseMs: number;
  private readonly capMs: number;

  constructor(private readonly o: ManagerOptions) {
    this.graceMs = o.expiryGraceMs ?? 5000;
    this.baseMs = o.retryBaseMs ?? 1000;
    this.capMs = o.retryCapMs ?? 60_000;
  }

  get activeCount(): number {
    return this.tasks.size;
  }

  /** Validate, route and durably accept a grant; provisioning continues in the background. */
  async submit(req: GrantRequest): Promise<SubmitResult> {
    const { grant, envelope } = req;
    // A re-post is answered from the store whatever has changed since (valid_to passed, capacity
    // taken): it is looked up whenever the new grant would be refused, and otherwise inside the
    // accept commit itself (where the writer digests the body), so the common path reads the
    // database once, in the writer.
    const known = (): SubmitResult | null => {
      const existing = this.o.store.get(grant.request_id);
      return existing ? { status: existing.body_digest === grantRequestDigest(req) ? "duplicate" : "conflict", record: existing } : null;
    };
    if (this.o.almanac.toWallMs(grant.valid_to) <= this.o.clock.now()) {
      const k = known();
      if (k) return k;
      throw new ValidationError("grant.valid_to", `tick ${grant.valid_to} (${this.o.almanac.toDate(grant.valid_to).toISOString()}) is already in the past`);
    }
    const route = this.o.fleet.route(grant);
    if (!route.ok) {
      const k = known();
      if (k) return k;
      this.o.events?.decline?.(route.declines);
      return { status: "declined", declines: route.declines };
    }
    let privateKey: string | null = null;
    let publicKey: string | null = null;
    if (!envelope.ssh_public_key) {
      const kp = ssh2.utils.generateKeyPairSync("ed25519", { comment: `compute-bridge-${grant.request_id}` });
      privateKey = kp.private;
      publicKey = kp.public.trim();
    }
    const r = await this.o.store.accept({
      request_id: grant.request_id,
      grant,
      envelope,
      backend: route.backend.name,
      private_key: privateKey,
      public_key: publicKey,
    });
    if (r.status === "created") {
      this.o.events?.transition?.(route.backend.name, "none", "accepted");
      this.o.log.info({ request_id: grant.request_id, backend: route.backend.name, state: "accepted", region: grant.region }, "grant accepted");
      this.start(r.record);
    }
    return r;
  }

  /** Continue every grant that was not terminal when the bridge last stopped. */
  resumeAll(): number {
    // The listener is up before this runs: grants accepted since the start already have a task.
    const open = this.o.store.nonTerminal().filter((rec) => !this.tasks.has(rec.request_id));
    for (const rec of open) {
      this.o.log.info({ request_id: rec.request_id, backend: rec.backend, state: rec.state }, "resuming grant after restart");
      this.start(rec);
    }
    return open.length;
  }

  /** Request cancellation; the grant ends as `cancelled` once its instance is terminated. */
  async cancel(id: string): Promise<GrantRecord | null> {
    const rec = this.o.store.get(id);
    if (!rec || rec.outcome || ["completed", "failed", "expired", "cancelled"].includes(rec.state)) return rec;
    // Recorded before acting on it: a restart still cancels.
    const updated = await this.o.store.requestCancel(id);
    this.tasks.get(id)?.cancel();
    this.o.log.info({ request_id: id, backend: rec.backend, state: rec.state }, "cancel requested");
    return updated;
  }

  /** Stop driving grants without terminating anything; the next start resumes them. */
  async shutdown(timeoutMs = 8000): Promise<void> {
    this.stopping = true;
    for (const t of this.tasks.values()) t.shutdown.abort(new Shutdown());
    const all = Promise.allSettled([...this.tasks.values()].map((t) => t.done));
    await Promise.race([all, new Promise((r) => setTimeout(r, timeoutMs).unref())]);
  }

  /** Resolves when the grant's task (if any) has finished; for tests and the CLI. */
  async settled(id: string): Promise<void> {
    await this.tasks.get(id)?.done;
  }

  // ---- the state machine ----------------------------------------------------------------------

  private start(rec: GrantRecord): void {
    if (this.stopping || this.tasks.has(rec.request_id)) return;
    const task = new Task();
    if (rec.cancel_requested) task.cancel();
    this.tasks.set(rec.request_id, task);
    task.done = this.drive(rec, task);
  }

  /**
   * The whole life of one grant from its last committed state, its end handled, in one async
   * frame: every frame still waiting stays on the heap for as long as the grant provisions.
   */
  private async drive(initial: GrantRecord, task: Task): Promise<void> {
    let rec = initial;
    const id = rec.request_id;
    const signal = task.shutdown.signal;
    try {
      const deadlineMs = this.o.almanac.toWallMs(rec.grant.valid_to);
      if (rec.state === "terminating") {
        await this.terminateAndFinish(rec, rec.outcome ?? this.failOutcome("backend", "resumed while terminating without a recorded outcome"), signal);
        return;
      }

      if (rec.state === "accepted" || rec.state === "provisioning") {
        const early = this.preProvisionOutcome(rec, deadlineMs);
        if (early) {
          if (rec.state === "accepted") await this.finish(rec, early);
          // A create call may have been in flight: terminate by request_id before finishing.
          else await this.terminateAndFinish(await this.toTerminating(rec, early), early, signal);
          return;
        }
        let instance: ProvisionedInstance;
        try {
          ({ rec, instance } = await this.provisionWithFailover(rec, signal));
        } catch (e) {
          if (isAbort(e, signal)) throw e;
          const outcome = this.failOutcome(e instanceof NoBackendError ? "declined" : errorKind(e), messageOf(e));
          this.o.log.warn({ request_id: id, backend: rec.backend, err: { kind: outcome.error_kind, message: outcome.error_message } }, "provisioning failed");
          rec = this.o.store.get(id)!;
          // Whatever a failed create left behind is found by request_id and removed.
          await this.terminateAndFinish(await this.toTerminating(rec, outcome), outcome, signal);
          return;
        }
        rec = await this.transition(rec, "running", { instance, note: `instance ${instance.instance_id}` });
        this.o.events?.ready?.(instance.backend, (this.o.clock.now() - Date.parse(rec.created_at)) / 1000);
      }

      // running: watch until exit, expiry or cancel
      const outcome = await this.watch(rec, deadlineMs, task);
      await this.terminateAndFinish(await this.toTerminating(rec, outcome), outcome, signal);
    } catch (e) {
      if (!isAbort(e, signal)) this.o.log.error({ request_id: id, backend: rec.backend, err: e }, "grant task failed unexpectedly; it resumes on the next start");
    } finally {
      this.tasks.delete(id);
    }
  }

  private preProvisionOutcome(rec: GrantRecord, deadlineMs: number): Outcome | null {
    const now = this.o.clock.now();
    if (rec.cancel_requested) return this.outcome("cancelled", null);
    if (now >= deadlineMs) return this.outcome("expired", null);
    return null;
  }

  private async provisionWithFailover(initial: GrantRecord, signal: AbortSignal): Promise<{ rec: GrantRecord; instance: ProvisionedInstance }> {
    let rec = initial;
    const grant = rec.grant;
    const attempts: Attempt[] = [...rec.attempts];
    let backend = this.o.fleet.get(rec.backend ?? "") ?? this.o.fleet.provisionForGrant(grant);
    let transient = 0;
    for (;;) {
      if (rec.state !== "provisioning" || rec.backend !== backend.name)
        rec = await this.transition(rec, "provisioning", { backend: backend.name, attempts, note: `idempotency key derived from request_id ${grant.request_id}` });
      const t0 = this.o.clock.now();
      try {
        const instance = await backend.provision(grant, this.envelopeFor(rec), signal);
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
        const next = attempts.length < this.o.maxAttempts ? this.o.fleet.route(grant, tried) : null;
        if (!next || !next.ok) {
          rec = await this.o.store.transition(grant.request_id, "provisioning", { attempts, note: "no backend left to try" });
          throw e;
        }
        this.o.log.warn({ request_id: grant.request_id, backend: backend.name, next_backend: next.backend.name, err: { kind, message: messageOf(e) } }, "failing over to the next backend");
        backend = next.backend;
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
    const log = buildComputeLog(this.o.providerId, rec, outcome, this.o.clock.now(), this.o.identity);
    const done = await this.o.store.finish(rec.request_id, outcome.state, log, { error_kind: outcome.error_kind, error_message: outcome.error_message }, this.o.publishLogs ?? false);
    this.o.events?.transition?.(rec.backend, rec.state, outcome.state);
    this.o.log.info(
      { request_id: rec.request_id, backend: rec.backend, instance_id: rec.instance?.instance_id, state: done.state, exit_code: log.exit_code, partial: log.partial, ...(outcome.error_kind ? { err: { kind: outcome.error_kind } } : {}) },
      "grant finished",
    );
    this.o.onLogWritten?.();
  }

  private async transition(rec: GrantRecord, to: GrantRecord["state"], changes: Parameters<Store["transition"]>[2]): Promise<GrantRecord> {
    const next = await this.o.store.transition(rec.request_id, to, changes);
    this.o.events?.transition?.(next.backend, rec.state, to);
    this.o.log.info({ request_id: rec.request_id, backend: next.backend, state: to, instance_id: next.instance?.instance_id }, `grant ${to}`);
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
