/**
 * The EC2 adapter of the shared VM backend (cloud/vm-backend.ts): one on-demand instance per
 * grant, in the grant's region.
 *
 * - create: RunInstances with a ClientToken derived from (provider id, request_id, instance
 *   type): EC2 binds a token to the parameters of the call that used it, also a failed one, so one
 *   token per shape keeps every attempt retryable and a retry never creates a second instance.
 *   Tags `${tag_prefix}:bridge-id` / `:request-id`; InstanceInitiatedShutdownBehavior=terminate;
 *   user data = the boot script, gzip-compressed when it would not fit 16 KiB.
 * - status: DescribeInstances by instance id while booting, by the bridge tag (paged 1000 at a
 *   time) while running; the console is GetConsoleOutput (Latest=true for a running guest, Nitro
 *   types only; EC2 keeps the last 64 KB).
 * - terminate: by instance id, or the request's instances found by tag (aws/api.ts waits out EC2's
 *   eventual consistency before an instance counts as terminated).
 * - SDK, credentials, pacing to EC2's request and resource buckets, metrics: aws/api.ts.
 */
import { createHash } from "node:crypto";
import { gzipSync } from "node:zlib";
import type { Instance, RunInstancesCommandInput } from "@aws-sdk/client-ec2";
import type { AwsConfig } from "../../config/schema.js";
import type { ComputeGrant, ProvisionedInstance } from "../../domain/index.js";
import { isAbort, type Clock } from "../../util/clock.js";
import type { Logger } from "../../util/logger.js";
import { BackendError, InvalidRequestError, type BackendContext, type CheckResult } from "../backend.js";
import { parseHostKey } from "../common/cloud-init.js";
import { ConsoleUnavailableError } from "../common/ssh-ready.js";
import { SkipShapeError, type CloudAdapter, type CloudSettings, type ConsoleRef, type CreateRequest, type OwnedResource, type Shape, type VmStatus } from "../cloud/adapter.js";
import { AWS_FAMILIES, AWS_INSTANCE_TYPES } from "./instance-types.js";
import { Ec2Api, type Ec2ApiOptions } from "./api.js";
import { clean, errorCode, errorMessage, LATEST_UNSUPPORTED_CODES } from "./errors.js";

/** Overrides for tests and benchmarks; production takes everything from the config. */
export interface Ec2AdapterOptions extends Ec2ApiOptions {
  /** How long to keep reading the console of a self-powered-off instance for its marker. Default 120 s. */
  consoleGraceMs?: number;
}

interface Ec2Status {
  id: string;
  state: string;
  host: string | undefined;
  reasonCode: string | undefined;
  reason: string;
  transition: string | undefined;
  launchTime: Date | undefined;
  instanceType: string | undefined;
  availabilityZone: string | undefined;
  requestId: string | undefined;
}


const ENDED = new Set(["shutting-down", "terminated", "stopping", "stopped"]);
const SELF_SHUTDOWN = "Client.InstanceInitiatedShutdown";
/** GetConsoleOutput returns only the most recent 64 KB of console output. */
const CONSOLE_WINDOW_BYTES = 64 * 1024;
/** EC2 takes at most 16 KiB of user data (before base64). */
const USER_DATA_LIMIT = 16 * 1024;
const FILTER_VALUES_MAX = 200;
const TERMINATE_BATCH = 100;


/**
 * ClientToken: at most 64 ASCII characters, stable per (provider id, request_id, instance type).
 * EC2 keeps a token bound to the parameters of the call that used it, also when that call failed
 * (another type with the same token answers IdempotentParameterMismatch), so each shape has its own.
 */
export function ec2ClientToken(providerId: string, requestId: string, instanceType: string): string {
  return createHash("sha256").update(`compute-bridge\u0000${providerId}\u0000${requestId}\u0000${instanceType}`).digest("hex");
}

export class Ec2Adapter implements CloudAdapter {
  readonly name = "aws";
  readonly settings: CloudSettings;
  readonly sshUser: string;
  readonly evidence = null;
  readonly plainShapes: readonly Shape[];
  readonly tdxShapes: readonly Shape[] = [];
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly providerId: string;
  private readonly bridgeTag: string;
  private readonly requestTag: string;
  private readonly api: Ec2Api;

