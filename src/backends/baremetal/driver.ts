/**
 * The two ways a bare-metal machine runs a grant, behind one interface:
 *
 * - systemd-driver.ts: a systemd transient service per grant ("bundle" images);
 * - virsh-driver.ts: a libvirt guest per grant, Intel TDX trust domains included ("disk" images).
 *
 * The backend (../baremetal.ts) owns what does not depend on the mode: placement and capacity,
 * connections, the watch against valid_to, terminate bookkeeping, reconcile, doctor. It asks the
 * machine's driver (chosen once, from the machine's configured `mode`) for everything that does:
 * how a workload is named, provisioned, watched, listed and removed. Adding a mode is one driver.
 *
 * The helpers below are shared by both drivers: typed errors for a failed remote step, result
 * markers, the ProvisionedInstance they return.
 */
import type { BareMetalConfig, BareMetalMachine } from "../../config/schema.js";
import { RequestId } from "../../domain/grant.js";
import type { Almanac, ComputeGrant, Envelope, ExitObservation, ProvisionedInstance } from "../../domain/index.js";
import type { Clock } from "../../util/clock.js";
import type { Logger } from "../../util/logger.js";
import { BackendError, ImageVerificationError, InvalidRequestError, TransientError } from "../backend.js";
import { EXIT } from "./scripts.js";
import { clip, type ExecResult, type SshConnection } from "./ssh-pool.js";
import { num, type Usage } from "./systemd.js";

export const BACKEND = "baremetal";
/** Bounds on remote commands. */
export const FETCH_TIMEOUT_MS = 30 * 60_000;
export const COMMAND_TIMEOUT_MS = 60_000;
export const TERMINATE_TIMEOUT_MS = 3 * 60_000;

/** A configured machine, its kept SSH connection and its driver. */
export interface Machine {
  cfg: BareMetalMachine;
  conn: SshConnection;
  /** `<work_dir>/runs` and `<work_dir>/images` on the machine. */
  runs: string;
  images: string;
  driver: BaremetalDriver;
}

/** Capacity the backend holds for a grant on a machine. */
export interface Allocation {
  machine: string;
  cpu: number;
  ram: number;
  /** The start command may have reached the machine: only terminate releases it. */
  started: boolean;
}

/** What the backend lends its drivers. */
export interface DriverContext {
  cfg: BareMetalConfig;
  providerId: string;
  clock: Clock;
  almanac: Almanac;
  log: Logger;
  /** A configured machine by name (status polls are batched per machine). */
  machine(name: string): Machine;
}

export interface ProvisionRequest {
  grant: ComputeGrant;
  envelope: Envelope;
  /** The image's sha256, 64 lowercase hex characters (validated). */
  sha: string;
  /** The image URL, http(s) only, WHATWG-normalized (validated). */
  url: string;
  /** The grant's capacity on the machine; the driver sets `started` once the start command may have reached it. */
  alloc: Allocation;
  signal: AbortSignal;
}

export interface BaremetalDriver {
  /** The `mode` of the machines it serves. */
  readonly mode: BareMetalMachine["mode"];
  /** The image format it runs. */
  readonly imageFormat: Envelope["image"]["format"];
  /** Whether it can run TDX grants at all (the machine must be tdx_capable as well). */
  readonly runsTdx: boolean;
  /** What a workload is called in orphan records and metrics ("unit", "domain"). */
  readonly workloadKind: string;
  /** The workload's name on the machine, derived from the request id: the idempotency key. */
  workloadName(requestId: string): string;
  /** Fetch and verify the image, create and start the workload (or adopt the existing one). */
  provision(m: Machine, req: ProvisionRequest): Promise<ProvisionedInstance>;
  /**
   * Until the workload ends: its exit observation. `signal` also fires at valid_to (the backend
   * turns that into "expired"); `callerSignal` is the caller's alone, for the final reads.
   */
  watch(m: Machine, id: string, validToMs: number, signal: AbortSignal, callerSignal: AbortSignal): Promise<ExitObservation>;
  /** One direct status read (not batched): has the workload ended, with a recorded end? */
  endedNow(m: Machine, id: string, signal: AbortSignal): Promise<boolean>;
  /** CPU / memory sampled while the grant is watched here. */
  usage(m: Machine, id: string): Usage | undefined;
  /** Drop what is kept for a grant that is gone. */
  forget(m: Machine, id: string): void;
  /** The script that stops and removes the workload and its run directory; prints CB-TERMINATED. */
  terminateCommand(m: Machine, id: string): string;
  /** The script that lists workloads and run directories for reconcile (scripts.ts, LIST_RUNS). */
  listCommand(m: Machine, workDir: string): string;
  /** The request id of a live workload in one listing line (split on blanks), or null. */
  listedWorkload(fields: readonly string[]): string | null;
  close(): void;
}

