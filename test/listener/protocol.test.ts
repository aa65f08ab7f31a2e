import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { AccessLog } from "../../src/listener/access-log.js";
import { classifyStoreError } from "../../src/listener/store-errors.js";
import { buildListener } from "../../src/listener/server.js";
import type { GrantManager } from "../../src/lifecycle/manager.js";
import type { Store } from "../../src/store/store.js";
import { createLogger } from "../../src/util/logger.js";
import { GrantView } from "../../src/listener/schemas.js";
import { TEST_TOKEN, tickIn } from "../helpers/config.js";
import { LogSink, startTestDaemon } from "../helpers/daemon.js";
import { call, until } from "../helpers/http.js";
import { scriptImage } from "../helpers/images.js";
import { tempDir } from "../helpers/tmp.js";

function body(id: string, img: { url: string; sha256: string }) {
  return {
    grant: { request_id: id, region: "local", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: tickIn(120) },
    envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" } },
  };
}

/** A listener on its own (no daemon) with a manager whose submit() fails as given. */
async function listenerWith(t: { after: (fn: () => Promise<void>) => void }, submitError: Error, notReady: () => string | null = () => null) {
  const logs = new LogSink();
  const l = buildListener({
    manager: { submit: async () => Promise.reject(submitError) } as unknown as GrantManager,
    store: null as unknown as Store,
    card: () => {
      throw new Error("unused");
    },
    token: TEST_TOKEN,
    log: createLogger("info", logs),
    bodyLimit: 1024 * 1024,
    notReadyReason: notReady,
  });
  await l.app.listen({ host: "127.0.0.1", port: 0 });
  t.after(() => l.app.close());
  return { url: `http://127.0.0.1:${(l.app.server.address() as { port: number }).port}`, logs, l };
}

const post = { grant: { request_id: "s-1", region: "local", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: 10 ** 9 }, envelope: { image: { url: "file:///x", sha256: "a".repeat(64), format: "bundle" } } };

