/**
 * GCE access for the gcp adapter: the Compute clients (loaded on first use), the service-account
 * key file, and `call()`, through which every API call goes.
 *
 * The 6.x client does not retry: `call()` retries 429/5xx and dropped connections a bounded
 * number of times with backoff (safe: inserts and deletes carry a requestId), bounds each call
 * with a timeout, counts it in the metrics, remembers a refusal of the credentials (the backend
 * declines new grants meanwhile) and maps every error to a typed BackendError whose message
 * carries no credential.
 */
import { readFileSync } from "node:fs";
import type { ImagesClient, InstancesClient, MachineTypesClient, ZoneOperationsClient, ZonesClient, protos } from "@google-cloud/compute";
import { registerSecret } from "../../config/secrets.js";
import { abortError, backoffMs, type Clock } from "../../util/clock.js";
import type { Logger } from "../../util/logger.js";
import { BackendError, CredentialError, NotFoundError, TransientError, type BackendMetrics } from "../backend.js";
import { mapGcpError, PermissionDeniedError, redact } from "./errors.js";
import { lastSegment, META_REQUEST_ID } from "./naming.js";

export type IInstance = protos.google.cloud.compute.v1.IInstance;
export type IOperation = protos.google.cloud.compute.v1.IOperation;
type GaxAuthClient = NonNullable<NonNullable<ConstructorParameters<typeof InstancesClient>[0]>["authClient"]>;

const COMPUTE_SCOPES = ["https://www.googleapis.com/auth/compute"];
/** One API call (connect + answer); zoneOperations.wait blocks up to 2 min on GCE's side. */
const CALL_TIMEOUT_MS = 60_000;
const WAIT_CALL_TIMEOUT_MS = 150_000;

export interface Clients {
  instances: InstancesClient;
  operations: ZoneOperationsClient;
}

/** The read-only catalogue clients doctor uses (gcp/doctor.ts), loaded only when it runs. */
export interface CatalogueClients {
  zones: ZonesClient;
  machineTypes: MachineTypesClient;
  images: ImagesClient;
}

/**
 * Read-only calls whose 403 means one missing permission of a doctor check, not refused
 * credentials (like the serial console): they never make the backend decline grants.
 */
const PERMISSION_LOCAL_OPS = new Set(["instances.getSerialPortOutput", "zones.get", "machineTypes.get", "images.get", "images.getFromFamily"]);

/** What the backend needs from an Instance resource (list, get and the pollers). */
export interface InstanceView {
  name: string;
  zone: string;
  /** GCE's numeric id, as a string. */
  id: string;
  status: string;
  machineType: string;
  natIP: string | null;
  labels: Record<string, string>;
  /** Exact request id from metadata, when present. */
  requestId: string | null;
  createdMs: number | null;
  lastStartMs: number | null;
  lastStopMs: number | null;
  tdx: boolean;
}

export interface GceApiOptions {
  /** An already-authenticated google-auth-library client; unset: read `credentialsPath`. */
  authClient?: unknown;
  /** Bounded retries of 429/5xx/dropped connections in every API call. */
  retry?: { attempts?: number; baseMs?: number; capMs?: number };
}

export class GceApi {
  /** Set while GCP refuses our credentials. */
  refused: string | null = null;
  private readonly retry: { attempts: number; baseMs: number; capMs: number };
  private clientsP: Promise<Clients> | null = null;
  private clientsResolved: Clients | null = null;
  private clientOptions: ConstructorParameters<typeof InstancesClient>[0] | null = null;
  private catalogueP: Promise<CatalogueClients> | null = null;
  private catalogueResolved: CatalogueClients | null = null;
  private closed = false;

  private readonly name: string;
  private readonly project: string;
  private readonly credentialsPath: string;
  private readonly apiEndpoint: string | undefined;
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly metrics: BackendMetrics | undefined;

  constructor(
    where: { name: string; project: string; credentialsPath: string; apiEndpoint: string | undefined; log: Logger; clock: Clock; metrics: BackendMetrics | undefined },
    private readonly opts: GceApiOptions,
  ) {
    ({ name: this.name, project: this.project, credentialsPath: this.credentialsPath, apiEndpoint: this.apiEndpoint, log: this.log, clock: this.clock, metrics: this.metrics } = where);
    this.retry = { attempts: opts.retry?.attempts ?? 5, baseMs: opts.retry?.baseMs ?? 500, capMs: opts.retry?.capMs ?? 20_000 };
  }

