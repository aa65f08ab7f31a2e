/**
 * EC2 API access for the EC2 adapter: the SDK (~0.4 s to import) loaded on first use, one client
 * per region with static keys or the named profile (never default credential discovery), the
 * client-side pacing to EC2's request and resource buckets, metrics of every attempt, and the
 * credential-refusal flag canSatisfy consults.
 */
import type { DescribeInstancesCommandOutput, EC2Client, Instance } from "@aws-sdk/client-ec2";
import type { RetryStrategyV2 } from "@smithy/types";
import type { AwsConfig } from "../../config/schema.js";
import { readSecret } from "../../config/secrets.js";
import { isAbort, type Clock } from "../../util/clock.js";
import type { Logger } from "../../util/logger.js";
import { BackendError, CredentialError, TransientError, type BackendContext, type BackendMetrics } from "../backend.js";
import { RateLimiter } from "../common/token-bucket.js";
import { errorCode, errorMessage, FailFastRetry, isCredentialCode, mapEc2Error, THROTTLE_CODES } from "./errors.js";

/** EC2's request-rate classes, and its resource buckets (one token per instance launched or terminated). */
export type ApiClass = "describe" | "mutate" | "console" | "launched_instances" | "terminated_instances";
const API_CLASS: Readonly<Record<string, ApiClass>> = { DescribeInstancesCommand: "describe", RunInstancesCommand: "mutate", TerminateInstancesCommand: "mutate", GetConsoleOutputCommand: "console" };
const apiClass = (commandName: string | undefined): ApiClass => API_CLASS[commandName ?? ""] ?? "mutate";
const MAX_PAGES = 1000;
/** How long after launch an InvalidInstanceID.NotFound may only mean "not visible yet" (EC2 API reference, "Eventual consistency"). */
const CONSISTENCY_WINDOW_MS = 5 * 60_000;
/** TerminateInstances tries on NotFound within that window (1, 2, 4, 8, 10 s apart). */
const NOT_FOUND_TRIES = 6;

export type Ec2Sdk = typeof import("@aws-sdk/client-ec2");
type RetrySdk = typeof import("@smithy/core/retry");

export interface Ec2ApiOptions {
  /** SDK attempts per call (1 + retries). Default 5. */
  maxAttempts?: number;
  /** SDK retry strategy per regional client; default the SDK's adaptive strategy. */
  retryStrategy?: () => RetryStrategyV2;
  /** Pause between the checks that a termination took (default 1 s). */
  confirmPollMs?: number;
}

export class Ec2Api {
  private readonly name = "aws";
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly metrics: BackendMetrics | undefined;
  private readonly usesKeys: boolean;
  private readonly configDir: string;
  private keys: { accessKeyId: string; secretAccessKey: string } | null = null;
  private readonly clients = new Map<string, Promise<EC2Client>>();
  readonly pacer: RateLimiter<ApiClass>;
  private sdk: Promise<{ ec2: Ec2Sdk; retry: RetrySdk }> | null = null;
  loaded = false;
  /** Set while EC2 refuses the bridge's credentials. */
  refused: string | null = null;
  private closed = false;

  constructor(
    private readonly cfg: AwsConfig,
    ctx: BackendContext,
    private readonly opts: Ec2ApiOptions = {},
  ) {
    this.log = ctx.log.child({ backend: this.name });
    this.clock = ctx.clock;
    this.metrics = ctx.metrics;
    // Credentials are read on first use: check-config and card build backends offline.
    this.usesKeys = cfg.access_key_id_file !== undefined || cfg.access_key_id_env !== undefined;
    this.configDir = ctx.configDir;
    this.pacer = new RateLimiter<ApiClass>(cfg.rate_limits, ctx.clock);
  }

  async close(): Promise<void> {
    this.closed = true;
    const clients = [...this.clients.values()];
    this.clients.clear();
    for (const c of await Promise.allSettled(clients)) if (c.status === "fulfilled") c.value.destroy();
  }

  /** An SDK exception as a typed BackendError naming the call and the config keys to check. */
  mapError(e: unknown, where: string, offering?: { region: string; type: string }): BackendError {
    return mapEc2Error(e, where.startsWith("EC2") ? where : `EC2 ${where}`, this.name, this.usesKeys ? "backends.aws access_key_id_file/secret_access_key_file" : `backends.aws profile "${this.cfg.profile}"`, offering);
  }