  constructor(
    private readonly cfg: AwsConfig,
    ctx: BackendContext,
    private readonly opts: Ec2AdapterOptions & { pollIntervalMs?: number } = {},
  ) {
    this.log = ctx.log.child({ backend: this.name });
    this.clock = ctx.clock;
    this.providerId = ctx.providerId;
    if (/^aws($|:)/i.test(cfg.tag_prefix)) throw new BackendError(`backends.aws.tag_prefix: "${cfg.tag_prefix}" is reserved by AWS (tag keys may not start with "aws:")`, this.name);
    this.bridgeTag = `${cfg.tag_prefix}:bridge-id`;
    this.requestTag = `${cfg.tag_prefix}:request-id`;
    const unknown = cfg.instance_types.filter((t) => !AWS_INSTANCE_TYPES[t]);
    if (unknown.length > 0)
      throw new BackendError(
        `backends.aws.instance_types: ${unknown.map((t) => `"${t}"`).join(", ")} ${unknown.length === 1 ? "is" : "are"} not in compute-bridge's instance type table (vCPUs and memory unknown); supported families: ${AWS_FAMILIES.join(", ")}`,
        this.name,
      );
    this.plainShapes = [...new Set(cfg.instance_types)].map((name) => ({ name, ...AWS_INSTANCE_TYPES[name]! }));
    this.settings = { ...cfg, ...(opts.pollIntervalMs !== undefined ? { poll_interval_seconds: opts.pollIntervalMs / 1000 } : {}) };
    this.sshUser = cfg.ssh_user;
    this.api = new Ec2Api(cfg, ctx, opts);
  }

  regions(): string[] {
    return Object.keys(this.cfg.regions);
  }
  pool(): Shape[][] {
    return [[...this.plainShapes]];
  }
  placements(region: string): string[] {
    return [region];
  }
  credentialProblem(): string | null {
    return this.api.refused;
  }
  sdkLoaded(): boolean {
    return this.api.loaded;
  }
  ownerKey(requestId: string): string {
    return requestId;
  }
  markerGraceMs(st: VmStatus): number {
    // EC2 posts console output shortly after a shutdown: keep looking a while when the guest powered off itself.
    return st.selfStopped ? (this.opts.consoleGraceMs ?? 120_000) : 0;
  }

  checkBootScript(script: string): void {
    this.userData(script);
  }

  /** The user data, base64; gzip-compressed (cloud-init inflates it) when it would not fit. */
  private userData(script: string): string {
    let bytes = Buffer.from(script, "utf8");
    if (bytes.length > USER_DATA_LIMIT) bytes = gzipSync(bytes, { level: 9 });
    if (bytes.length > USER_DATA_LIMIT)
      throw new InvalidRequestError(`the envelope's command and env make ${bytes.length} bytes of EC2 user data even compressed; EC2 accepts at most ${USER_DATA_LIMIT}`, this.name);
    return bytes.toString("base64");
  }

  // ---- create / adopt ---------------------------------------------------------------------------

  async find(region: string, requestIds: readonly string[]): Promise<ReadonlyMap<string, VmStatus>> {
    const found = await this.describeFiltered(region, [
      { Name: `tag:${this.requestTag}`, Values: [...requestIds] },
      { Name: `tag:${this.bridgeTag}`, Values: [this.providerId] },
    ]);
    const out = new Map<string, VmStatus>();
    for (const rid of requestIds) {
      const all = found.filter((s) => s.requestId === rid);
      const byAge = (a: Ec2Status, b: Ec2Status) => (a.launchTime?.getTime() ?? 0) - (b.launchTime?.getTime() ?? 0);
      const live = all.filter((s) => !ENDED.has(s.state)).sort(byAge);
      if (live.length > 1) {
        // The ClientToken makes a second live instance impossible; one launched by hand with copied tags is terminated at once.
        const extra = live.slice(1).map((s) => s.id);
        this.log.error({ request_id: rid, region, adopted: live[0]!.id, instance_ids: extra }, "several live instances carry this request's tag; adopting the oldest and terminating the others");
        await this.api.terminate(region, extra);
      }
      const pick = live[0] ?? all.filter((s) => s.reasonCode === SELF_SHUTDOWN).sort(byAge).pop();
      if (pick) out.set(rid, this.view(region, pick));
    }
    return out;
  }

