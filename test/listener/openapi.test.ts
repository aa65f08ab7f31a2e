import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { defaultOpenApiDocument } from "../../src/listener/contract.js";
import { startTestDaemon } from "../helpers/daemon.js";
import { call } from "../helpers/http.js";

describe("OpenAPI contract", () => {
  it("/openapi.json (no token needed) is docs/openapi.json, byte for byte (regenerate: npm run openapi)", async (t) => {
    const { url } = await startTestDaemon(t);
    const served = await call(url, "GET", "/openapi.json", undefined, {}, null);
    assert.equal(served.status, 200);
    assert.match(served.headers.get("content-type") ?? "", /^application\/json/);
    assert.equal(served.text, readFileSync("docs/openapi.json", "utf8"), "docs/openapi.json is stale: run npm run openapi");
    assert.equal(await defaultOpenApiDocument(), served.text);
  });

  it("describes every route the listener serves, with the auth it needs and schemas from zod", async (t) => {
    const { url } = await startTestDaemon(t);
    const doc = (await call(url, "GET", "/openapi.json", undefined, {}, null)).body;
    assert.equal(doc.openapi, "3.1.0");
    const ops = Object.entries(doc.paths as Record<string, Record<string, { security?: unknown[]; responses: Record<string, unknown>; requestBody?: unknown }>>).flatMap(([p, m]) =>
      Object.entries(m).map(([method, op]) => ({ key: `${method.toUpperCase()} ${p}`, op })),
    );
    assert.deepEqual(ops.map((o) => o.key).sort(), [
      "DELETE /v1/grants/{id}",
      "GET /healthz",
      "GET /metrics",
      "GET /openapi.json",
      "GET /readyz",
      "GET /v1/grants",
      "GET /v1/grants/{id}",
      "GET /v1/grants/{id}/log",
      "GET /v1/provider-card",
      "POST /v1/grants",
    ]);
    // The public ones answer without a token; the others 401, as the document says.
    for (const { key, op } of ops) {
      const [method, p] = key.split(" ") as [string, string];
      const r = await call(url, method, p.replace("{id}", "x"), undefined, {}, null);
      if (op.security?.length === 0) assert.notEqual(r.status, 401, `${key} is documented as public`);
      else {
        assert.equal(r.status, 401, `${key} is documented as needing the token`);
        assert.ok(op.responses["401"], `${key} documents its 401`);
      }
    }
    const post = ops.find((o) => o.key === "POST /v1/grants")!.op as { requestBody: { content: { "application/json": { schema: { properties: Record<string, unknown>; required: string[] } } } } };
    const body = post.requestBody.content["application/json"].schema;
    assert.deepEqual(body.required.sort(), ["envelope", "grant"]);
    const grant = body.properties.grant as { properties: Record<string, { pattern?: string; maximum?: number }> };
    assert.equal(grant.properties.request_id!.pattern, "^[A-Za-z0-9._-]+$", "constraints come from the zod schema");
    assert.equal(grant.properties.cpu_millicores!.maximum, 1_024_000);
    assert.ok(doc.components.schemas.Grant && doc.components.schemas.ComputeLog && doc.components.schemas.ProviderCard);
    assert.deepEqual(doc.components.securitySchemes.bearer, { type: "http", scheme: "bearer", description: "listener.token_file (or token_env) of the boot config" });
  });
});
