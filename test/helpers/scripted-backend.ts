import { countDecline, NOTHING_HELD, type Held, type ManagedBackend, type Satisfaction } from "../../src/backends/backend.js";
import type { ComputeGrant, Envelope, ExitObservation, ProvisionedInstance } from "../../src/domain/index.js";

/** What one provision() call does. */
export type ProvisionStep = { ok: true } | { error: Error } | "hang";

/**
 * An in-memory backend whose every answer a test scripts (Karpenter's pkg/fake style): the
 * GrantManager's lifecycle, failover, expiry, cancel and resume run against it in milliseconds.
 * The wire fakes stay for the real backends.
 */
export class ScriptedBackend implements ManagedBackend {
  readonly calls: { op: "provision" | "watch" | "terminate"; id: string }[] = [];
  /** Per request_id, the steps of successive provision() calls (default: succeed). */
  readonly provisionSteps = new Map<string, ProvisionStep[]>();
  private readonly exits = new Map<string, (o: ExitObservation) => void>();
  readonly aborted = new Set<string>();

  constructor(
    readonly name: string,
    private readonly max = 100,
    private readonly region = "r",
  ) {}

  capabilities() {
    return { regions: [this.region], tdx_capable: false, max_cpu_millicores: 1e6, max_ram_mib: 1e6 };
  }

  canSatisfy(grant: ComputeGrant, held: Held = NOTHING_HELD, _envelope?: Envelope): Satisfaction {
    if (grant.region !== this.region) return { ok: false, code: "region_not_served", message: `${this.name} serves ${this.region}` };
    return countDecline(this.name, held, this.max, "max") ?? { ok: true };
  }

  async provision(grant: ComputeGrant, _envelope: Envelope, signal: AbortSignal): Promise<ProvisionedInstance> {
    const id = grant.request_id;
    this.calls.push({ op: "provision", id });
    const step = this.provisionSteps.get(id)?.shift() ?? { ok: true };
    if (step === "hang")
      await new Promise<never>((_, reject) =>
        signal.addEventListener(
          "abort",
          () => {
            this.aborted.add(id);
            reject(signal.reason);
          },
          { once: true },
        ),
      );
    if (typeof step === "object" && "error" in step) throw step.error;
    return { request_id: id, backend: this.name, instance_id: `${this.name}-${id}`, region: grant.region, host: null, ssh_port: null, ssh_user: null, host_key_sha256: null, started_at: new Date().toISOString(), cpu_millicores: grant.cpu_millicores, ram_mib: grant.ram_mib, details: {} };
  }

  /** Resolves when the test calls exit(id), never on its own (the manager enforces valid_to). */
  watchUntilExit(instance: ProvisionedInstance, _validTo: Date, signal: AbortSignal): Promise<ExitObservation> {
    this.calls.push({ op: "watch", id: instance.request_id });
    return new Promise((resolve, reject) => {
      this.exits.set(instance.request_id, resolve);
      signal.addEventListener("abort", () => reject(signal.reason), { once: true });
    });
  }

  async terminate(instance: ProvisionedInstance): Promise<void> {
    this.calls.push({ op: "terminate", id: instance.request_id });
  }

  /** The workload of `id` exits with `code` (false if nothing watches it yet). */
  exit(id: string, code: number): boolean {
    const f = this.exits.get(id);
    if (!f) return false;
    this.exits.delete(id);
    f({ kind: "exited", exit_code: code, cpu_seconds: 0.5, peak_memory_mib: null, ended_at: new Date().toISOString(), failure: null });
    return true;
  }

  watching(id: string): boolean {
    return this.exits.has(id);
  }

  count(op: "provision" | "watch" | "terminate", id: string): number {
    return this.calls.filter((c) => c.op === op && c.id === id).length;
  }
}
