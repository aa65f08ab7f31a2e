import Fastify, { LogController, type FastifyError, type FastifyInstance } from "fastify";
import { readFileSync } from "node:fs";
import { z } from "zod";
import { formatPath } from "../config/load.js";
import { GrantRequest, GrantState, RequestId, isTerminal, type ProviderCard } from "../domain/index.js";
import { ValidationError, type GrantManager } from "../lifecycle/manager.js";
import type { GrantRecord, Store } from "../store/store.js";
import type { Logger } from "../util/logger.js";
import { bearerChecker } from "./auth.js";
import { registerAttestationRoute } from "../attestation/record.js";

export interface ListenerOptions {
  manager: GrantManager;
  store: Store;
  card: () => ProviderCard;
  token: string;
  log: Logger;
  bodyLimit: number;
  tls?: { cert: string; key: string; ca?: string } | undefined;
  /** Extra routes (e.g. /metrics) registered behind the same auth. */
  extraRoutes?: (app: FastifyInstance) => void;
}

export interface Listener {
  app: FastifyInstance;
  /** From now on every request gets 503: the bridge is shutting down. */
  drain(): void;
}

/**
 * The public view of a grant record. The bridge-generated private key is included only where
 * asked for (GET /v1/grants/{id}); lists, cancels and idempotent re-posts never carry it.
 */
export function grantView(r: GrantRecord, o: { privateKey?: boolean } = {}) {
  return {
    request_id: r.request_id,
    state: r.state,
    backend: r.backend,
    instance: r.instance
      ? {
          instance_id: r.instance.instance_id,
          host: r.instance.host,
          ssh_port: r.instance.ssh_port,
          ssh_user: r.instance.ssh_user,
          host_key_sha256: r.instance.host_key_sha256,
          ...(r.instance.attestation ? { attestation: r.instance.attestation } : {}),
        }
      : null,
    ...(o.privateKey && r.private_key ? { private_key: r.private_key } : {}),
    error: r.error_kind ? { kind: r.error_kind, message: r.error_message ?? "" } : null,
    attempts: r.attempts,
    cancel_requested: r.cancel_requested,
    created_at: r.created_at,
    updated_at: r.updated_at,
  };
}

const ListQuery = z.strictObject({
  state: GrantState.optional(),
  limit: z.coerce.number().int().min(1).max(1000).default(100),
  after: z.coerce.number().int().min(0).default(0),
});

function zodIssues(e: z.ZodError) {
  return e.issues.map((i) => {
    const p = i.code === "unrecognized_keys" ? formatPath([...i.path, i.keys[0] ?? ""]) : formatPath(i.path);
    const msg = i.code === "unrecognized_keys" ? `unknown field${i.keys.length > 1 ? "s" : ""} ${i.keys.map((k) => JSON.stringify(k)).join(", ")}` : i.message;
    return { path: p, message: msg };
  });
}

function badRequest(issues: { path: string; message: string }[]) {
  return { error: "invalid_request", message: issues.map((i) => `${i.path}: ${i.message}`).slice(0, 5).join("; "), issues: issues.slice(0, 50) };
}

type Bindings = Record<string, unknown>;
type LogFn = (...args: unknown[]) => void;

/**
 * fastify gives every request a child logger bound to its id; building one (bindings serialized,
 * redaction applied) costs more than the rest of routing. This one is built on the first log line,
 * which on the accept path means never.
 */
class LazyChildLogger {
  private real: Logger | null = null;
  constructor(
    private readonly parent: Logger,
    private readonly bindings: Bindings,
  ) {}
  private get log(): Logger {
    return (this.real ??= this.parent.child(this.bindings));
  }
  get level(): string {
    return this.parent.level;
  }
  isLevelEnabled(level: string): boolean {
    return this.parent.isLevelEnabled(level);
  }
  child(bindings: Bindings): Logger {
    return this.log.child(bindings);
  }
  fatal(...a: unknown[]): void {
    (this.log.fatal as LogFn).apply(this.log, a);
  }
  error(...a: unknown[]): void {
    (this.log.error as LogFn).apply(this.log, a);
  }
  warn(...a: unknown[]): void {
    (this.log.warn as LogFn).apply(this.log, a);
  }
  info(...a: unknown[]): void {
    (this.log.info as LogFn).apply(this.log, a);
  }
  debug(...a: unknown[]): void {
    (this.log.debug as LogFn).apply(this.log, a);
  }
  trace(...a: unknown[]): void {
    (this.log.trace as LogFn).apply(this.log, a);
  }
  silent(): void {}
}

