import type { FastifyReply } from "fastify";
import type { ProviderCard } from "../domain/index.js";
import type { GrantManager } from "../lifecycle/manager.js";
import type { Store } from "../store/store.js";
import type { CollectedRoute } from "./openapi.js";

/** What route plugins get (`app.register(plugin, deps)`): the grant manager's public API, the store's reads. */
export interface RouteDeps {
  manager: GrantManager;
  store: Store;
  card: () => ProviderCard;
  /** null when ready (resume finished, store writable), else why not. */
  notReadyReason: () => string | null;
  /** Prometheus exposition, when /metrics is served on this listener. */
  metrics?: { contentType: string; text(): Promise<string> } | undefined;
  /** Every route registered on the listener (for /openapi.json). */
  routes: CollectedRoute[];
}

declare module "fastify" {
  /** For /openapi.json (openapi.ts RouteSchema). */
  interface FastifySchema {
    summary?: string;
    description?: string;
  }
  interface FastifyRequest {
    /** Why a 4xx was answered (for the access log); never carries a header value. */
    refusal: string | null;
  }
}

/** Answer a 4xx with `{error, message, ...}` and remember the reason for the access log. */
export function refuse(reply: FastifyReply, status: number, body: { error: string; message: string } & Record<string, unknown>) {
  reply.request.refusal = `${body.error}: ${body.message}`;
  return reply.code(status).send(body);
}
