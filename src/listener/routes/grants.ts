import type { FastifyPluginCallback } from "fastify";
import type { z } from "zod";
import { grantEvidence } from "../../attestation/record.js";
import { evidenceJson } from "../../domain/attestation.js";
import { GrantRequest, isTerminal } from "../../domain/index.js";
import { ValidationError } from "../../lifecycle/manager.js";
import type { GrantRecord } from "../../store/store.js";
import { refuse, type RouteDeps } from "../deps.js";
import type { RouteSchema } from "../openapi.js";
import * as S from "../schemas.js";
import { RequestValidationError } from "../validation.js";

/**
 * The public view of a grant record. The bridge-generated private key is included only where
 * asked for (GET /v1/grants/{id}) and only once the instance has an SSH host to use it on (a
 * local grant never does); lists, cancels and idempotent re-posts never carry it.
 */
export function grantView(
  r: GrantRecord,
  o: { privateKey?: boolean; queued?: { queued_at: string; position: number } | null; cost?: { amount: number; currency: string; final: boolean } | null } = {},
): z.infer<typeof S.GrantView> {
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
          // The evidence itself (kilobytes of quotes) is served by GET /v1/grants/{id}/attestation.
          ...(r.instance.attestation ? { attestation: r.instance.attestation.status } : {}),
        }
      : null,
    ...(o.privateKey && r.private_key && r.instance?.host ? { private_key: r.private_key } : {}),
    error: r.error_kind ? { kind: r.error_kind, message: r.error_message ?? "" } : null,
    attempts: r.attempts,
    cancel_requested: r.cancel_requested,
    ...(o.queued ? { queue: o.queued } : {}),
    ...(o.cost ? { cost: o.cost } : {}),
    created_at: r.created_at,
    updated_at: r.updated_at,
  };
}

const notFound = (id: string) => ({ error: "not_found", message: `no grant ${id}` });
type Id = { Params: z.infer<typeof S.IdParams> };

export const grantRoutes: FastifyPluginCallback<RouteDeps> = (app, o, done) => {
  app.post<{ Body: GrantRequest }>(
    "/v1/grants",
    {
      schema: {
        summary: "Submit a grant",
        description: "Accepted once durably stored (202). Idempotent per request_id: the same body again answers 200 with the record, another body 409.",
        body: GrantRequest,
        response: { 200: S.GrantView, 202: S.Accepted, 400: S.ValidationErrorBody, 409: S.Conflict, 422: S.Declined, 507: S.ErrorBody.describe("the state database's disk is full; nothing was stored") },
      } satisfies RouteSchema,
    },
    async (req, reply) => {
      let r;
      try {
        r = await o.manager.submit(req.body);
      } catch (e) {
        if (e instanceof ValidationError) throw new RequestValidationError([{ path: e.field, message: e.message.slice(e.field.length + 2) }]);
        throw e;
      }
      switch (r.status) {
        case "created":
          return reply.code(202).send({ request_id: r.record.request_id, state: r.record.state, backend: r.record.backend });
        case "duplicate":
          return reply.code(200).send(grantView((await o.store.get(r.record.request_id)) ?? r.record));
        case "conflict":
          return refuse(reply, 409, { error: "conflict", message: `request_id ${r.record.request_id} was already accepted with a different body`, request_id: r.record.request_id });
        case "declined":
          return refuse(reply, 422, { error: "no_backend", message: "no backend can satisfy the grant", declines: r.declines });
      }
    },
  );

  app.get<{ Querystring: z.infer<typeof S.ListQuery> }>(
    "/v1/grants",
    { schema: { summary: "List grants, oldest first, a page at a time", querystring: S.ListQuery, response: { 200: S.GrantList, 400: S.ValidationErrorBody } } satisfies RouteSchema },
    async (req) => {
      const q = req.query;
      const rows = await o.store.list({ limit: q.limit, after: q.after, ...(q.state ? { state: q.state } : {}) });
      const last = rows.at(-1);
      return { grants: rows.map((r) => grantView(r)), next_after: rows.length === q.limit && last ? last.seq : null };
    },
  );

  app.get<Id>(
    "/v1/grants/:id",
    { schema: { summary: "One grant", params: S.IdParams, response: { 200: S.GrantView, 400: S.ValidationErrorBody, 404: S.ErrorBody } } satisfies RouteSchema },
    async (req, reply) => {
      const rec = await o.store.get(req.params.id);
      if (!rec) return refuse(reply, 404, notFound(req.params.id));
      return grantView(rec, { privateKey: true, queued: o.manager.queued(rec.request_id), cost: o.manager.cost(rec) });
    },
  );

  app.delete<Id>(
    "/v1/grants/:id",
    {
      schema: {
        summary: "Cancel a grant",
        description: "Terminates the workload and finishes the grant as cancelled (202 while that happens); a no-op on a finished grant (200). A body is not needed (an empty one with content-type application/json is accepted).",
        params: S.IdParams,
        response: { 200: S.GrantView, 202: S.GrantView, 400: S.ValidationErrorBody, 404: S.ErrorBody },
      } satisfies RouteSchema,
    },
    async (req, reply) => {
      const rec = await o.manager.cancel(req.params.id);
      if (!rec) return refuse(reply, 404, notFound(req.params.id));
      return reply.code(isTerminal(rec.state) ? 200 : 202).send(grantView(rec));
    },
  );

  app.get<Id>(
    "/v1/grants/:id/log",
    {
      schema: {
        summary: "The signed ComputeLog of a finished grant",
        description: "409 until the grant is terminal: poll GET /v1/grants/{id} for a terminal state first.",
        params: S.IdParams,
        response: { 200: S.Log, 400: S.ValidationErrorBody, 404: S.ErrorBody, 409: S.NotTerminal },
      } satisfies RouteSchema,
    },
    async (req, reply) => {
      const id = req.params.id;
      const rec = await o.store.get(id);
      if (!rec) return refuse(reply, 404, notFound(id));
      const log = await o.store.computeLog(id);
      if (!log) return refuse(reply, 409, { error: "not_terminal", message: `grant ${id} is ${rec.state}; its ComputeLog exists once it is terminal`, state: rec.state });
      return log;
    },
  );

  app.get<Id>(
    "/v1/grants/:id/attestation",
    {
      schema: {
        summary: "The attestation evidence of a grant",
        description:
          "Raw hardware-signed evidence bound to (request_id, nonce, SSH host key), or status absent with the reason; canonical JSON whose SHA-256 is the ComputeLog's attestation_sha256. Check it offline with `compute-bridge verify-evidence` (docs/operations.md).",
        params: S.IdParams,
        response: { 200: S.Evidence, 400: S.ValidationErrorBody, 404: S.ErrorBody },
      } satisfies RouteSchema,
    },
    async (req, reply) => {
      const rec = await o.store.get(req.params.id);
      if (!rec) return refuse(reply, 404, notFound(req.params.id));
      // The exact bytes the ComputeLog digests (never re-serialized).
      return reply.type("application/json; charset=utf-8").send(evidenceJson(grantEvidence(rec)));
    },
  );
  done();
};