  get loaded(): boolean {
    return this.clientsResolved !== null;
  }

  /**
   * Run one API call with bounded retries of transient failures (429, 5xx, dropped connections),
   * a per-call timeout and abort; map every error to a typed BackendError without credentials.
   */
  async call<T>(what: string, fn: (c: Clients) => Promise<T>, signal?: AbortSignal, timeoutMs = CALL_TIMEOUT_MS): Promise<T> {
    const c = await this.clients();
    const op = what.split(" ")[0]!; // "instances.get zone/name" -> "instances.get": bounded label values
    for (let attempt = 1; ; attempt++) {
      if (signal?.aborted) throw abortError(signal);
      try {
        const r = await bounded(fn(c), timeoutMs, signal, () => new TransientError(`GCP ${what}: no answer within ${Math.round(timeoutMs / 1000)} s`, this.name));
        this.refused = null;
        this.metrics?.apiCall(this.name, op, "ok");
        return r;
      } catch (e) {
        if (signal?.aborted) throw abortError(signal);
        const err = mapGcpError(e, what, this.name);
        const status = (e as { status?: unknown; code?: unknown }).status ?? (e as { code?: unknown }).code;
        this.metrics?.apiCall(this.name, op, typeof status === "number" || typeof status === "string" ? String(status) : err.kind);
        if (status === 429) this.metrics?.throttled(this.name, op);
        // A 403 on the serial console alone means one missing permission, not refused credentials:
        // the host key read during provisioning must not make canSatisfy decline every grant (the
        // watch's own serial read still fails with this CredentialError and names the permission).
        if (err instanceof CredentialError && !(err instanceof PermissionDeniedError && PERMISSION_LOCAL_OPS.has(op))) {
          if (this.refused === null) this.log.error({ err: { kind: err.kind, message: err.message } }, "GCP refused the bridge's credentials; new grants are declined until a call succeeds");
          this.refused = err.message;
        }
        if (!(err instanceof TransientError) || attempt >= this.retry.attempts || this.closed) throw err;
        const delay = this.retry.baseMs + backoffMs(attempt, this.retry.baseMs, this.retry.capMs);
        this.metrics?.retry(this.name, op);
        this.log.debug({ what, attempt, delay_ms: delay, err: { kind: err.kind, message: err.message } }, "GCP call failed; retrying");
        await this.clock.sleep(delay, signal);
      }
    }
  }

  /**
   * `call()` with the catalogue clients (zones, machine types, images), created on first use with
   * the same endpoint and auth client as the others: only doctor needs them.
   */
  async catalogueCall<T>(what: string, fn: (c: CatalogueClients) => Promise<T>, signal?: AbortSignal): Promise<T> {
    const c = await this.catalogue();
    return this.call(what, () => fn(c), signal);
  }

  /** Every instance matching `filter` (any zone), via one aggregatedList, paged at 500. */
  listInstances(filter: string, signal?: AbortSignal): Promise<InstanceView[]> {
    return this.call(
      "instances.aggregatedList",
      async (c) => {
        const out: InstanceView[] = [];
        for await (const [scope, scoped] of c.instances.aggregatedListAsync({ project: this.project, filter, maxResults: 500 }, { autoPaginate: false })) {
          // A zone GCE could not reach would make a watched instance look deleted: fail the poll instead.
          if (scoped.warning?.code === "UNREACHABLE") throw new TransientError(`GCE could not list ${scope}: ${redact(scoped.warning.message ?? "unreachable")}`, this.name);
          for (const i of scoped.instances ?? []) out.push(toView(i));
        }
        return out;
      },
      signal,
    );
  }

  async getInstance(zone: string, name: string, signal?: AbortSignal): Promise<InstanceView | null> {
    try {
      const [i] = await this.call(`instances.get ${zone}/${name}`, (c) => c.instances.get({ project: this.project, zone, instance: name }), signal);
      return toView(i);
    } catch (e) {
      if (e instanceof NotFoundError) return null;
      throw e;
    }
  }

