import type { FastifyPluginCallback } from "fastify";
import type { RouteDeps } from "../deps.js";
import { openApiDocument, type RouteSchema } from "../openapi.js";
import * as S from "../schemas.js";

/** Probes, the API contract, the provider card and metrics. `config.public`: no token needed. */
export const metaRoutes: FastifyPluginCallback<RouteDeps> = (app, o, done) => {
  app.get("/healthz", { config: { public: true }, schema: { summary: "Liveness: the process answers", response: { 200: S.Health } } satisfies RouteSchema }, async () => ({ status: "ok" }));

  app.get(
    "/readyz",
    {
      config: { public: true },
      schema: {
        summary: "Readiness: open grants resumed and the state database writable",
        response: { 200: S.Readiness, 503: S.Readiness.describe("not ready yet (resuming) or no longer (the state database cannot be written)") },
      } satisfies RouteSchema,
    },
    async (_req, reply) => {
      const why = o.notReadyReason();
      return why === null ? { status: "ready" } : reply.code(503).send({ status: "not_ready", reason: why });
    },
  );

  let doc: string | null = null;
  app.get("/openapi.json", { config: { public: true }, schema: { summary: "This API as an OpenAPI 3.1 document", response: { 200: "the OpenAPI document (JSON)" } } satisfies RouteSchema }, async (_req, reply) => {
    doc ??= JSON.stringify(openApiDocument(o.routes), null, 2) + "\n";
    return reply.type("application/json; charset=utf-8").send(doc);
  });

  app.get("/v1/provider-card", { schema: { summary: "The signed ProviderCard", response: { 200: S.Card } } satisfies RouteSchema }, async () => o.card());

  const metrics = o.metrics;
  if (metrics)
    app.get(
      "/metrics",
      { schema: { summary: "Prometheus metrics (text exposition format)", description: "Behind the bearer token here; with listener.metrics_bind set, served there without a token instead.", response: { 200: "Prometheus text format 0.0.4" } } satisfies RouteSchema },
      async (_req, reply) => reply.type(metrics.contentType).send(await metrics.text()),
    );
  done();
};
