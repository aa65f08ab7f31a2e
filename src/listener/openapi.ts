import { STATUS_CODES } from "node:http";
import { z } from "zod";
import { VERSION } from "../version.js";
import { ErrorBody } from "./schemas.js";

/** What a route declares in its `schema` (zod schemas; fastify validates params, query and body with them). */
export interface RouteSchema {
  summary: string;
  description?: string;
  params?: z.ZodType;
  querystring?: z.ZodType;
  body?: z.ZodType;
  /** status -> zod schema of the JSON answer, or a string: a text/plain answer with that description. */
  response?: Record<number, z.ZodType | string>;
}

export interface CollectedRoute {
  method: string;
  url: string;
  schema: RouteSchema;
  public: boolean;
}

type Json = Record<string, unknown>;

/** A zod schema as an OpenAPI 3.1 schema (JSON Schema 2020-12), named schemas moved to `components`. */
function jsonSchema(s: z.ZodType, io: "input" | "output", components: Record<string, unknown>): Json {
  const out = z.toJSONSchema(s, { io, target: "draft-2020-12", unrepresentable: "any" }) as Json;
  delete out.$schema;
  const defs = out.$defs as Record<string, Json> | undefined;
  delete out.$defs;
  const fix = (v: Json): Json => JSON.parse(JSON.stringify(v).replaceAll('"#/$defs/', '"#/components/schemas/')) as Json;
  for (const [k, v] of Object.entries(defs ?? {})) components[k] = fix(v);
  return fix(out);
}

/** The OpenAPI 3.1 document of the routes the listener registered. */
export function openApiDocument(routes: CollectedRoute[]): Json {
  const components: Record<string, unknown> = {};
  const paths: Record<string, Json> = {};
  const errorRef = () => ({ content: { "application/json": { schema: jsonSchema(ErrorBody, "output", components) } } });
  for (const r of [...routes].sort((a, b) => (a.url === b.url ? a.method.localeCompare(b.method) : a.url.localeCompare(b.url)))) {
    const p = r.url.replace(/:([A-Za-z0-9_]+)/g, "{$1}");
    const op: Json = { operationId: operationId(r.method, r.url), summary: r.schema.summary };
    if (r.schema.description) op.description = r.schema.description;
    const parameters: Json[] = [];
    for (const [where, s] of [["path", r.schema.params], ["query", r.schema.querystring]] as const) {
      if (!s) continue;
      const js = jsonSchema(s, "input", components) as { properties?: Record<string, Json>; required?: string[] };
      for (const [name, schema] of Object.entries(js.properties ?? {}))
        parameters.push({ name, in: where, required: where === "path" || (js.required ?? []).includes(name), schema });
    }
    if (parameters.length) op.parameters = parameters;
    if (r.schema.body) op.requestBody = { required: true, content: { "application/json": { schema: jsonSchema(r.schema.body, "input", components) } } };
    const responses: Record<string, Json> = {};
    for (const [code, s] of Object.entries(r.schema.response ?? {})) {
      if (typeof s === "string") responses[code] = { description: s, content: { "text/plain": { schema: { type: "string" } } } };
      else {
        const js = jsonSchema(s, "output", components);
        responses[code] = { description: (s.description ?? STATUS_CODES[Number(code)]) || code, content: { "application/json": { schema: js } } };
      }
    }
    if (!r.public) responses["401"] ??= { description: "missing or invalid bearer token", ...errorRef() };
    if (r.schema.body) {
      responses["413"] ??= { description: "body larger than listener.body_limit_bytes", ...errorRef() };
      responses["415"] ??= { description: "not application/json (UTF-8)", ...errorRef() };
    }
    responses["503"] ??= { description: "shutting down, or the state database cannot be written right now (Retry-After)", ...errorRef() };
    op.responses = Object.fromEntries(Object.entries(responses).sort(([a], [b]) => a.localeCompare(b)));
    if (r.public) op.security = [];
    (paths[p] ??= {})[r.method.toLowerCase()] = op;
  }
  return {
    openapi: "3.1.0",
    info: {
      title: "compute-bridge",
      version: VERSION,
      description: "The listener a compute market talks to: grants in, state and signed ComputeLogs out. Generated from the zod schemas the listener validates with.",
    },
    security: [{ bearer: [] }],
    paths,
    components: {
      securitySchemes: { bearer: { type: "http", scheme: "bearer", description: "listener.token_file (or token_env) of the boot config" } },
      schemas: Object.fromEntries(Object.entries(components).sort(([a], [b]) => a.localeCompare(b))),
    },
  };
}

function operationId(method: string, url: string): string {
  const words = url
    .split("/")
    .filter((w) => w && w !== "v1")
    .map((w) => (w.startsWith(":") ? `by_${w.slice(1)}` : w.replace(/[^A-Za-z0-9]+/g, "_")));
  return [method.toLowerCase(), ...words].join("_");
}