  /** DescribeInstances with filters, paged (AWS advises against unpaginated calls). */
  async describe(region: string, filters: { Name: string; Values: string[] }[], signal?: AbortSignal): Promise<Instance[]> {
    const { ec2: sdk } = await this.load();
    const out: Instance[] = [];
    let token: string | undefined;
    for (let page = 0; page < MAX_PAGES; page++) {
      let res: DescribeInstancesCommandOutput;
      try {
        res = await this.send(region, "describe", signal, (c, o) => c.send(new sdk.DescribeInstancesCommand({ Filters: filters, MaxResults: 1000, ...(token ? { NextToken: token } : {}) }), o));
      } catch (e) {
        if (isAbort(e, signal)) throw e;
        throw this.mapError(e, `EC2 DescribeInstances in ${region}`);
      }
      for (const r of res.Reservations ?? []) for (const i of r.Instances ?? []) if (i.InstanceId) out.push(i);
      token = res.NextToken || undefined;
      if (!token) break;
    }
    return out;
  }

  /**
   * One SDK call, paced: a token of the (region, API class) bucket first (waiting in order, or
   * until `signal` aborts). SDK retries take theirs in the client's pacing middleware. A refusal of
   * the credentials is remembered (canSatisfy declines) until a call succeeds.
   */
  async send<T>(region: string, cls: ApiClass, signal: AbortSignal | undefined, call: (c: EC2Client, opts: { abortSignal?: AbortSignal }) => Promise<T>): Promise<T> {
    const client = await this.client(region);
    await this.pacer.take(region, cls, signal);
    try {
      const r = await call(client, signal ? { abortSignal: signal } : {});
      this.refused = null;
      return r;
    } catch (e) {
      if (isCredentialCode(errorCode(e))) {
        if (this.refused === null) this.log.error({ region, code: errorCode(e) }, "EC2 refused the bridge's credentials; new grants are declined until a call succeeds");
        this.refused = errorMessage(e);
      }
      throw e;
    }
  }

  load(): Promise<{ ec2: Ec2Sdk; retry: RetrySdk }> {
    this.sdk ??= Promise.all([import("@aws-sdk/client-ec2"), import("@smithy/core/retry")]).then(([ec2, retry]) => {
      this.loaded = true;
      return { ec2, retry };
    });
    return this.sdk;
  }

  private client(region: string): Promise<EC2Client> {
    if (this.closed) return Promise.reject(new BackendError("the aws backend is closed", this.name));
    let c = this.clients.get(region);
    if (!c) {
      c = this.createClient(region);
      this.clients.set(region, c);
      c.catch(() => this.clients.delete(region));
    }
    return c;
  }

  private async createClient(region: string): Promise<EC2Client> {
    const { ec2: sdk, retry } = await this.load();
    let credentials;
    if (this.usesKeys) credentials = this.readKeys();
    else credentials = (await import("@aws-sdk/credential-provider-ini")).fromIni({ profile: this.cfg.profile! });
    const maxAttempts = this.opts.maxAttempts ?? 5;
    const client = new sdk.EC2Client({
      region,
      ...(this.cfg.endpoint !== undefined ? { endpoint: this.cfg.endpoint } : {}),
      credentials,
      maxAttempts,
      retryStrategy: new FailFastRetry(this.opts.retryStrategy?.() ?? new retry.AdaptiveRetryStrategy(maxAttempts)),
      requestHandler: { connectionTimeout: 10_000, requestTimeout: 60_000 },
    });
    // Every attempt (inside the retry loop): pacing of the SDK's own retries (the first attempt took
    // its token in send()), the cloud's word that we went too fast (that bucket is emptied for a
    // refill interval), and the metrics (API calls, retries, throttles) with the parsed error code.
    const metrics = this.metrics;
    client.middlewareStack.add(
      (next, context) => async (args) => {
        const cls = apiClass(context.commandName);
        const op = (context.commandName ?? "unknown").replace(/Command$/, "");
        const header = (args.request as { headers?: Record<string, string> } | undefined)?.headers?.["amz-sdk-request"] ?? "";
        const attempt = Number(/attempt=(\d+)/.exec(header)?.[1] ?? "1");
        if (attempt > 1) {
          metrics?.retry(this.name, op);
          await this.pacer.take(region, cls);
        }
        try {
          const r = await next(args);
          metrics?.apiCall(this.name, op, "ok");
          return r;
        } catch (e) {
          const code = errorCode(e);
          metrics?.apiCall(this.name, op, code);
          if (THROTTLE_CODES.has(code)) {
            metrics?.throttled(this.name, op);
            this.pacer.throttled(region, cls);
          }
          throw e;
        }
      },
      { step: "deserialize", priority: "high", name: "computeBridgePacing" },
    );
    return client;
  }

