import Fastify, { LogController, type FastifyServerOptions, type FastifyBaseLogger, type FastifyError, type FastifyInstance, type FastifyPluginCallback } from "fastify";
import { readFileSync } from "node:fs";
import type { Logger } from "../util/logger.js";
import { AccessLog } from "./access-log.js";
import { bearerChecker } from "./auth.js";
import { refuse, type RouteDeps } from "./deps.js";
import type { CollectedRoute, RouteSchema } from "./openapi.js";
import { grantRoutes } from "./routes/grants.js";
import { metaRoutes } from "./routes/meta.js";
import { STORE_RETRY_AFTER_SECONDS, classifyStoreError } from "./store-errors.js";
import { RequestValidationError, zodValidatorCompiler } from "./validation.js";

export { grantView } from "./routes/grants.js";

/**
 * The route plugins, in registration order. Each is a fastify plugin taking RouteDeps, with its
 * zod schemas beside its routes; adding one is one line here.
 */
const ROUTE_PLUGINS: FastifyPluginCallback<RouteDeps>[] = [metaRoutes, grantRoutes];

export interface ListenerOptions extends Omit<RouteDeps, "routes" | "notReadyReason"> {
  token: string;
  log: Logger;
  bodyLimit: number;
  tls?: { cert: string; key: string; ca?: string } | undefined;
  /** null once ready; the default is always ready. */
  notReadyReason?: () => string | null;
  /** Socket timeouts ([listener] *_timeout_seconds), in ms. */
  timeouts?: { requestMs: number; headersMs: number; keepAliveMs: number };
  /** Extra routes registered behind the same auth (tests). */
  extraRoutes?: (app: FastifyInstance) => void;
}

export interface Listener {
  app: FastifyInstance;
  /** From now on every request gets 503: the bridge is shutting down. */
  drain(): void;
  /** Accept this token from now on (SIGHUP reload); the old one stops working at once. */
  setToken(token: string): void;
  /** Every route registered (method, url, schema): the input of /openapi.json. */
  routes: CollectedRoute[];
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

/** The charset parameter of a Content-Type, lowercased and unquoted, or null. */
function charsetOf(contentType: string | undefined): string | null {
  const m = contentType ? /;\s*charset\s*=\s*"?([^";\s]+)"?/i.exec(contentType) : null;
  return m ? m[1]!.toLowerCase() : null;
}

const DEFAULT_TIMEOUTS = { requestMs: 60_000, headersMs: 20_000, keepAliveMs: 5_000 };

/**
 * Route schemas are zod, validated by zodValidatorCompiler; answers are plain data built by the
 * handlers, serialized with JSON.stringify (the response schemas document them: /openapi.json).
 * Given as fastify's compilers factory, so that fastify does not load its default ones (ajv and
 * fast-json-stringify, about a tenth of the daemon's start-up) only for them to be replaced.
 */
type CompilersFactory = NonNullable<NonNullable<FastifyServerOptions["schemaController"]>["compilersFactory"]>;
export const ZOD_SCHEMA_CONTROLLER = {
  compilersFactory: {
    // fastify types this factory as ajv's; the compiler it returns is fastify's FastifySchemaCompiler.
    buildValidator: (() => zodValidatorCompiler) as unknown as NonNullable<CompilersFactory["buildValidator"]>,
    buildSerializer: () => () => (data: unknown) => JSON.stringify(data),
  },
} satisfies FastifyServerOptions["schemaController"];

