/**
 * What one cloud supplies to the shared VM backend (vm-backend.ts): its API calls, its shapes, its
 * errors and its naming, and nothing else. The orchestration (capacity and the canSatisfy order,
 * adopt-or-create over every fitting shape and placement, waiting for running, SSH readiness and
 * the host key, the watch race against valid_to, exit markers, terminate, the orphan sweep with
 * one throttle and grace policy, status and metrics) is written once, in the core.
 *
 * Adding a cloud (Oracle, Hetzner, ...) is one adapter in its own folder, a config section that
 * spreads `Timeouts` (config/schema.ts), and one line in registry.ts.
 */
import type { ComputeGrant, Envelope, ProvisionedInstance } from "../../domain/index.js";
import type { EvidencePlatform } from "../../domain/attestation.js";
import type { GuestAttestation } from "../../attestation/guest.js";
import { BackendError, CapacityError, type CheckResult } from "../backend.js";

/** A VM shape as configured: the instance type / machine type / VM size and its size. */
export interface Shape {
  name: string;
  vcpus: number;
  memory_mib: number;
}

/** The settings every cloud section has (config/schema.ts `Timeouts` plus the concurrency cap). */
export interface CloudSettings {
  max_concurrent_instances: number;
  launch_timeout_seconds: number;
  ready_timeout_seconds: number;
  host_key_timeout_seconds: number;
  poll_interval_seconds: number;
  orphan_grace_seconds: number;
  reconcile_interval_seconds: number;
  ssh_port: number;
}

/**
 * Where a VM stands, in the core's words:
 * - starting: being created or booting, not reachable yet;
 * - running: running, with `host` when the cloud's status carries the address;
 * - stopping: on its way to stopped (not final);
 * - stopped: powered off or terminated; its console tells the outcome;
 * - gone: failed, being deleted or suspended by someone else: the workload is lost.
 */
export type VmPhase = "starting" | "running" | "stopping" | "stopped" | "gone";

/** One VM as the cloud reports it. */
export interface VmStatus {
  /** The id a ProvisionedInstance stores (instance_id): EC2 instance id, GCE or Azure VM name. */
  id: string;
  /** The batched poll that watches it (an EC2 region, a GCE project, an Azure resource group). */
  scope: string;
  /** Its key in that poll. */
  key: string;
  phase: VmPhase;
  /** The address SSH is probed on, when known. */
  host: string | null;
  /**
   * The guest powered itself off (its boot script's last step): true, false (someone or something
   * else stopped it), or null when the cloud does not tell.
   */
  selfStopped: boolean | null;
  /** The shape it runs as. */
  shape: string | null;
  startedAtMs: number | null;
  endedAtMs: number | null;
  /** The cloud's words for its state (for messages): "terminated (Client.UserInitiatedShutdown)". */
  detail: string;
  /** Ended at launch for lack of capacity (e.g. EC2's Server.InsufficientInstanceCapacity). */
  launchCapacity?: boolean;
  /** Cloud-specific attributes for details() (an availability zone, a numeric id). */
  attrs?: Readonly<Record<string, string>>;
}

/** Which console to read: the VM, and the request whose reports it should show. */
export interface ConsoleRef {
  scope: string;
  key: string;
  id: string;
  region: string;
  requestId: string;
}

/** One create attempt: the grant in one shape at one placement. */
export interface CreateRequest {
  grant: ComputeGrant;
  envelope: Envelope;
  /** The rendered boot script (common/cloud-init.ts), before the cloud's own encoding. */
  script: string;
  shape: Shape;
  /** One of placements(): an EC2 region, a GCE zone, an Azure location. */
  placement: string;
  /** Wall time (on the backend's clock) by which the VM must be running: launch_timeout_seconds. */
  deadlineMs: number;
}

/** A resource of this bridge found by the orphan sweep. */
export interface OwnedResource {
  /** "instance", "vm", "nic", "public_ip", "disk": the kind the metrics count. */
  kind: string;
  /** Where it lives (an EC2 region, a GCE zone, an Azure resource group). */
  scope: string;
  /** Its id or name there. */
  id: string;
  /** Whose it is: ownerKey(request_id) of its request; undefined when it names none. */
  owner: string | undefined;
  /** The exact request id, when the resource carries it. */
  requestId: string | undefined;
  createdMs: number | null;
  /** Already on its way out: left alone. */
  going?: boolean;
}

