import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { describe, it } from "node:test";
import { bindingDigest } from "../../src/attestation/binding.js";
import { grantEvidence } from "../../src/attestation/record.js";
import { AttestationEvidence, type CollectedEvidence } from "../../src/domain/attestation.js";
import { buildComputeLog } from "../../src/lifecycle/compute-log.js";
import type { GrantManager } from "../../src/lifecycle/manager.js";
import { buildListener } from "../../src/listener/server.js";
import { createLogger } from "../../src/util/logger.js";
import { SqliteStore as Store } from "../../src/store/sqlite.js";
import { systemClock } from "../../src/util/clock.js";
import { Identity } from "../../src/util/identity.js";
import { tickIn } from "../helpers/config.js";
import { startTestDaemon } from "../helpers/daemon.js";
import { call, until } from "../helpers/http.js";
import { scriptImage } from "../helpers/images.js";
import { tempDir } from "../helpers/tmp.js";
import { GCE_QUOTE } from "./guest-run.js";

/** The real listener over a store; only reads are made, so no manager is needed. */
function listenerOver(store: Store) {
  const { app } = buildListener({ manager: {} as GrantManager, store, card: () => ({}) as never, token: "tok", log: createLogger("silent"), bodyLimit: 1 << 20 });
  const get = (url: string) => app.inject({ method: "GET", url, headers: { authorization: "Bearer tok" } });
  return { app, get };
}

const sha256 = (s: string) => createHash("sha256").update(s).digest("hex");
const image = { url: "file:///x", sha256: "a".repeat(64), format: "bundle" as const };
const tdxGrant = (id: string) => ({ request_id: id, region: "r", tdx_required: true, cpu_millicores: 1000, ram_mib: 512, valid_to: 1 });
const instance = (id: string, attestation: CollectedEvidence | null) => ({
  request_id: id,
  backend: "gcp",
  instance_id: `i-${id}`,
  region: "r",
  host: "127.0.0.1",
  ssh_port: 22,
  ssh_user: "cb",
  host_key_sha256: null,
  started_at: "2026-11-28T20:00:00.000Z",
  cpu_millicores: 1000,
  ram_mib: 512,
  details: {},
  attestation,
});

describe("GET /v1/grants/{id}/attestation and the ComputeLog's attestation_sha256", () => {
  it("serves the evidence the backend collected, with the nonce's source; the log pins the exact bytes served", async (t) => {
    const store = new Store(tempDir(t), systemClock);
    t.after(() => store.close());
    const { app, get } = listenerOver(store);
    t.after(() => app.close());
    const nonce = "0f".repeat(32);
    await store.accept({ request_id: "tdx-1", grant: tdxGrant("tdx-1"), envelope: { image, attestation_nonce: nonce }, backend: "gcp", private_key: null, public_key: null });
    const collected: CollectedEvidence = {
      status: "present",
      platform: "gcp",
      format: "tdx-quote-v4",
      nonce,
      binding: { scheme: "compute-bridge/attestation/v1", request_id: "tdx-1", host_key_sha256: null, digest: bindingDigest("tdx-1", nonce, null).toString("hex") },
      blobs: { td_quote: GCE_QUOTE.toString("base64") },
    };
    // Before an instance exists: absent, and says why.
    let r = await get("/v1/grants/tdx-1/attestation");
    assert.equal(r.statusCode, 200);
    assert.deepEqual(r.json(), { status: "absent", platform: null, nonce, nonce_source: "requester", reason: "no instance has been provisioned for this grant" });
    const rec = await store.transition("tdx-1", "running", { instance: instance("tdx-1", collected) });
    r = await get("/v1/grants/tdx-1/attestation");
    assert.equal(r.statusCode, 200);
    assert.match(String(r.headers["content-type"]), /^application\/json/);
    const served = AttestationEvidence.parse(r.json());
    assert.deepEqual(served, { ...collected, nonce_source: "requester" });
    const log = buildComputeLog("p", rec, { state: "completed", exit_code: 0, cpu_seconds: 1, ended_at: "2026-11-28T20:01:00.000Z", error_kind: null, error_message: null }, 0, Identity.ephemeral());
    assert.equal(log.attestation_sha256, sha256(r.body), "SHA-256 of the served body");
  });

  it("a TDX grant without the requester's nonce reports the bridge's; 404 unknown, 400 malformed id", async (t) => {
    const store = new Store(tempDir(t), systemClock);
    t.after(() => store.close());
    const { app, get } = listenerOver(store);
    t.after(() => app.close());
    const acc = await store.accept({ request_id: "tdx-2", grant: tdxGrant("tdx-2"), envelope: { image }, backend: "gcp", private_key: null, public_key: null });
    const rec = await store.transition("tdx-2", "running", { instance: instance("tdx-2", null) });
    const e = grantEvidence(rec);
    assert.deepEqual(e, { status: "absent", platform: null, nonce: acc.record.attestation_nonce, nonce_source: "bridge", reason: "backend gcp collected no attestation evidence for this instance" });
    assert.equal((await get("/v1/grants/nope/attestation")).statusCode, 404);
    const bad = await get("/v1/grants/a%20b/attestation");
    assert.equal(bad.statusCode, 400);
    assert.match(bad.json().message, /id/);
  });

  it("through the daemon: behind the bearer token; a non-TDX grant with a nonce gets absent evidence and a log that pins it", async (t) => {
    const { url } = await startTestDaemon(t);
    const img = scriptImage(tempDir(t), "ok", "true");
    const nonce = "ab".repeat(16);
    const post = await call(url, "POST", "/v1/grants", {
      grant: { request_id: "n-1", region: "local", tdx_required: false, cpu_millicores: 500, ram_mib: 256, valid_to: tickIn(120) },
      envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" }, attestation_nonce: nonce.toUpperCase() },
    });
    assert.equal(post.status, 202, JSON.stringify(post.body));
    assert.equal((await call(url, "GET", "/v1/grants/n-1/attestation", undefined, {}, null)).status, 401);
    const log = await until(async () => {
      const r = await call(url, "GET", "/v1/grants/n-1/log");
      return r.status === 200 ? r.body : null;
    }, "the ComputeLog of n-1", 20_000);
    const ev = await call(url, "GET", "/v1/grants/n-1/attestation");
    assert.equal(ev.status, 200);
    assert.deepEqual(ev.body, { status: "absent", platform: null, nonce, nonce_source: "requester", reason: "the grant did not require TDX: no attestation evidence is collected" });
    assert.equal(log.attestation_sha256, sha256(JSON.stringify(ev.body)), "canonical JSON: the served bytes");
  });
});