export function buildListener(o: ListenerOptions): Listener {
  let draining = false;
  const t = o.timeouts ?? DEFAULT_TIMEOUTS;
  // Node checks the request and header deadlines every connectionsCheckingInterval (default 30 s):
  // check often enough that a deadline is kept to within a fraction of itself.
  const serverTimeouts = { requestTimeout: t.requestMs, headersTimeout: t.headersMs, keepAliveTimeout: t.keepAliveMs, connectionsCheckingInterval: Math.max(50, Math.min(1000, Math.floor(t.headersMs / 4))) };
  const log = o.log.child({ component: "listener" });
  const app = Fastify({
    loggerInstance: log as FastifyBaseLogger,
    childLoggerFactory: (logger, bindings) => new LazyChildLogger(logger as Logger, bindings),
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: o.bodyLimit,
    requestIdHeader: false,
    schemaController: ZOD_SCHEMA_CONTROLLER,
    return503OnClosing: true,
    requestTimeout: t.requestMs,
    keepAliveTimeout: t.keepAliveMs,
    ...(o.tls
      ? { https: { cert: o.tls.cert, key: o.tls.key, ...(o.tls.ca ? { ca: o.tls.ca, requestCert: true, rejectUnauthorized: true } : {}), ...serverTimeouts } }
      : { http: serverTimeouts }),
  });
  app.server.headersTimeout = t.headersMs;

  app.decorateRequest("refusal", null);

  const routes: CollectedRoute[] = [];
  const publicPaths = new Set<string>();
  app.addHook("onRoute", (r) => {
    const isPublic = (r.config as { public?: boolean } | undefined)?.public === true;
    if (isPublic) publicPaths.add(r.url);
    if (!r.schema) return;
    for (const m of [r.method].flat()) if (m !== "HEAD") routes.push({ method: m, url: r.url, schema: r.schema as RouteSchema, public: isPublic });
  });

  // JSON only (everything else is 415), in UTF-8 (RFC 8259 §8.1): another declared charset is 415
  // rather than bytes read as the wrong encoding. An empty body is no body (DELETE with a
  // content-type and nothing else is fine; a POST without one fails its schema).
  const json = app.getDefaultJsonParser("error", "error");
  app.removeContentTypeParser(["text/plain", "application/json"]);
  app.addContentTypeParser("application/json", { parseAs: "string" }, (req, body, done) => {
    const cs = charsetOf(req.headers["content-type"]);
    if (cs !== null && cs !== "utf-8" && cs !== "utf8")
      return done(Object.assign(new Error(`charset ${cs} is not supported: send application/json in UTF-8`), { statusCode: 415 }), undefined);
    if (body === "") return done(null, undefined);
    json(req, body as string, done);
  });

  let authorized = bearerChecker(o.token);
  // A callback hook (not async): no promise per request on the hot path.
  app.addHook("onRequest", (req, reply, done) => {
    if (draining) return void reply.code(503).header("connection", "close").send({ error: "shutting_down", message: "the bridge is shutting down" });
    const q = req.url.indexOf("?");
    if (!publicPaths.has(q < 0 ? req.url : req.url.slice(0, q)) && !authorized(req.headers.authorization)) {
      const h = req.headers.authorization;
      const why = h === undefined ? "no Authorization header" : /^bearer +/i.test(h) ? "wrong bearer token" : "Authorization is not a Bearer token";
      reply.header("www-authenticate", 'Bearer realm="compute-bridge"');
      return void refuse(reply, 401, { error: "unauthorized", message: `missing or invalid bearer token (${why})` });
    }
    done();
  });

  const access = new AccessLog(log);
  app.addHook("onResponse", (req, reply, done) => {
    const s = reply.statusCode;
    if (s >= 400 && s < 500) {
      const q = req.url.indexOf("?");
      access.refused({ method: req.method, path: q < 0 ? req.url : req.url.slice(0, q), status: s, reason: req.refusal ?? `status ${s}`, remote: req.ip });
    }
    done();
  });

  app.setErrorHandler((err: FastifyError, req, reply) => {
    if (err instanceof RequestValidationError)
      return refuse(reply, 400, { error: "invalid_request", message: err.message, issues: err.issues.slice(0, 50) });
    const store = classifyStoreError(err);
    if (store) {
      req.log.warn({ err }, "store write failed; answered %d", store.status);
      if (store.status === 503) reply.header("retry-after", String(STORE_RETRY_AFTER_SECONDS));
      return reply.code(store.status).send({ error: store.error, message: store.message });
    }
    const status = err.statusCode && err.statusCode >= 400 && err.statusCode < 600 ? err.statusCode : 500;
    if (status >= 500) {
      req.log.error({ err }, "request failed");
      return reply.code(status).send({ error: "internal", message: "internal error" });
    }
    const code = status === 413 ? "body_too_large" : status === 415 ? "unsupported_media_type" : status === 400 ? "invalid_request" : "error";
    return refuse(reply, status, { error: code, message: err.message });
  });
  app.setNotFoundHandler((_req, reply) => refuse(reply, 404, { error: "not_found", message: "no such route" }));

  const deps: RouteDeps = { manager: o.manager, store: o.store, card: o.card, notReadyReason: o.notReadyReason ?? (() => null), metrics: o.metrics, routes };
  for (const plugin of ROUTE_PLUGINS) void app.register(plugin, deps);
  o.extraRoutes?.(app);

  return {
    app,
    routes,
    drain: () => {
      draining = true;
    },
    setToken: (token) => {
      authorized = bearerChecker(token);
    },
  };
}

export function readTls(files: { cert?: string | undefined; key?: string | undefined; ca?: string | undefined }): ListenerOptions["tls"] {
  if (!files.cert || !files.key) return undefined;
  return { cert: readFileSync(files.cert, "utf8"), key: readFileSync(files.key, "utf8"), ...(files.ca ? { ca: readFileSync(files.ca, "utf8") } : {}) };
}