  /** One answer of getSerialPortOutput for serial port 1 from byte `start` (at most 1 MiB). */
  async serialPage(zone: string, name: string, start: number, signal?: AbortSignal): Promise<protos.google.cloud.compute.v1.ISerialPortOutput> {
    const [res] = await this.call(`instances.getSerialPortOutput ${zone}/${name}`, (c) => c.instances.getSerialPortOutput({ project: this.project, zone, instance: name, port: 1, start }), signal);
    return res;
  }

  /** Wait for a zone Operation to be DONE, until `deadline`; `onTimeout` names the failure. */
  async waitOperation(zone: string, first: IOperation, deadline: number, signal: AbortSignal | undefined, pollMs: number, onTimeout: (opName: string) => BackendError): Promise<IOperation> {
    let op = first;
    while (op.status !== "DONE") {
      if (this.clock.now() >= deadline) throw onTimeout(String(op.name));
      const t0 = this.clock.now();
      [op] = await this.call(`zoneOperations.wait ${zone}`, (c) => c.operations.wait({ project: this.project, zone, operation: String(op.name) }), signal, WAIT_CALL_TIMEOUT_MS);
      // wait normally blocks server-side; if it answered at once, do not spin.
      if (op.status !== "DONE" && this.clock.now() - t0 < 1000) await this.clock.sleep(pollMs, signal);
    }
    return op;
  }

  async close(): Promise<void> {
    this.closed = true;
    const c = this.clientsResolved;
    const k = this.catalogueResolved;
    this.clientsResolved = null;
    this.clientsP = null;
    this.catalogueResolved = null;
    this.catalogueP = null;
    await Promise.allSettled([...(c ? [c.instances.close(), c.operations.close()] : []), ...(k ? [k.zones.close(), k.machineTypes.close(), k.images.close()] : [])]);
  }

  private catalogue(): Promise<CatalogueClients> {
    this.catalogueP ??= this.clients().then(
      async () => {
        const [{ ZonesClient }, { MachineTypesClient }, { ImagesClient }] = await Promise.all([
          import("@google-cloud/compute/build/src/v1/zones_client.js"),
          import("@google-cloud/compute/build/src/v1/machine_types_client.js"),
          import("@google-cloud/compute/build/src/v1/images_client.js"),
        ]);
        const options = this.clientOptions!;
        if (this.closed) throw new BackendError(`the ${this.name} backend is closed`, this.name);
        return (this.catalogueResolved = { zones: new ZonesClient(options), machineTypes: new MachineTypesClient(options), images: new ImagesClient(options) });
      },
      (e: unknown) => {
        this.catalogueP = null;
        throw e;
      },
    );
    return this.catalogueP;
  }

  private clients(): Promise<Clients> {
    if (this.closed) return Promise.reject(new BackendError(`the ${this.name} backend is closed`, this.name));
    this.clientsP ??= this.createClients().then(
      (c) => (this.clientsResolved = c),
      (e: unknown) => {
        this.clientsP = null; // retried on the next call (e.g. once the key file is fixed)
        const err = e instanceof BackendError ? e : new CredentialError(`gcp: cannot set up GCP credentials from ${this.credentialsPath}: ${redact(e instanceof Error ? e.message : String(e))}`, this.name);
        if (err instanceof CredentialError) this.refused = err.message;
        throw err;
      },
    );
    return this.clientsP;
  }

  private async createClients(): Promise<Clients> {
    const authClient = this.opts.authClient ?? (await this.authFromKeyFile());
    // The two clients' own modules, not the package index: the index loads all of its ~100
    // clients (6.5 s here on a lightly loaded machine, against 1.2 s for these two), which a
    // restarted bridge paid before its first GCE call.
    const [{ InstancesClient }, { ZoneOperationsClient }] = await Promise.all([
      import("@google-cloud/compute/build/src/v1/instances_client.js"),
      import("@google-cloud/compute/build/src/v1/zone_operations_client.js"),
    ]);
    const options: ConstructorParameters<typeof InstancesClient>[0] = {
      fallback: true,
      // google-gax nests its own google-auth-library; the top-level client works at runtime.
      authClient: authClient as GaxAuthClient,
      ...endpointOptions(this.apiEndpoint),
    };
    this.clientOptions = options;
    return { instances: new InstancesClient(options), operations: new ZoneOperationsClient(options) };
  }

