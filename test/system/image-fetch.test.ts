import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { describe, it } from "node:test";
import { BIN_LIKE_RUNNER, spawnDaemon } from "../helpers/child-daemon.js";
import { tickIn, writeLocalConfig } from "../helpers/config.js";
import { startTestDaemon } from "../helpers/daemon.js";
import { call, until } from "../helpers/http.js";
import { tempDir } from "../helpers/tmp.js";
import { loopbackServer } from "../helpers/http-server.js";

const SHA = "ab".repeat(32);

/** An HTTP server on 127.0.0.1 that accepts connections and never answers. */
async function silentServer(t: { after(fn: () => unknown): void }) {
  const s = await loopbackServer(t);
  return { ...s, url: `${s.url}/img` };
}

function grantBody(id: string, url: string, validInSeconds = 600, sha256 = SHA) {
  return {
    grant: { request_id: id, region: "local", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: tickIn(validInSeconds) },
    envelope: { image: { url, sha256, format: "bundle" } },
  };
}

describe("image fetch through the daemon", { timeout: 60_000 }, () => {
  it("refused image URLs are a 400 naming envelope.image.url, and nothing is stored", async (t) => {
    const dir = tempDir(t);
    const token = path.join(dir, "listener-token");
    writeFileSync(token, "x");
    const { url } = await startTestDaemon(t, { local: { image_roots: [path.join(dir, "images")] } });
    const cases: [string, RegExp][] = [
      ["file:///etc/shadow", /image_roots/],
      ["file:///proc/self/environ", /image_roots/],
      [pathToFileURL(token).href, /image_roots/],
      ["http://169.254.169.254/latest/meta-data/iam/", /not a public address/],
      ["http://127.0.0.1:8787/v1/grants", /not a public address/],
      ["http://[::1]:22/", /not a public address/],
      ["http://10.0.0.1/img", /not a public address/],
      ["http://localhost:1/img", /not a public address/],
      ["ftp://example.com/img", /http/],
    ];
    for (const [i, [u, why]] of cases.entries()) {
      const r = await call(url, "POST", "/v1/grants", grantBody(`refused-${i}`, u));
      assert.equal(r.status, 400, `${u}: ${r.text}`);
      assert.equal(r.body.issues[0].path, "envelope.image.url", r.text);
      assert.match(r.text, why, u);
      assert.equal((await call(url, "GET", `/v1/grants/refused-${i}`)).status, 404, "nothing stored");
    }
  });

  it("a fetch from a server that never answers ends at valid_to: the grant fails instead of holding its slot", async (t) => {
    const srv = await silentServer(t);
    const { url } = await startTestDaemon(t, { imageAllowCidrs: ["127.0.0.1/32"], local: { image_idle_timeout_seconds: 600 } });
    const body = grantBody("silent-1", srv.url, 3);
    assert.equal((await call(url, "POST", "/v1/grants", body)).status, 202);
    await until(() => srv.connections() > 0, "the fetch to connect", 10_000);
    const validToMs = Date.parse("2026-01-01T00:00:00Z") + body.grant.valid_to * 1000;
    const g = await until(async () => {
      const r = await call(url, "GET", "/v1/grants/silent-1");
      return ["failed", "expired"].includes(r.body.state) ? r.body : null;
    }, "the grant to end", 15_000);
    assert.ok(Date.now() < validToMs + 6000, "ended within a few seconds of valid_to");
    assert.doesNotMatch(JSON.stringify(g), /127\.0\.0\.1|ECONN/, "no network details in the grant");
    await until(() => srv.sockets.size === 0, "the connection to be closed", 5000);
  });

  it("SIGTERM while fetches are blocked (silent server, FIFO): the process exits within 10 s (README)", async (t) => {
    const srv = await silentServer(t);
    const dir = tempDir(t);
    const fifo = path.join(dir, "fifo");
    execFileSync("mkfifo", [fifo]);
    const cfg = writeLocalConfig(dir, { stateDir: path.join(dir, "state"), imageAllowCidrs: ["127.0.0.1/32"], local: { image_idle_timeout_seconds: 600 } });
    const d = await spawnDaemon(cfg, {}, BIN_LIKE_RUNNER);
    t.after(() => d.kill9());
    assert.equal((await call(d.url, "POST", "/v1/grants", grantBody("term-fifo", pathToFileURL(fifo).href))).status, 202);
    assert.equal((await call(d.url, "POST", "/v1/grants", grantBody("term-1", srv.url))).status, 202);
    await until(() => srv.connections() > 0, "the fetch to connect", 10_000);
    const at = Date.now();
    const code = await d.stop();
    const took = Date.now() - at;
    assert.equal(code, 0, d.output());
    assert.ok(took < 10_000, `exited after ${took} ms`);
    assert.equal(srv.sockets.size, 0, "the fetch's connection is gone with the process");
  });
});