export interface CloudAdapter {
  /** The backend's name: "aws", "gcp", "azure". */
  readonly name: string;
  readonly settings: CloudSettings;
  /** The login user the guest's boot script creates. */
  readonly sshUser: string;
  /** Regions (the grant's `region`) the backend serves. */
  regions(): string[];
  /** Shapes for plain grants and for TDX grants, in preference order before size sorting. */
  readonly plainShapes: readonly Shape[];
  readonly tdxShapes: readonly Shape[];
  /**
   * The shapes a grant may use, cheapest kind first (e.g. plain before confidential); the core
   * keeps those that fit, smallest first within each kind.
   */
  pool(grant: ComputeGrant): Shape[][];
  /** Where in the region to try a shape, in order (GCE zones); usually just [region]. */
  placements(region: string, shape: Shape): string[];
  /**
   * For TDX grants: the platform the evidence is recorded under, and how the guest produces it
   * (a configfs-tsm TD quote, or a vTPM chain); null: the cloud has no TDX.
   */
  readonly evidence: { platform: EvidencePlatform; guest: GuestAttestation } | null;
  /**
   * The cloud's own limits on the boot script (size, encoding), checked before anything billable
   * exists: throws InvalidRequestError when the script cannot be handed over.
   */
  checkBootScript(script: string): void;
  /** Set while the cloud refuses the bridge's credentials: new grants are declined meanwhile. */
  credentialProblem(): string | null;

  /**
   * The VM each request has from an earlier call (the live one first; absent: none), for many
   * requests at once: a restart asks for every resumed grant in the same turn.
   */
  find(region: string, requestIds: readonly string[]): Promise<ReadonlyMap<string, VmStatus>>;
  /**
   * Take over what an earlier call created (e.g. replay its create to see its outcome). Throws a
   * TransientError while the VM is busy (being stopped or deleted).
   */
  adopt(found: VmStatus, req: Omit<CreateRequest, "shape" | "placement">, signal: AbortSignal): Promise<VmStatus>;
  /**
   * Create the VM (idempotently: a retried call with the same request never makes a second one).
   * CapacityError (with the offering): no capacity for this shape here, try the next placement or
   * shape; QuotaError and UnfitError: no other shape or placement helps, fail over; SkipShapeError:
   * this shape cannot be used for this request, try the next.
   */
  create(req: CreateRequest, signal: AbortSignal): Promise<VmStatus>;
  /** The (scope, key) to watch a provisioned instance by; null: look it up by request. */
  ref(instance: ProvisionedInstance): { scope: string; key: string } | null;
  /** One batched status call for many VMs of one scope; `phase` says which poller asks. */
  describe(scope: string, keys: readonly string[], signal: AbortSignal, phase: "launch" | "exit"): Promise<ReadonlyMap<string, VmStatus>>;
  /**
   * The VM's serial console text. `live`: the current output (host key, evidence) rather than
   * what the cloud posted after the VM stopped. Throws ConsoleUnavailableError when it can never
   * be read, NotFoundError when the VM is gone.
   */
  readConsole(ref: ConsoleRef, signal: AbortSignal, live: boolean): Promise<string>;
  /** How long to keep reading the console of a stopped VM for its exit marker (the cloud's lag). */
  markerGraceMs(st: VmStatus): number;
  /** The backend-specific part of ProvisionedInstance.details. */
  details(grant: ComputeGrant, st: VmStatus): Record<string, string>;
  /** Delete everything billable of the request; resolves once the cloud confirms. */
  terminate(instance: ProvisionedInstance): Promise<void>;
  /** The owner key of a request id as the cloud's resources carry it (a tag, a hashed label). */
  ownerKey(requestId: string): string;
  /** Every resource this bridge owns in the cloud (orphan sweep), read-only. */
  listOwned(): Promise<OwnedResource[]>;
  /** Delete orphans; returns the failures ("what: why"). */
  deleteOrphans(orphans: readonly OwnedResource[]): Promise<{ deleted: OwnedResource[]; failures: string[] }>;
  /** A poll or call failure as a typed error, for logs. */
  mapError(e: unknown, what: string): BackendError;
  /** doctor: read-only checks. */
  check(): Promise<CheckResult[]>;
  /** Whether the cloud SDK has been loaded (it is loaded on first use only). */
  sdkLoaded(): boolean;
  close(): Promise<void>;
}

/** No shape or placement of this backend can run the grant (e.g. an image without TDX support): fail over at once. */
export class UnfitError extends CapacityError {}

/** This shape cannot be used for this request (not a statement about capacity): try the next shape. */
export class SkipShapeError extends BackendError {}