export function buildListener(o: ListenerOptions): Listener {
  let draining = false;
  const app = Fastify({
    loggerInstance: o.log.child({ component: "listener" }),
    childLoggerFactory: (logger, bindings) => new LazyChildLogger(logger as Logger, bindings) as unknown as Logger,
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: o.bodyLimit,
    requestIdHeader: false,
    return503OnClosing: true,
    ...(o.tls
      ? {
          https: {
            cert: o.tls.cert,
            key: o.tls.key,
            ...(o.tls.ca ? { ca: o.tls.ca, requestCert: true, rejectUnauthorized: true } : {}),
          },
        }
      : {}),
  }) as unknown as FastifyInstance;

  // JSON only: everything else is 415.
  app.removeContentTypeParser(["text/plain"]);

  const authorized = bearerChecker(o.token);
  // A callback hook (not async): no promise per request on the hot path.
  app.addHook("onRequest", (req, reply, done) => {
    if (draining) return void reply.code(503).header("connection", "close").send({ error: "shutting_down", message: "the bridge is shutting down" });
    if (req.url !== "/healthz" && !authorized(req.headers.authorization))
      return void reply.code(401).header("www-authenticate", 'Bearer realm="compute-bridge"').send({ error: "unauthorized", message: "missing or invalid bearer token" });
    done();
  });

  app.setErrorHandler((err: FastifyError, req, reply) => {
    const status = err.statusCode && err.statusCode >= 400 && err.statusCode < 600 ? err.statusCode : 500;
    if (status >= 500) req.log.error({ err }, "request failed");
    const code =
      status === 413 ? "body_too_large" : status === 415 ? "unsupported_media_type" : status === 400 ? "invalid_request" : status >= 500 ? "internal" : "error";
    void reply.code(status).send({ error: code, message: status >= 500 ? "internal error" : err.message });
  });
  app.setNotFoundHandler((_req, reply) => void reply.code(404).send({ error: "not_found", message: "no such route" }));

  app.get("/healthz", async () => ({ status: "ok" }));

  app.get("/v1/provider-card", async () => o.card());

  app.post("/v1/grants", async (req, reply) => {
    if (req.body === undefined || req.body === null) return reply.code(400).send(badRequest([{ path: "(body)", message: "a JSON body {grant, envelope} is required" }]));
    const parsed = GrantRequest.safeParse(req.body);
    if (!parsed.success) return reply.code(400).send(badRequest(zodIssues(parsed.error)));
    let r;
    try {
      r = await o.manager.submit(parsed.data);
    } catch (e) {
      if (e instanceof ValidationError) return reply.code(400).send(badRequest([{ path: e.field, message: e.message.slice(e.field.length + 2) }]));
      throw e;
    }
    switch (r.status) {
      case "created":
        return reply.code(202).send({ request_id: r.record.request_id, state: r.record.state, backend: r.record.backend });
      case "duplicate":
        return reply.code(200).send(grantView(o.store.get(r.record.request_id) ?? r.record));
      case "conflict":
        return reply.code(409).send({ error: "conflict", message: `request_id ${r.record.request_id} was already accepted with a different body`, request_id: r.record.request_id });
      case "declined":
        return reply.code(422).send({ error: "no_backend", message: "no backend can satisfy the grant", declines: r.declines });
    }
  });

  const idParam = (params: unknown) => RequestId.safeParse((params as { id?: unknown }).id);

  app.get("/v1/grants", async (req, reply) => {
    const q = ListQuery.safeParse(req.query);
    if (!q.success) return reply.code(400).send(badRequest(zodIssues(q.error)));
    const rows = o.store.list({ limit: q.data.limit, after: q.data.after, ...(q.data.state ? { state: q.data.state } : {}) });
    const last = rows.at(-1);
    return { grants: rows.map((r) => grantView(r)), next_after: rows.length === q.data.limit && last ? last.seq : null };
  });

  app.get("/v1/grants/:id", async (req, reply) => {
    const id = idParam(req.params);
    if (!id.success) return reply.code(400).send(badRequest([{ path: "request_id", message: id.error.issues[0]?.message ?? "invalid" }]));
    const rec = o.store.get(id.data);
    if (!rec) return reply.code(404).send({ error: "not_found", message: `no grant ${id.data}` });
    return grantView(rec, { privateKey: true });
  });

  app.delete("/v1/grants/:id", async (req, reply) => {
    const id = idParam(req.params);
    if (!id.success) return reply.code(400).send(badRequest([{ path: "request_id", message: id.error.issues[0]?.message ?? "invalid" }]));
    const rec = await o.manager.cancel(id.data);
    if (!rec) return reply.code(404).send({ error: "not_found", message: `no grant ${id.data}` });
    return reply.code(isTerminal(rec.state) ? 200 : 202).send(grantView(rec));
  });

  app.get("/v1/grants/:id/log", async (req, reply) => {
    const id = idParam(req.params);
    if (!id.success) return reply.code(400).send(badRequest([{ path: "request_id", message: id.error.issues[0]?.message ?? "invalid" }]));
    const rec = o.store.get(id.data);
    if (!rec) return reply.code(404).send({ error: "not_found", message: `no grant ${id.data}` });
    const log = o.store.computeLog(id.data);
    if (!log) return reply.code(409).send({ error: "not_terminal", message: `grant ${id.data} is ${rec.state}; its ComputeLog exists once it is terminal`, state: rec.state });
    return log;
  });

  registerAttestationRoute(app, o.store);
  o.extraRoutes?.(app);

  return {
    app,
    drain: () => {
      draining = true;
    },
  };
}

export function readTls(files: { cert?: string | undefined; key?: string | undefined; ca?: string | undefined }): ListenerOptions["tls"] {
  if (!files.cert || !files.key) return undefined;
  return { cert: readFileSync(files.cert, "utf8"), key: readFileSync(files.key, "utf8"), ...(files.ca ? { ca: readFileSync(files.ca, "utf8") } : {}) };
}