  async adopt(found: VmStatus): Promise<VmStatus> {
    return found;
  }

  async create(req: CreateRequest, signal: AbortSignal): Promise<VmStatus> {
    const { grant, shape } = req;
    const region = grant.region;
    const rcfg = this.cfg.regions[region]!;
    const token = ec2ClientToken(this.providerId, grant.request_id, shape.name);
    const input: RunInstancesCommandInput = {
      ImageId: rcfg.image_id,
      InstanceType: shape.name as RunInstancesCommandInput["InstanceType"],
      MinCount: 1,
      MaxCount: 1,
      ClientToken: token,
      SubnetId: rcfg.subnet_id,
      SecurityGroupIds: rcfg.security_group_ids,
      ...(rcfg.key_name !== undefined ? { KeyName: rcfg.key_name } : {}),
      UserData: this.userData(req.script),
      InstanceInitiatedShutdownBehavior: "terminate",
      MetadataOptions: { HttpTokens: "required", HttpEndpoint: "enabled" },
      // Instance tags only: the documented least-privilege policy allows CreateTags on instances at launch.
      TagSpecifications: [{ ResourceType: "instance", Tags: [{ Key: this.bridgeTag, Value: this.providerId }, { Key: this.requestTag, Value: grant.request_id }, { Key: "Name", Value: `compute-bridge ${grant.request_id}` }] }],
    };
    const { ec2: sdk } = await this.api.load();
    try {
      await this.api.pacer.take(region, "launched_instances", signal);
      const out = await this.api.send(region, "mutate", signal, (c, o) => c.send(new sdk.RunInstancesCommand(input), o));
      const inst = out.Instances?.[0];
      if (!inst?.InstanceId) throw new BackendError(`RunInstances in ${region} returned no instance`, this.name);
      this.log.info({ request_id: grant.request_id, instance_id: inst.InstanceId, region, instance_type: shape.name, attempts: out.$metadata.attempts ?? 1 }, "EC2 instance launched");
      return this.view(region, this.toStatus(inst));
    } catch (e) {
      if (isAbort(e, signal)) throw e;
      const code = errorCode(e);
      if (code !== "IdempotentParameterMismatch" && code !== "IdempotentInstanceTerminated") throw this.mapError(e, `EC2 RunInstances in ${region}`, { region, type: shape.name });
      // The token was used before: by a launch with other parameters (a config change across a
      // restart), or by an instance since terminated. Adopt that launch if EC2 still lists it; a
      // terminated one ends in the readiness wait with its state reason, never in a second launch.
      const prior = await this.describeFiltered(region, [{ Name: "client-token", Values: [token] }], signal);
      const pick = prior.find((s) => s.state !== "terminated") ?? prior[0];
      if (pick) {
        this.log.info({ request_id: grant.request_id, instance_id: pick.id, region, state: pick.state, code }, "adopting the instance launched earlier with this request's ClientToken");
        return this.view(region, pick);
      }
      if (code === "IdempotentInstanceTerminated")
        throw new BackendError(`EC2 RunInstances in ${region}: the instance launched earlier for this request as ${shape.name} was terminated and is no longer listed (IdempotentInstanceTerminated); not launching a second one`, this.name, { cause: e });
      throw new SkipShapeError(`this request's ClientToken for ${shape.name} is bound to an earlier call with other parameters that launched nothing (IdempotentParameterMismatch)`, this.name, { cause: e });
    }
  }

  details(grant: ComputeGrant, st: VmStatus): Record<string, string> {
    return {
      ...(st.shape ? { instance_type: st.shape } : {}),
      ...st.attrs,
      ...(st.shape ? { client_token: ec2ClientToken(this.providerId, grant.request_id, st.shape) } : {}),
    };
  }

  // ---- status -----------------------------------------------------------------------------------

  ref(instance: ProvisionedInstance): { scope: string; key: string } | null {
    return instance.instance_id ? { scope: instance.region, key: instance.instance_id } : null;
  }

