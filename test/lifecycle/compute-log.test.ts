import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { buildComputeLog } from "../../src/lifecycle/compute-log.js";
import type { GrantRecord, Outcome } from "../../src/store/store.js";
import { Identity, verifySignedDoc } from "../../src/util/identity.js";

const started = "2026-11-28T20:00:00.000Z";
function record(withInstance: boolean): GrantRecord {
  return {
    seq: 1,
    request_id: "r-1",
    body_digest: "d",
    grant: { request_id: "r-1", region: "local", tdx_required: false, cpu_millicores: 500, ram_mib: 256, valid_to: 1 },
    envelope: { image: { url: "file:///x", sha256: "a".repeat(64), format: "bundle" } },
    state: "terminating",
    backend: "local",
    placement: null,
    price_per_hour: null,
    cost: null,
    instance: withInstance
      ? { request_id: "r-1", backend: "local", instance_id: "local-r-1", region: "local", host: null, ssh_port: null, ssh_user: null, host_key_sha256: null, started_at: started, cpu_millicores: 500, ram_mib: 256, details: {} }
      : null,
    private_key: null,
    public_key: null,
    error_kind: null,
    error_message: null,
    attempts: [],
    cancel_requested: false,
    outcome: null,
    created_at: started,
    updated_at: started,
  };
}
const outcome = (ended_at: string | null): Outcome => ({ state: "completed", exit_code: 0, cpu_seconds: 0.5, ended_at, error_kind: null, error_message: null });

describe("ComputeLog", () => {
  it("bills allocated CPU and RAM over the wall time, signed", () => {
    const id = Identity.ephemeral();
    const log = buildComputeLog("p", record(true), outcome("2026-11-28T20:00:10.000Z"), 0, id);
    assert.equal(log.usage.wall_seconds, 10);
    assert.equal(log.usage.cpu_millicore_seconds, 5000);
    assert.equal(log.usage.ram_mib_seconds, 2560);
    assert.ok(verifySignedDoc(log, id.publicKeyBase64));
  });

  it("never ends before it started (the backend's clock may read a millisecond behind the bridge's)", () => {
    const log = buildComputeLog("p", record(true), outcome("2026-11-28T19:59:59.999Z"), 0, Identity.ephemeral());
    assert.equal(log.ended_at, started);
    assert.equal(log.usage.wall_seconds, 0);
  });

  it("a grant that never got an instance has no start and no usage", () => {
    const log = buildComputeLog("p", record(false), outcome(null), Date.parse("2026-11-28T20:00:05Z"), Identity.ephemeral());
    assert.equal(log.started_at, null);
    assert.equal(log.ended_at, "2026-11-28T20:00:05.000Z");
    assert.equal(log.usage.wall_seconds, 0);
  });
});