export const isRequestId = (s: string) => RequestId.safeParse(s).success;

/**
 * Whole seconds until valid_to by the bridge's clock, never early and at least 1: the host's own
 * deadline for a workload (RuntimeMaxSec= in systemd mode, the cb-deadline unit in virsh mode).
 */
export function secondsLeft(ctx: DriverContext, grant: ComputeGrant): number {
  return Math.max(1, Math.ceil((ctx.almanac.toWallMs(grant.valid_to) - ctx.clock.now()) / 1000));
}

export function usageKey(m: Machine, name: string): string {
  return `${m.cfg.name}\0${name}`;
}

/** Sampled usage as ComputeLog figures (null: never measured). */
export function usageFigures(u: Usage | undefined): { cpu_seconds: number | null; peak_memory_mib: number | null } {
  return {
    cpu_seconds: u?.cpuNs != null ? Math.round(u.cpuNs / 1e6) / 1000 : null,
    peak_memory_mib: u?.memBytes != null ? Math.round((u.memBytes / 1048576) * 100) / 100 : null,
  };
}

export function instanceOf(ctx: DriverContext, m: Machine, grant: ComputeGrant, startedSec: string | undefined, details: Record<string, string>): ProvisionedInstance {
  const sec = num(startedSec);
  return {
    request_id: grant.request_id,
    backend: BACKEND,
    instance_id: `${m.cfg.name}/${m.driver.workloadName(grant.request_id)}`,
    region: m.cfg.region,
    host: null,
    ssh_port: null,
    ssh_user: null,
    host_key_sha256: null,
    started_at: new Date(sec !== null && sec > 0 ? sec * 1000 : ctx.clock.now()).toISOString(),
    cpu_millicores: grant.cpu_millicores,
    ram_mib: grant.ram_mib,
    details: { machine: m.cfg.name, ...details },
    attestation: null,
  };
}

export function execError(e: unknown, m: Machine, op: string): unknown {
  if (e instanceof BackendError || (e instanceof Error && e.name === "AbortError")) return e;
  return new BackendError(`machine ${m.cfg.name}: ${op} failed: ${(e as Error).message}`, BACKEND, { cause: e });
}

/**
 * A typed error for a failed provision step. Remote output is clipped and scrubbed of the
 * envelope's env values and command words (a tool may echo them; they can be tenant secrets).
 */
export function provisionError(m: Machine, r: ExecResult, envelope: Envelope): BackendError {
  const msg = clip(scrub(r.stderr, envelope)) || clip(scrub(r.stdout, envelope)) || `exit ${r.code ?? r.signal}`;
  const on = `machine ${m.cfg.name}: `;
  switch (r.code) {
    case EXIT.mismatch:
      return new ImageVerificationError(msg, BACKEND);
    case EXIT.fetch:
    case EXIT.tool:
    case EXIT.locked:
      return new TransientError(on + msg, BACKEND);
    case EXIT.tooLarge:
    case EXIT.stopOrUnpack:
    case EXIT.notFoundOrUndefine:
    case EXIT.qemuImg:
      return new InvalidRequestError(msg, BACKEND);
    default:
      return new BackendError(on + msg, BACKEND);
  }
}

function scrub(msg: string, envelope: Envelope): string {
  const secrets = [...Object.values(envelope.env ?? {}), ...(envelope.command ?? []).slice(1)]
    .filter((v) => v.length >= 4)
    .sort((a, b) => b.length - a.length);
  let out = msg;
  for (const v of secrets) if (out.includes(v)) out = out.split(v).join("[REDACTED]");
  return out;
}

/** The last line of `s` matching `re` (the scripts print their result marker last). */
export function marker(s: string, re: RegExp): RegExpExecArray | null {
  let found: RegExpExecArray | null = null;
  for (const line of s.split("\n")) found = re.exec(line.trim()) ?? found;
  return found;
}

/** A failure our script reported itself (before or instead of creating the workload). */
export function definitive(r: ExecResult): boolean {
  return r.code !== null && r.code !== 0 && (Object.values(EXIT) as number[]).includes(r.code);
}