  /**
   * Booting ids by instance-id filter (no NotFound for a not-yet-visible id). Running ones: every
   * instance of this bridge in the region that is not terminated, by tag, in pages of 1000, and the
   * ids that list misses (terminated since the last poll) by id in the same tick.
   */
  async describe(region: string, ids: readonly string[], signal: AbortSignal, phase: "launch" | "exit"): Promise<ReadonlyMap<string, VmStatus>> {
    const out = new Map<string, VmStatus>();
    if (phase === "exit") {
      const wanted = new Set(ids);
      const tagged = await this.describeFiltered(region, [
        { Name: `tag:${this.bridgeTag}`, Values: [this.providerId] },
        { Name: "instance-state-name", Values: ["pending", "running", "shutting-down", "stopping", "stopped"] },
      ], signal);
      for (const s of tagged) if (wanted.has(s.id)) out.set(s.id, this.view(region, s));
    }
    const rest = ids.filter((id) => !out.has(id));
    for (let i = 0; i < rest.length; i += FILTER_VALUES_MAX)
      for (const s of await this.describeFiltered(region, [{ Name: "instance-id", Values: rest.slice(i, i + FILTER_VALUES_MAX) }], signal)) out.set(s.id, this.view(region, s));
    return out;
  }

  /** GetConsoleOutput, base64-decoded; `live`: the current output (Nitro types only). */
  async readConsole(ref: ConsoleRef, signal: AbortSignal, live: boolean): Promise<string> {
    const region = ref.scope;
    const { ec2: sdk } = await this.api.load();
    let text: string;
    try {
      const out = await this.api.send(region, "console", signal, (c, o) => c.send(new sdk.GetConsoleOutputCommand({ InstanceId: ref.id, ...(live ? { Latest: true } : {}) }), o));
      text = out.Output ? Buffer.from(out.Output, "base64").toString("utf8") : "";
    } catch (e) {
      if (isAbort(e, signal)) throw e;
      if (live && LATEST_UNSUPPORTED_CODES.has(errorCode(e)))
        throw new ConsoleUnavailableError(`EC2 keeps no live console for ${ref.id} in ${region} (${errorCode(e)}: ${errorMessage(e)}); only Nitro instance types have one`);
      throw this.mapError(e, `EC2 GetConsoleOutput in ${region}`);
    }
    // EC2 keeps the last 64 KB only: a full live console without the host key report has scrolled past it.
    if (live && Buffer.byteLength(text) >= CONSOLE_WINDOW_BYTES && parseHostKey(text, ref.requestId) === null)
      throw new ConsoleUnavailableError(`the host key report has scrolled out of the last ${CONSOLE_WINDOW_BYTES / 1024} KB of console output EC2 keeps`);
    return text;
  }

  // ---- terminate / sweep --------------------------------------------------------------------------

  async terminate(instance: ProvisionedInstance): Promise<void> {
    const region = instance.region;
    if (!this.cfg.regions[region]) return;
    let ids: string[];
    if (instance.instance_id) ids = [instance.instance_id];
    else {
      // A placeholder: whatever a create call for this request left behind, found by tag.
      const found = await this.describeFiltered(region, [
        { Name: `tag:${this.requestTag}`, Values: [instance.request_id] },
        { Name: `tag:${this.bridgeTag}`, Values: [this.providerId] },
      ]);
      ids = found.filter((s) => s.state !== "terminated" && s.state !== "shutting-down").map((s) => s.id);
    }
    if (ids.length === 0) return;
    const launched = Date.parse(instance.started_at);
    await this.api.terminate(region, ids, instance.instance_id && Number.isFinite(launched) ? launched : undefined);
  }

  async listOwned(): Promise<OwnedResource[]> {
    const out: OwnedResource[] = [];
    for (const region of Object.keys(this.cfg.regions).sort()) {
      const mine = await this.describeFiltered(region, [
        { Name: `tag:${this.bridgeTag}`, Values: [this.providerId] },
        { Name: "instance-state-name", Values: ["pending", "running", "stopping", "stopped"] },
      ]);
      for (const s of mine) out.push({ kind: "instance", scope: region, id: s.id, owner: s.requestId, requestId: s.requestId, createdMs: s.launchTime?.getTime() ?? null });
    }
    return out;
  }

