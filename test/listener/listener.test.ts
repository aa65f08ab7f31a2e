import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { verifySignedDoc } from "../../src/util/identity.js";
import { tickIn } from "../helpers/config.js";
import { startTestDaemon } from "../helpers/daemon.js";
import { call, until } from "../helpers/http.js";
import { scriptImage } from "../helpers/images.js";
import { tempDir } from "../helpers/tmp.js";

function body(id: string, img: { url: string; sha256: string }, over: Record<string, unknown> = {}, env: Record<string, unknown> = {}) {
  return {
    grant: { request_id: id, region: "local", tdx_required: false, cpu_millicores: 500, ram_mib: 256, valid_to: tickIn(120), ...over },
    envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" }, ...env },
  };
}

async function waitState(url: string, id: string, states: string[], timeoutMs = 20_000) {
  return until(async () => {
    const r = await call(url, "GET", `/v1/grants/${id}`);
    return states.includes(r.body?.state) ? r.body : null;
  }, `grant ${id} to reach ${states.join("|")}`, timeoutMs);
}

describe("listener", () => {
  it("requires the bearer token on every route but /healthz", async (t) => {
    const { url } = await startTestDaemon(t);
    assert.equal((await call(url, "GET", "/healthz", undefined, {}, null)).status, 200);
    for (const [m, p] of [["GET", "/v1/provider-card"], ["GET", "/v1/grants"], ["GET", "/v1/grants/x"], ["DELETE", "/v1/grants/x"], ["POST", "/v1/grants"]] as const) {
      const none = await call(url, m, p, m === "POST" ? {} : undefined, {}, null);
      assert.equal(none.status, 401, `${m} ${p} without a token`);
      const wrong = await call(url, m, p, m === "POST" ? {} : undefined, {}, "wrong-token");
      assert.equal(wrong.status, 401, `${m} ${p} with a wrong token`);
      const basic = await call(url, m, p, undefined, { authorization: "Basic Zm9vOmJhcg==" }, null);
      assert.equal(basic.status, 401);
    }
    assert.equal((await call(url, "GET", "/v1/provider-card")).status, 200);
  });

  it("serves the signed provider card", async (t) => {
    const { url } = await startTestDaemon(t);
    const card = (await call(url, "GET", "/v1/provider-card")).body;
    assert.deepEqual(card.regions, ["local"]);
    assert.equal(card.provider_id, "test-provider");
    assert.ok(verifySignedDoc(card, card.public_key));
  });

  it("answers bad input with 4xx naming the field, and persists nothing", async (t) => {
    const { url, d } = await startTestDaemon(t);
    const img = scriptImage(tempDir(t), "x", "true");
    const cases: [string, unknown, number, RegExp][] = [
      ["malformed JSON", '{"grant": ', 400, /JSON/i],
      ["missing envelope", { grant: body("a", img).grant }, 400, /envelope/],
      ["bad request_id", body("../etc", img), 400, /grant\.request_id/],
      ["negative cpu", body("b", img, { cpu_millicores: -1 }), 400, /grant\.cpu_millicores/],
      ["huge ram", body("c", img, { ram_mib: 1e300 }), 400, /grant\.ram_mib/],
      ["string tdx flag", body("d", img, { tdx_required: "yes" }), 400, /grant\.tdx_required/],
      ["extra field", { ...body("e", img), extra: 1 }, 400, /extra/],
      ["bad sha256", { ...body("f", img), envelope: { image: { url: img.url, sha256: "abc", format: "bundle" } } }, 400, /envelope\.image\.sha256/],
      ["bad url scheme", { ...body("g", img), envelope: { image: { url: "ftp://x/y", sha256: img.sha256, format: "bundle" } } }, 400, /envelope\.image\.url/],
      ["NUL in command", body("h", img, {}, { command: ["a\u0000b"] }), 400, /envelope\.command\[0\]/],
      ["shell env name", body("i", img, {}, { env: { "A;B": "x" } }), 400, /envelope\.env/],
      ["bad ssh key", body("j", img, {}, { ssh_public_key: "ssh-ed25519 AAAA\nrm -rf /" }), 400, /envelope\.ssh_public_key/],
      ["valid_to in the past", body("k", img, { valid_to: 5 }), 400, /grant\.valid_to/],
    ];
    for (const [name, payload, status, re] of cases) {
      const r = await call(url, "POST", "/v1/grants", payload);
      assert.equal(r.status, status, `${name}: ${r.text}`);
      assert.match(r.text, re, name);
    }
    const textPlain = await call(url, "POST", "/v1/grants", "hello", { "content-type": "text/plain" });
    assert.equal(textPlain.status, 415);
    const huge = await call(url, "POST", "/v1/grants", JSON.stringify({ pad: "x".repeat(1024 * 1024 + 10) }));
    assert.equal(huge.status, 413);
    assert.equal((await call(url, "GET", "/v1/grants/..%2F..%2Fetc")).status, 400);
    assert.equal((await call(url, "GET", "/v1/grants/nope")).status, 404);
    assert.equal((await call(url, "GET", "/v1/grants?state=bogus")).status, 400);
    assert.equal((await d.store.list({ limit: 100 })).length, 0, "nothing persisted");
    assert.equal((await call(url, "GET", "/healthz")).status, 200, "still up");
  });

  it("runs a grant to completed with the exit code in a signed ComputeLog", async (t) => {
    const { url, stateDir, logs } = await startTestDaemon(t);
    const img = scriptImage(tempDir(t), "exit4", "exit 4");
    const b = body("run-1", img);
    const r = await call(url, "POST", "/v1/grants", b);
    assert.equal(r.status, 202);
    assert.deepEqual(r.body, { request_id: "run-1", state: "provisioning", backend: "local" });
    const early = await call(url, "GET", "/v1/grants/run-1/log");
    if (early.status !== 200) assert.equal(early.status, 409);
    const g = await waitState(url, "run-1", ["completed"]);
    assert.equal(g.backend, "local");
    assert.equal(g.instance.instance_id, "local-run-1");
    assert.equal(g.instance.host, null, "a local grant has no SSH host");
    assert.equal(g.private_key, undefined, "so no private key is handed out for it");
    const log = (await call(url, "GET", "/v1/grants/run-1/log")).body;
    assert.equal(log.exit_reason, "exited");
    assert.equal(log.exit_code, 4);
    assert.equal(log.partial, false);
    assert.ok(log.usage.wall_seconds >= 0 && log.usage.cpu_millicore_seconds >= 0);
    const card = (await call(url, "GET", "/v1/provider-card")).body;
    assert.ok(verifySignedDoc(log, card.public_key), "ComputeLog signed by the bridge identity");
    // The jsonl line follows the commit (and its fsync) that made the grant terminal.
    const jsonl = path.join(stateDir, "compute-log.jsonl");
    await until(() => existsSync(jsonl) && readFileSync(jsonl, "utf8").includes('"request_id":"run-1"'), "the ComputeLog line in compute-log.jsonl");
    const lines = readFileSync(jsonl, "utf8").trim().split("\n");
    assert.equal(JSON.parse(lines.at(-1)!).request_id, "run-1");
    // re-post of the identical body: 200 with the current record; a different body: 409
    const again = await call(url, "POST", "/v1/grants", b);
    assert.equal(again.status, 200);
    assert.equal(again.body.state, "completed");
    const other = await call(url, "POST", "/v1/grants", body("run-1", img, { ram_mib: 512 }));
    assert.equal(other.status, 409);
    // list by state, paged
    const list = await call(url, "GET", "/v1/grants?state=completed&limit=10");
    assert.deepEqual(list.body.grants.map((x: { request_id: string }) => x.request_id), ["run-1"]);
    assert.ok(!logs.text.includes("BEGIN OPENSSH PRIVATE KEY"), "private keys never reach the log");
    assert.ok(logs.lines.some((l) => l.includes('"request_id":"run-1"') && l.includes('"backend":"local"')));
  });

  it("declines with 422 and per-backend reasons", async (t) => {
    const { url, d } = await startTestDaemon(t);
    const img = scriptImage(tempDir(t), "x", "true");
    const r = await call(url, "POST", "/v1/grants", body("big-1", img, { region: "eu-west-1", tdx_required: true }));
    assert.equal(r.status, 422);
    assert.deepEqual(r.body.declines, [{ backend: "local", code: "region_not_served", message: "local serves region local only" }]);
    const tdx = await call(url, "POST", "/v1/grants", body("big-2", img, { tdx_required: true }));
    assert.equal(tdx.body.declines[0].code, "tdx_not_supported");
    assert.equal((await d.store.get("big-1")), null);
  });

  it("hash mismatch -> failed, and the command never ran", async (t) => {
    const { url } = await startTestDaemon(t);
    const dir = tempDir(t);
    const canary = path.join(dir, "canary");
    const img = scriptImage(dir, "evil", `touch ${canary}`);
    const r = await call(url, "POST", "/v1/grants", body("mm-1", { url: img.url, sha256: "f".repeat(64) }));
    assert.equal(r.status, 202);
    const g = await waitState(url, "mm-1", ["failed"]);
    assert.equal(g.error.kind, "image_verification");
    const log = (await call(url, "GET", "/v1/grants/mm-1/log")).body;
    assert.equal(log.exit_reason, "failed");
    assert.equal(log.partial, true);
    assert.equal(log.error_kind, "image_verification");
    assert.equal(existsSync(canary), false);
  });

  it("expiry -> expired, workload killed", async (t) => {
    const { url } = await startTestDaemon(t);
    const img = scriptImage(tempDir(t), "forever", "sleep 600");
    const b = body("exp-1", img, { valid_to: tickIn(2) });
    const r = await call(url, "POST", "/v1/grants", b);
    assert.equal(r.status, 202);
    const g = await waitState(url, "exp-1", ["expired"], 15_000);
    assert.equal(g.state, "expired");
    const log = (await call(url, "GET", "/v1/grants/exp-1/log")).body;
    assert.equal(log.exit_reason, "expired");
    assert.equal(log.partial, true);
    // valid_to is now in the past: a re-post still gets the record (200), a changed body 409,
    // rather than the 400 a new grant with that valid_to would get.
    const again = await call(url, "POST", "/v1/grants", b);
    assert.equal(again.status, 200);
    assert.equal(again.body.state, "expired");
    assert.equal((await call(url, "POST", "/v1/grants", body("exp-1", img, { valid_to: b.grant.valid_to, ram_mib: 512 }))).status, 409);
    assert.equal((await call(url, "POST", "/v1/grants", body("exp-2", img, { valid_to: b.grant.valid_to }))).status, 400);
  });

  it("cancel -> cancelled", async (t) => {
    const { url } = await startTestDaemon(t);
    const img = scriptImage(tempDir(t), "forever", "sleep 600");
    await call(url, "POST", "/v1/grants", body("can-1", img));
    await waitState(url, "can-1", ["running"]);
    const del = await call(url, "DELETE", "/v1/grants/can-1");
    assert.equal(del.status, 202);
    const g = await waitState(url, "can-1", ["cancelled"]);
    assert.equal(g.state, "cancelled");
    assert.equal((await call(url, "DELETE", "/v1/grants/can-1")).status, 200, "cancelling a finished grant is a no-op");
    assert.equal((await call(url, "GET", "/v1/grants/can-1/log")).body.exit_reason, "cancelled");
    assert.equal((await call(url, "DELETE", "/v1/grants/nope")).status, 404);
  });

  it("tracks 200 grants posted at once", async (t) => {
    const { url, d } = await startTestDaemon(t);
    const img = scriptImage(tempDir(t), "quick", "exit 0");
    const ids = Array.from({ length: 200 }, (_, i) => `c-${i}`);
    const res = await Promise.all(ids.map((id) => call(url, "POST", "/v1/grants", body(id, img))));
    assert.ok(res.every((r) => r.status === 202), JSON.stringify(res.find((r) => r.status !== 202)?.body));
    await until(async () => (await d.store.list({ state: "completed", limit: 1000 })).length === 200, "all 200 grants to complete", 180_000, 100);
    for (const id of ids) assert.ok((await d.store.computeLog(id)), `log for ${id}`);
    assert.equal((await d.store.list({ limit: 1000 })).length, 200);
    const page1 = await call(url, "GET", "/v1/grants?limit=150");
    assert.equal(page1.body.grants.length, 150);
    const page2 = await call(url, "GET", `/v1/grants?limit=150&after=${page1.body.next_after}`);
    assert.equal(page2.body.grants.length, 50);
    assert.equal(page2.body.next_after, null);
  });

  it("if the state database can no longer be written, acknowledges nothing and reports the failure", async (t) => {
    const { url, d, logs } = await startTestDaemon(t);
    const img = scriptImage(tempDir(t), "x", "true");
    await (d.store as unknown as { worker: import("node:worker_threads").Worker }).worker.terminate();
    assert.match((await d.failed).message, /state database writer failed/);
    const r = await call(url, "POST", "/v1/grants", body("nowrite-1", img));
    assert.equal(r.status, 503, "a store that cannot be written is unavailable, never a 500");
    assert.equal(r.body.error, "unavailable");
    assert.equal(r.headers.get("retry-after"), "5");
    assert.equal((await d.store.get("nowrite-1")), null);
    assert.equal((await call(url, "GET", "/healthz")).status, 200, "the listener still answers (the CLI exits non-zero on `failed`)");
    assert.ok(logs.lines.some((l) => l.includes('"level":"fatal"') && l.includes("can no longer be written")), `a fatal log line: ${logs.lines.filter((l) => l.includes("writer")).join("\n")}`);
    // The failed request's own log line carries its request id (the per-request logger is built on first use).
    assert.ok(logs.lines.some((l) => l.includes('"msg":"store write failed; answered 503"') && /"reqId":"req-[0-9a-z]+"/.test(l) && l.includes('"component":"listener"')));
    assert.equal((await call(url, "GET", "/readyz", undefined, {}, null)).status, 503, "not ready without a writable store");
  });

  it("returns 503 while shutting down", async (t) => {
    const td = await startTestDaemon(t);
    td.d.listener.drain();
    assert.equal((await call(td.url, "GET", "/healthz")).status, 503);
  });

  it("serves Prometheus metrics behind the token, or on metrics_bind without it", async (t) => {
    const { url } = await startTestDaemon(t);
    const img = scriptImage(tempDir(t), "q", "exit 0");
    await call(url, "POST", "/v1/grants", body("met-1", img));
    await call(url, "POST", "/v1/grants", body("met-2", img, { region: "nowhere" }));
    await waitState(url, "met-1", ["completed"]);
    assert.equal((await call(url, "GET", "/metrics", undefined, {}, null)).status, 401);
    // The counts follow acknowledged writes: a moment after a reader can see the commit.
    const m = await until(async () => {
      const r = await call(url, "GET", "/metrics");
      return r.status === 200 && /cb_grants\{state="completed",backend="local"\} 1/.test(r.text) ? r : null;
    }, "cb_grants to count the completed grant");
    assert.doesNotMatch(m.text, /cb_grants\{state="(terminating|running|provisioning)"/);
    assert.match(m.text, /cb_grant_declines_total\{backend="local",code="region_not_served"\} 1/);
    assert.match(m.text, /cb_provision_duration_seconds_count\{backend="local"\} 1/);
    assert.match(m.text, /cb_grant_to_ready_seconds_count\{backend="local"\} 1/);
    assert.match(m.text, /cb_store_write_seconds_count\{op="group_commit"\} \d+/);
    assert.match(m.text, /^process_resident_memory_bytes /m);
    assert.match(m.text, /^nodejs_eventloop_lag_p99_seconds /m);

    const sep = await startTestDaemon(t, { listenerExtra: 'metrics_bind = "127.0.0.1:0"' });
    assert.ok(sep.d.metricsUrl);
    const open = await call(sep.d.metricsUrl!, "GET", "/metrics", undefined, {}, null);
    assert.equal(open.status, 200);
    assert.match(open.text, /cb_grants_in_flight/);
    assert.equal((await call(sep.url, "GET", "/metrics")).status, 404, "not on the main listener when metrics_bind is set");
  });
});