  /** The static keys, read once (readSecret registers them for log redaction). */
  private readKeys(): { accessKeyId: string; secretAccessKey: string } {
    if (this.keys) return this.keys;
    try {
      this.keys = {
        accessKeyId: readSecret(this.configDir, "backends.aws.access_key_id", { file: this.cfg.access_key_id_file, env: this.cfg.access_key_id_env }),
        secretAccessKey: readSecret(this.configDir, "backends.aws.secret_access_key", { file: this.cfg.secret_access_key_file, env: this.cfg.secret_access_key_env }),
      };
    } catch (e) {
      throw new CredentialError(e instanceof Error ? e.message : String(e), this.name, { cause: e });
    }
    return this.keys;
  }

  /**
   * TerminateInstances, then make sure EC2 reports every id shutting-down or terminated.
   * `launchedAtMs` (one id): NotFound within CONSISTENCY_WINDOW_MS of it may be eventual
   * consistency (the instance exists and bills), so it is asked again with backoff and, if still
   * not listed, reported as a retryable error rather than as terminated.
   */
  async terminate(region: string, ids: string[], launchedAtMs?: number): Promise<void> {
    const { ec2: sdk } = await this.load();
    let unconfirmed: string[] = ids;
    for (let tries = 1; ; tries++) {
      try {
        for (const _ of ids) await this.pacer.take(region, "terminated_instances");
        const out = await this.send(region, "mutate", undefined, (c) => c.send(new sdk.TerminateInstancesCommand({ InstanceIds: ids })));
        const ok = new Set((out.TerminatingInstances ?? []).filter((t) => t.CurrentState?.Name === "shutting-down" || t.CurrentState?.Name === "terminated").map((t) => t.InstanceId));
        unconfirmed = ids.filter((id) => !ok.has(id));
        break;
      } catch (e) {
        const code = errorCode(e);
        if (code === "InvalidInstanceID.Malformed" && ids.length === 1) return; // never existed
        if (code !== "InvalidInstanceID.NotFound") throw this.mapError(e, `EC2 TerminateInstances in ${region}`);
        if (ids.length > 1) {
          for (const id of ids) await this.terminate(region, [id], launchedAtMs);
          return;
        }
        const age = launchedAtMs === undefined ? Number.POSITIVE_INFINITY : this.clock.now() - launchedAtMs;
        if (age >= CONSISTENCY_WINDOW_MS) return; // gone: terminated over an hour ago, or never existed
        if (tries >= NOT_FOUND_TRIES)
          throw new TransientError(`EC2 does not list instance ${ids[0]} in ${region} yet (launched ${Math.round(age / 1000)} s ago; eventual consistency): its termination is retried`, this.name);
        this.log.info({ region, instance_id: ids[0], tries, age_s: Math.round(age / 1000) }, "TerminateInstances: instance not visible yet (eventual consistency); asking again");
        await this.clock.sleep(Math.min(1000 * 2 ** (tries - 1), 10_000));
      }
    }
    // Not confirmed in the reply: look again a few times before reporting failure (the manager retries).
    for (let i = 0; unconfirmed.length > 0 && i < 5; i++) {
      await this.clock.sleep(this.opts.confirmPollMs ?? 1000);
      const seen = new Map((await this.describe(region, [{ Name: "instance-id", Values: unconfirmed }])).map((i) => [i.InstanceId, i.State?.Name ?? "unknown"]));
      unconfirmed = unconfirmed.filter((id) => seen.has(id) && !["shutting-down", "terminated"].includes(seen.get(id)!));
    }
    if (unconfirmed.length > 0) throw new TransientError(`EC2 has not confirmed termination of ${unconfirmed.join(", ")} in ${region} yet`, this.name);
  }
}
