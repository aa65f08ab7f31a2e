import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import type { BackendMetrics } from "../backends/backend.js";
import type { Decline } from "../domain/index.js";
import type { Fleet } from "../fleet/fleet.js";
import type { GrantManager, ManagerEvents } from "../lifecycle/manager.js";
import type { Store } from "../store/store.js";

/** Default metrics that are gauges named like counters (see the constructor). */
export const DROPPED_DEFAULTS = ["nodejs_active_handles_total", "nodejs_active_requests_total", "nodejs_active_resources_total"];

const SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200];

/** The bridge's Prometheus metrics (names documented in docs/operations.md). */
export class BridgeMetrics implements BackendMetrics {
  readonly registry = new Registry();
  private readonly declines = new Counter({ name: "cb_grant_declines_total", help: "Grants declined, by backend and reason code", labelNames: ["backend", "code"], registers: [this.registry] });
  private readonly transitions = new Counter({ name: "cb_grant_transitions_total", help: "Grant state transitions", labelNames: ["backend", "from", "to"], registers: [this.registry] });
  private readonly provisionSeconds = new Histogram({ name: "cb_provision_duration_seconds", help: "provision() duration per backend (create, image, address, SSH readiness)", labelNames: ["backend"], buckets: SECONDS, registers: [this.registry] });
  private readonly readySeconds = new Histogram({ name: "cb_grant_to_ready_seconds", help: "From accept to running (SSH ready), per backend", labelNames: ["backend"], buckets: SECONDS, registers: [this.registry] });
  private readonly failovers = new Counter({ name: "cb_failovers_total", help: "Grants moved to the next backend after capacity/quota errors", labelNames: ["backend", "kind"], registers: [this.registry] });
  private readonly apiCalls = new Counter({ name: "cb_api_calls_total", help: "Cloud/host API calls by backend, operation and result code", labelNames: ["backend", "operation", "code"], registers: [this.registry] });
  private readonly retries = new Counter({ name: "cb_api_retries_total", help: "Retried API calls", labelNames: ["backend", "operation"], registers: [this.registry] });
  private readonly throttles = new Counter({ name: "cb_api_throttled_total", help: "Throttled API calls", labelNames: ["backend", "operation"], registers: [this.registry] });
  private readonly ssh = new Gauge({ name: "cb_ssh_session_up", help: "1 when the persistent SSH session to a machine is up", labelNames: ["backend", "machine"], registers: [this.registry] });
  private readonly orphans = new Counter({ name: "cb_orphans_swept_total", help: "Resources without a live grant that were removed", labelNames: ["backend", "kind"], registers: [this.registry] });
  private readonly queueWait = new Histogram({ name: "cb_provision_queue_wait_seconds", help: "Time accepted grants waited for a provisioning slot, per backend", labelNames: ["backend"], buckets: SECONDS, registers: [this.registry] });
  private readonly takeovers = new Counter({ name: "cb_lease_takeovers_total", help: "Grants this replica took over after another replica's lease lapsed, by the replica that held them", labelNames: ["from_replica"], registers: [this.registry] });
  private readonly leaseLosses = new Counter({ name: "cb_lease_losses_total", help: "Grants this replica stopped driving because its lease was taken over or could not be renewed", registers: [this.registry] });
  /** 1 while this replica holds the leader role (the orphan sweep, the card, the market outbox). */
  readonly leader = new Gauge({ name: "cb_leader", help: "1 while this replica is the leader (it runs the orphan sweep, card publishing and the market outbox)", registers: [this.registry] });
  readonly storeWrite = new Histogram({ name: "cb_store_write_seconds", help: "Durable store write (group commit) latency", labelNames: ["op"], buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25], registers: [this.registry] });

  constructor(store: Store, activeGrants: () => number) {
    // prom-client's process and Node.js metrics under their stock names (process_*, nodejs_*), as
    // the usual Node.js dashboards query them. Three of them are gauges named *_total, which
    // `promtool check metrics` rejects (only counters end in _total): they are left out, their
    // per-type versions (nodejs_active_handles{type}, ...) stay and sum to the same number.
    collectDefaultMetrics({ register: this.registry });
    for (const m of DROPPED_DEFAULTS) this.registry.removeSingleMetric(m);
    new Gauge({
      name: "cb_grants",
      help: "Grants by state and backend (from the store)",
      labelNames: ["state", "backend"],
      registers: [this.registry],
      collect() {
        this.reset();
        for (const [k, n] of Object.entries(store.countByState())) {
          const [state, backend] = k.split("|");
          this.set({ state: state!, backend: backend ?? "" }, n);
        }
      },
    });
    new Gauge({ name: "cb_grants_in_flight", help: "Grants the bridge is driving right now", registers: [this.registry], collect() { this.set(activeGrants()); } });
    new Gauge({ name: "cb_replica_info", help: "This replica's id (several replicas may share one database)", labelNames: ["replica", "store"], registers: [this.registry] }).set({ replica: store.replicaId, store: store.engine }, 1);
    if (store.shared) new Gauge({ name: "cb_leases_held", help: "Grant leases this replica holds (the grants it drives)", registers: [this.registry], collect() { this.set(activeGrants()); } });
    new Gauge({ name: "cb_market_outbox", help: "Card/log deliveries waiting for the market", registers: [this.registry], async collect() { this.set(await store.outboxSize()); } });
    store.onWrite = (op, ms) => this.storeWrite.observe({ op }, ms / 1000);
  }

  /** Hooks for the grant manager. */
  managerEvents(): ManagerEvents {
    return {
      transition: (backend, from, to) => this.transitions.inc({ backend: backend ?? "", from, to }),
      decline: (declines: Decline[]) => declines.forEach((d) => this.declines.inc({ backend: d.backend, code: d.code })),
      provisioned: (backend, seconds) => this.provisionSeconds.observe({ backend }, seconds),
      ready: (backend, seconds) => this.readySeconds.observe({ backend }, seconds),
      failover: (backend, kind) => this.failovers.inc({ backend, kind }),
      dequeued: (backend, seconds) => this.queueWait.observe({ backend }, seconds),
      takeover: (from) => this.takeovers.inc({ from_replica: from }),
      leaseLost: () => this.leaseLosses.inc(),
    };
  }

  /** Admission: provisioning queues, reservations held against each backend's capacity, spend. */
  watchAdmission(fleet: Fleet, manager: GrantManager): void {
    type Set = (labels: Record<string, string>, v: number) => void;
    // A gauge computed at each scrape: `fill` sets its current series.
    const gauge = (name: string, help: string, labelNames: string[], fill: (set: Set) => void) =>
      new Gauge({
        name,
        help,
        labelNames,
        registers: [this.registry],
        collect() {
          this.reset();
          fill((l, v) => this.set(l, v));
        },
      });
    gauge("cb_provision_queue_depth", "Accepted grants waiting for a provisioning slot, per backend and region", ["backend", "region"], (set) => {
      for (const q of manager.queueStats()) set({ backend: q.backend, region: q.region }, q.waiting);
    });
    gauge("cb_provision_in_flight", "provision() calls in flight, per backend and region (at most fleet.provision_concurrency)", ["backend", "region"], (set) => {
      for (const q of manager.queueStats()) set({ backend: q.backend, region: q.region }, q.running);
    });
    gauge("cb_reservations", "Grants holding a capacity reservation (accepted, not yet ended), per backend", ["backend"], (set) => {
      for (const b of fleet.backends) set({ backend: b.name }, fleet.reservations.held(b.name).count);
    });
    gauge("cb_reserved", "CPU (millicores) and RAM (MiB) reserved by open grants, per backend", ["backend", "resource"], (set) => {
      for (const b of fleet.backends) {
        const h = fleet.reservations.held(b.name);
        set({ backend: b.name, resource: "cpu_millicores" }, h.cpu_millicores);
        set({ backend: b.name, resource: "ram_mib" }, h.ram_mib);
      }
    });
    gauge("cb_capacity", "Declared capacity: CPU (millicores) and RAM (MiB), per backend", ["backend", "resource"], (set) => {
      for (const b of fleet.backends) {
        const c = b.capabilities();
        set({ backend: b.name, resource: "cpu_millicores" }, c.max_cpu_millicores);
        set({ backend: b.name, resource: "ram_mib" }, c.max_ram_mib);
      }
    });
    const report = () => (fleet.spend?.budgets.active ? fleet.spend.budgets.report(fleet.spend.clock.now()) : []);
    gauge("cb_spend", "Actual cost of grants ended in the current UTC day/month, per scope (fleet or backend), in the fleet's currency", ["scope", "period"], (set) => {
      for (const r of report()) set({ scope: r.scope, period: r.period }, r.spent);
    });
    gauge("cb_spend_reserved", "Worst case (price until valid_to) of open grants charged to the current UTC day/month, per scope", ["scope", "period"], (set) => {
      for (const r of report()) set({ scope: r.scope, period: r.period }, r.reserved);
    });
    gauge("cb_budget_remaining", "What is left of each configured spend cap in the current UTC day/month", ["scope", "period"], (set) => {
      for (const r of report()) if (r.limit !== null) set({ scope: r.scope, period: r.period }, Math.max(0, r.limit - r.spent - r.reserved));
    });
  }

  apiCall(backend: string, operation: string, code: string): void {
    this.apiCalls.inc({ backend, operation, code });
  }
  retry(backend: string, operation: string): void {
    this.retries.inc({ backend, operation });
  }
  throttled(backend: string, operation: string): void {
    this.throttles.inc({ backend, operation });
  }
  sshSession(backend: string, machine: string, up: boolean): void {
    this.ssh.set({ backend, machine }, up ? 1 : 0);
  }
  orphanSwept(backend: string, kind: string): void {
    this.orphans.inc({ backend, kind });
  }
}