  /** Production credentials: a service-account key file, checked here so mistakes read clearly. */
  private async authFromKeyFile(): Promise<unknown> {
    const file = this.credentialsPath;
    const bad = (why: string) => new CredentialError(`backends.gcp.credentials_file: ${file} ${why}`, this.name);
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch (e) {
      throw new CredentialError(`backends.gcp.credentials_file: cannot read ${file} (${(e as NodeJS.ErrnoException).code ?? "error"})`, this.name);
    }
    let key: { type?: unknown; client_email?: unknown; private_key?: unknown };
    try {
      key = JSON.parse(text) as typeof key;
    } catch {
      throw bad("is not JSON (expected a service-account key file downloaded from IAM)");
    }
    if (typeof key !== "object" || key === null) throw bad("is not a service-account key");
    if (typeof key.private_key === "string") registerSecret(key.private_key);
    if (key.type !== "service_account" && key.type !== "external_account" && key.type !== "impersonated_service_account")
      throw bad(`has type ${JSON.stringify(typeof key.type === "string" ? key.type.slice(0, 40) : null)}; expected a service-account key ("type": "service_account")`);
    if (key.type === "service_account" && (typeof key.client_email !== "string" || typeof key.private_key !== "string")) throw bad("lacks client_email or private_key");
    const { GoogleAuth } = await import("google-auth-library");
    const auth = new GoogleAuth({ keyFile: file, scopes: COMPUTE_SCOPES });
    try {
      return await auth.getClient();
    } catch (e) {
      throw bad(`could not be loaded: ${redact(e instanceof Error ? e.message : String(e), 200)}`);
    }
  }
}

function endpointOptions(apiEndpoint: string | undefined): { apiEndpoint?: string; port?: number; protocol?: string } {
  if (!apiEndpoint) return {};
  const u = new URL(apiEndpoint);
  const protocol = u.protocol.replace(/:$/, "");
  return { apiEndpoint: u.hostname, port: u.port ? Number(u.port) : protocol === "https" ? 443 : 80, protocol };
}

function toMs(ts: string | null | undefined): number | null {
  if (!ts) return null;
  const t = Date.parse(ts);
  return Number.isFinite(t) ? t : null;
}

export function toView(i: IInstance): InstanceView {
  const nat = (i.networkInterfaces ?? []).flatMap((n) => n.accessConfigs ?? []).find((a) => a.natIP)?.natIP ?? null;
  const meta = i.metadata?.items ?? [];
  const labels: Record<string, string> = {};
  for (const [k, v] of Object.entries(i.labels ?? {})) if (typeof v === "string") labels[k] = v;
  return {
    name: i.name ?? "",
    zone: lastSegment(i.zone),
    id: i.id === null || i.id === undefined ? "" : String(i.id),
    status: String(i.status ?? "UNKNOWN"),
    machineType: lastSegment(i.machineType),
    natIP: nat,
    labels,
    requestId: meta.find((m) => m.key === META_REQUEST_ID)?.value ?? null,
    createdMs: toMs(i.creationTimestamp),
    lastStartMs: toMs(i.lastStartTimestamp),
    lastStopMs: toMs(i.lastStopTimestamp),
    tdx: String(i.confidentialInstanceConfig?.confidentialInstanceType ?? "") === "TDX",
  };
}

/** `p`, or a rejection after `ms` or on `signal`. The call itself is not cancelled (inserts carry a requestId). */
function bounded<T>(p: Promise<T>, ms: number, signal: AbortSignal | undefined, timeoutError: () => Error): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => finish(() => reject(timeoutError())), ms);
    const onAbort = () => finish(() => reject(abortError(signal!)));
    let done = false;
    const finish = (f: () => void) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      f();
    };
    if (signal?.aborted) return onAbort();
    signal?.addEventListener("abort", onAbort, { once: true });
    p.then(
      (v) => finish(() => resolve(v)),
      (e: unknown) => finish(() => reject(e)),
    );
  });
}
