import type { FastifySchemaCompiler } from "fastify";
import type { z } from "zod";
import { formatPath } from "../config/load.js";

export interface Issue {
  path: string;
  message: string;
}

/** A request that failed its route's zod schema: answered 400 with every issue and its field path. */
export class RequestValidationError extends Error {
  readonly statusCode = 400;
  constructor(readonly issues: Issue[]) {
    super(issues.map((i) => `${i.path}: ${i.message}`).slice(0, 5).join("; "));
  }
}

export function zodIssues(e: z.ZodError, prefix: string[] = []): Issue[] {
  return e.issues.map((i) => {
    const p = i.code === "unrecognized_keys" ? formatPath([...prefix, ...i.path, i.keys[0] ?? ""]) : formatPath([...prefix, ...i.path]);
    const msg = i.code === "unrecognized_keys" ? `unknown field${i.keys.length > 1 ? "s" : ""} ${i.keys.map((k) => JSON.stringify(k)).join(", ")}` : i.message;
    return { path: p || "(body)", message: msg };
  });
}

/**
 * Route schemas are zod schemas (the single source of truth for the wire types): fastify hands
 * each to this compiler, which validates (and transforms: lowercased sha256, coerced numbers)
 * with zod. The same schemas become /openapi.json (openapi.ts).
 */
export const zodValidatorCompiler: FastifySchemaCompiler<z.ZodType> = ({ schema, httpPart }) => {
  return (data: unknown) => {
    if (httpPart === "body" && (data === undefined || data === null))
      return { error: new RequestValidationError([{ path: "(body)", message: "a JSON body is required" }]) };
    const r = schema.safeParse(data);
    if (r.success) return { value: r.data };
    return { error: new RequestValidationError(zodIssues(r.error)) };
  };
};