  async deleteOrphans(orphans: readonly OwnedResource[]): Promise<{ deleted: OwnedResource[]; failures: string[] }> {
    const deleted: OwnedResource[] = [];
    const failures: string[] = [];
    const byRegion = new Map<string, OwnedResource[]>();
    for (const o of orphans) byRegion.set(o.scope, [...(byRegion.get(o.scope) ?? []), o]);
    for (const [region, list] of byRegion)
      for (let i = 0; i < list.length; i += TERMINATE_BATCH) {
        const batch = list.slice(i, i + TERMINATE_BATCH);
        try {
          await this.api.terminate(region, batch.map((o) => o.id));
          deleted.push(...batch);
        } catch (e) {
          failures.push(`${region}: ${this.mapError(e, `EC2 TerminateInstances in ${region}`).message}`);
        }
      }
    return { deleted, failures };
  }

  /** doctor: credentials and reachability per region, read-only (one DescribeInstances each). */
  async check(): Promise<CheckResult[]> {
    const out: CheckResult[] = [];
    for (const region of Object.keys(this.cfg.regions).sort()) {
      const what = `credentials and DescribeInstances in ${region}`;
      try {
        const mine = await this.describeFiltered(region, [{ Name: `tag:${this.bridgeTag}`, Values: [this.providerId] }]);
        out.push({ check: what, ok: true, detail: `${mine.length} instance${mine.length === 1 ? "" : "s"} tagged ${this.bridgeTag}=${this.providerId}` });
      } catch (e) {
        out.push({ check: what, ok: false, detail: this.mapError(e, `EC2 DescribeInstances in ${region}`).message });
      }
    }
    return out;
  }

  close(): Promise<void> {
    return this.api.close();
  }

  mapError(e: unknown, where: string, offering?: { region: string; type: string }): BackendError {
    return this.api.mapError(e, where, offering);
  }

  // ---- describe -----------------------------------------------------------------------------------

  private async describeFiltered(region: string, filters: { Name: string; Values: string[] }[], signal?: AbortSignal): Promise<Ec2Status[]> {
    return (await this.api.describe(region, filters, signal)).map((i) => this.toStatus(i));
  }

  private toStatus(i: Instance): Ec2Status {
    return {
      id: i.InstanceId ?? "",
      state: i.State?.Name ?? "unknown",
      host: i.PublicIpAddress || i.PrivateIpAddress || undefined,
      reasonCode: i.StateReason?.Code || undefined,
      reason: i.StateReason?.Message || i.StateTransitionReason || "no reason given",
      transition: i.StateTransitionReason || undefined,
      launchTime: i.LaunchTime,
      instanceType: i.InstanceType,
      availabilityZone: i.Placement?.AvailabilityZone,
      requestId: i.Tags?.find((t) => t.Key === this.requestTag)?.Value,
    };
  }

  private view(region: string, s: Ec2Status): VmStatus {
    return {
      id: s.id,
      scope: region,
      key: s.id,
      phase: s.state === "pending" ? "starting" : s.state === "running" ? "running" : ENDED.has(s.state) ? "stopped" : "starting",
      host: s.host ?? null,
      selfStopped: s.reasonCode === SELF_SHUTDOWN,
      shape: s.instanceType ?? null,
      startedAtMs: s.launchTime?.getTime() ?? null,
      endedAtMs: transitionTime(s.transition),
      detail: `${s.state} (${clean(s.reason)})`,
      launchCapacity: s.reasonCode?.includes("InsufficientInstanceCapacity") === true,
      ...(s.availabilityZone ? { attrs: { availability_zone: s.availabilityZone } } : {}),
    };
  }
}

/** "User initiated (2024-01-01 00:00:00 GMT)" -> epoch ms, if present. */
function transitionTime(reason: string | undefined): number | null {
  const m = reason ? /\((\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2}) GMT\)/.exec(reason) : null;
  if (!m) return null;
  const t = Date.parse(`${m[1]}T${m[2]}Z`);
  return Number.isFinite(t) ? t : null;
}