describe("listener protocol points", () => {
  it("accepts `Authorization: bearer <token>` (scheme case-insensitive, RFC 9110)", async (t) => {
    const { url } = await startTestDaemon(t);
    for (const scheme of ["bearer", "BEARER", "Bearer"]) assert.equal((await call(url, "GET", "/v1/provider-card", undefined, { authorization: `${scheme} ${TEST_TOKEN}` })).status, 200, scheme);
    assert.equal((await call(url, "GET", "/v1/provider-card", undefined, { authorization: `bearer x${TEST_TOKEN}` })).status, 401);
  });

  it("DELETE with content-type application/json and no body cancels; a JSON body in UTF-16 is 415", async (t) => {
    const { url, d } = await startTestDaemon(t);
    const img = scriptImage(tempDir(t), "forever", "sleep 600");
    assert.equal((await call(url, "POST", "/v1/grants", body("del-1", img))).status, 202);
    await until(async () => (await d.store.get("del-1"))?.state === "running", "running");
    const del = await fetch(`${url}/v1/grants/del-1`, { method: "DELETE", headers: { authorization: `Bearer ${TEST_TOKEN}`, "content-type": "application/json" } });
    assert.equal(del.status, 202, await del.text());
    await until(async () => (await d.store.get("del-1"))?.state === "cancelled", "cancelled");

    const text = JSON.stringify(body("utf16-1", img));
    const utf16 = await fetch(`${url}/v1/grants`, { method: "POST", headers: { authorization: `Bearer ${TEST_TOKEN}`, "content-type": "application/json; charset=utf-16" }, body: Buffer.from(`\ufeff${text}`, "utf16le") });
    assert.equal(utf16.status, 415);
    assert.match(((await utf16.json()) as { message: string }).message, /charset utf-16/);
    assert.equal((await d.store.get("utf16-1")), null, "nothing stored");
    const utf8 = await call(url, "POST", "/v1/grants", text, { "content-type": 'application/json; charset="UTF-8"' });
    assert.equal(utf8.status, 202, utf8.text);
    assert.equal((await call(url, "POST", "/v1/grants", "", { "content-type": "application/json" })).body.message, "(body): a JSON body is required");
  });

  it("answers match the documented (zod) schemas; a local grant never carries a private key", async (t) => {
    const { url, d } = await startTestDaemon(t);
    const img = scriptImage(tempDir(t), "quick", "exit 0");
    await call(url, "POST", "/v1/grants", body("pk-1", img));
    await until(async () => (await d.store.get("pk-1"))?.state === "completed", "completed");
    const g = await call(url, "GET", "/v1/grants/pk-1");
    assert.ok((await d.store.get("pk-1"))!.private_key, "the bridge did generate a key (no ssh_public_key in the envelope)");
    assert.equal(g.body.private_key, undefined, "but a local grant has no SSH host to use it on");
    GrantView.parse(g.body);
  });

  it("/readyz is 503 until resume has finished and while the store cannot be written; /healthz stays 200", async (t) => {
    let reason: string | null = "resuming open grants";
    const { url } = await listenerWith(t, new Error("unused"), () => reason);
    const r = await call(url, "GET", "/readyz", undefined, {}, null);
    assert.equal(r.status, 503);
    assert.deepEqual(r.body, { status: "not_ready", reason: "resuming open grants" });
    assert.equal((await call(url, "GET", "/healthz", undefined, {}, null)).status, 200);
    reason = null;
    assert.deepEqual((await call(url, "GET", "/readyz", undefined, {}, null)).body, { status: "ready" });
    const td = await startTestDaemon(t);
    await td.d.ready;
    assert.equal((await call(td.url, "GET", "/readyz", undefined, {}, null)).status, 200, "a daemon is ready once resume finished");
  });

  it("store write failures: SQLITE_FULL/ENOSPC 507, other store I/O 503 with Retry-After, never 500", async (t) => {
    const sqlite = (code: string, message: string) => Object.assign(new Error(message), { name: "SqliteError", code });
    const cases: [Error, number][] = [
      [sqlite("SQLITE_FULL", "database or disk is full"), 507],
      [Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" }), 507],
      [Object.assign(new Error("database or disk is full"), { name: "SqliteError" }), 507],
      [sqlite("SQLITE_IOERR_WRITE", "disk I/O error"), 503],
      [sqlite("SQLITE_READONLY", "attempt to write a readonly database"), 503],
      [sqlite("SQLITE_BUSY", "database is locked"), 503],
      [new Error("state database writer failed: the writer thread exited with code 1"), 503],
    ];
    for (const [err, status] of cases) {
      const { url, logs } = await listenerWith(t, err);
      const r = await call(url, "POST", "/v1/grants", post);
      assert.equal(r.status, status, `${err.message}: ${r.text}`);
      assert.equal(r.body.error, status === 507 ? "insufficient_storage" : "unavailable");
      assert.equal(r.headers.get("retry-after"), status === 503 ? "5" : null);
      assert.ok(logs.lines.some((l) => l.includes('"level":"warn"') && l.includes("store write failed")));
    }
    assert.equal(classifyStoreError(new TypeError("x is undefined")), null, "a bug is not a store fault");
    const bug = await listenerWith(t, new TypeError("x is undefined"));
    assert.equal((await call(bug.url, "POST", "/v1/grants", post)).status, 500);
  });

  it("logs every 401 and 4xx with the reason, never the token", async (t) => {
    const { url, logs } = await startTestDaemon(t);
    await call(url, "GET", "/v1/grants", undefined, {}, "wrong-token-SECRET");
    await call(url, "GET", `/v1/grants?token=${TEST_TOKEN}&state=bogus`);
    await call(url, "GET", "/v1/grants/nope");
    await call(url, "GET", "/v1/nowhere");
    const refused = logs.lines.filter((l) => l.includes('"msg":"request refused"')).map((l) => JSON.parse(l) as { level: string; access: { method: string; path: string; status: number; reason: string; remote: string } });
    assert.deepEqual(
      refused.map((r) => [r.level, r.access.status, r.access.path]),
      [
        ["warn", 401, "/v1/grants"],
        ["info", 400, "/v1/grants"],
        ["info", 404, "/v1/grants/nope"],
        ["info", 404, "/v1/nowhere"],
      ],
    );
    assert.match(refused[0]!.access.reason, /wrong bearer token/);
    assert.match(refused[1]!.access.reason, /^invalid_request: state:/);
    assert.equal(refused[0]!.access.remote, "127.0.0.1");
    assert.ok(!logs.text.includes("wrong-token-SECRET") && !logs.text.includes(TEST_TOKEN), "no token, right or wrong, in the log");
  });

  it("the start-up line is one JSON line written whatever the log level (unless silent)", async (t) => {
    const warn = await startTestDaemon(t, { logLevel: "warn" });
    await warn.d.ready;
    const lines = warn.logs.lines.map((l) => JSON.parse(l) as { level: string; msg: string; url?: string });
    assert.deepEqual(lines.filter((l) => l.level === "info").map((l) => l.msg), ["compute-bridge listening"], "only the start-up line below warn");
    assert.equal(lines.find((l) => l.msg === "compute-bridge listening")!.url, warn.url);
    assert.equal(warn.d.log.level, "warn", "and the level is back to what the config says");
    const silent = await startTestDaemon(t, { logLevel: "silent" });
    assert.deepEqual(silent.logs.lines, []);
  });

  it("the access log is rate-limited and counts what it dropped", () => {
    const logs = new LogSink();
    let now = 0;
    const a = new AccessLog(createLogger("info", logs), 10, 5, () => now);
    const e = { method: "GET", path: "/x", status: 401, reason: "r", remote: "127.0.0.1" };
    for (let i = 0; i < 100; i++) a.refused(e);
    assert.equal(logs.lines.length, 5, "a burst of 5, then nothing");
    now += 1000; // 10 tokens back
    a.refused(e);
    assert.equal(logs.lines.length, 6);
    assert.equal(JSON.parse(logs.lines[5]!).suppressed, 95);
  });
});
