import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { defaultOpenApiDocument } from "../../src/listener/contract.js";
import { startTestDaemon } from "../helpers/daemon.js";
import { call, until } from "../helpers/http.js";
import { scriptImage } from "../helpers/images.js";
import { tempDir } from "../helpers/tmp.js";
import { tickIn } from "../helpers/config.js";

const jsonschema = spawnSync("python3", ["-c", "import jsonschema"]).status === 0;

/** Python's jsonschema: every schema is valid JSON Schema 2020-12, and every instance matches its schema. */
const CHECK = `
import json, sys
from jsonschema import Draft202012Validator
cases = json.load(sys.stdin)
bad = []
for c in cases:
    Draft202012Validator.check_schema(c["schema"])
    errors = [e.message for e in Draft202012Validator(c["schema"]).iter_errors(c["instance"])]
    if errors:
        bad.append({"what": c["what"], "errors": errors[:3]})
print(json.dumps(bad))
`;

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
      "GET /v1/grants/{id}/attestation",
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

  it("real answers match the document's response schemas (checked with Python's jsonschema)", { skip: jsonschema ? false : "python3 with the jsonschema module is not installed" }, async (t) => {
    const { url } = await startTestDaemon(t);
    const doc = JSON.parse(readFileSync("docs/openapi.json", "utf8"));
    const img = scriptImage(tempDir(t), "oa", "exit 0");
    const validTo = tickIn(120); // one valid_to: the re-post below must be the identical body
    const body = (id: string, region = "local") => ({
      grant: { request_id: id, region, tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: validTo },
      envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" } },
    });
    const answers: [string, string, number, unknown][] = [];
    const take = async (path: string, method: string, p: string, b?: unknown) => {
      const r = await call(url, method, p, b);
      answers.push([path, method.toLowerCase(), r.status, r.body]);
      return r;
    };
    await take("/v1/grants", "POST", "/v1/grants", body("oa-1"));
    await take("/v1/grants", "POST", "/v1/grants", body("oa-2", "nowhere"));
    await take("/v1/grants", "POST", "/v1/grants", { grant: {} });
    await until(async () => (await call(url, "GET", "/v1/grants/oa-1")).body?.state === "completed", "completed");
    await take("/v1/grants", "POST", "/v1/grants", body("oa-1"));
    await take("/v1/grants", "POST", "/v1/grants", { ...body("oa-1"), grant: { ...body("oa-1").grant, ram_mib: 65 } });
    await take("/v1/grants/{id}", "GET", "/v1/grants/oa-1");
    await take("/v1/grants/{id}", "GET", "/v1/grants/nope");
    await take("/v1/grants", "GET", "/v1/grants?limit=5");
    await take("/v1/grants/{id}/log", "GET", "/v1/grants/oa-1/log");
    await take("/v1/grants/{id}", "DELETE", "/v1/grants/oa-1");
    await take("/v1/provider-card", "GET", "/v1/provider-card");
    await take("/readyz", "GET", "/readyz");
    await take("/healthz", "GET", "/healthz");
    const cases = answers.map(([p, m, status, instance]) => {
      const res = doc.paths[p][m].responses[String(status)];
      assert.ok(res, `${m.toUpperCase()} ${p} answered ${status}, which the document does not list`);
      return { what: `${m.toUpperCase()} ${p} ${status}`, schema: { ...res.content["application/json"].schema, components: doc.components }, instance };
    });
    assert.deepEqual(answers.map((a) => a[2]), [202, 422, 400, 200, 409, 200, 404, 200, 200, 200, 200, 200, 200]);
    const r = spawnSync("python3", ["-c", CHECK], { input: JSON.stringify(cases), encoding: "utf8" });
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout), [], "answers that do not match their documented schema");
  });
});
