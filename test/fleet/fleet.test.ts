import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { parseConfigText } from "../../src/config/load.js";
import { Almanac } from "../../src/domain/index.js";
import { buildCard, configDigest } from "../../src/fleet/card.js";
import { Fleet, NoBackendError } from "../../src/fleet/fleet.js";
import { NotBuiltError, builtBackends } from "../../src/backends/registry.js";
import { systemClock } from "../../src/util/clock.js";
import { Identity, verifySignedDoc } from "../../src/util/identity.js";
import { createLogger } from "../../src/util/logger.js";
import { staticBackend } from "../helpers/fake-backend.js";

const grant = (over: Partial<{ region: string; tdx_required: boolean; cpu_millicores: number; ram_mib: number }> = {}) => ({
  request_id: "r1",
  region: "eu-1",
  tdx_required: false,
  cpu_millicores: 1000,
  ram_mib: 1024,
  valid_to: 100,
  ...over,
});

const a = staticBackend("a", { regions: ["eu-1", "us-1"], tdx_capable: false, max_cpu_millicores: 4000, max_ram_mib: 8192 });
const b = staticBackend("b", { regions: ["eu-1", "ap-1"], tdx_capable: true, max_cpu_millicores: 16000, max_ram_mib: 65536 });
const full = staticBackend("full", { regions: ["eu-1"], tdx_capable: true, max_cpu_millicores: 64000, max_ram_mib: 65536 }, { atCapacity: true });

describe("Fleet routing", () => {
  it("first match wins, in fleet order", () => {
    const f = Fleet.of([a, b], systemClock);
    assert.equal(f.provisionForGrant(grant()).backend.name, "a");
    const g = Fleet.of([b, a], systemClock);
    assert.equal(g.provisionForGrant(grant()).backend.name, "b");
  });

  it("skips backends that decline and excluded ones", () => {
    const f = Fleet.of([full, a, b], systemClock);
    assert.equal(f.provisionForGrant(grant()).backend.name, "a");
    assert.equal(f.provisionForGrant(grant({ tdx_required: true })).backend.name, "b");
    assert.equal(f.provisionForGrant(grant({ region: "ap-1" })).backend.name, "b");
    assert.equal(f.provisionForGrant(grant(), undefined, new Set(["a"])).backend.name, "b");
  });

  it("lists every backend's machine-readable decline reason when none can", () => {
    const f = Fleet.of([a, full, b], systemClock);
    let err: unknown;
    try {
      f.provisionForGrant(grant({ region: "eu-1", tdx_required: true, cpu_millicores: 32000 }));
    } catch (e) {
      err = e;
    }
    assert.ok(err instanceof NoBackendError);
    assert.deepEqual(
      err.declines.map((d) => [d.backend, d.code]),
      [
        ["a", "tdx_not_supported"],
        ["full", "at_capacity"],
        ["b", "too_large"],
      ],
    );
    const r = f.route(grant({ region: "mars-1" }));
    assert.equal(r.ok, false);
    if (!r.ok) assert.ok(r.declines.every((d) => d.code === "region_not_served"));
  });
});

const CFG = `
[bridge]
provider_id = "p1"
state_dir = "/tmp/cb-unused"
[listener]
bind = "127.0.0.1:0"
token_file = "token"
[almanac]
genesis = 2026-01-01T00:00:00Z
tick_seconds = 1
[backends.local]
region = "local-1"
cpu_millicores = 2000
ram_mib = 2048
max_concurrent = 2
`;

describe("Fleet from config and the ProviderCard", () => {
  const ctx = { providerId: "p1", stateDir: "/tmp/cb-unused", configDir: "/tmp", log: createLogger("silent"), clock: systemClock, almanac: new Almanac(new Date(0), 1) };

  it("builds one backend per configured section", async () => {
    const f = await Fleet.build(parseConfigText(CFG, "t"), ctx);
    assert.deepEqual(f.backends.map((x) => x.name), ["local"]);
  });

  it("refuses cloud backends this build does not drive, with a clear message", async () => {
    const unbuilt = (["aws", "gcp", "azure", "baremetal"] as const).filter((n) => !builtBackends().includes(n));
    if (unbuilt.length === 0) return;
    const n = unbuilt[0]!;
    const cfg = parseConfigText(CFG, "t");
    await assert.rejects(Fleet.build({ ...cfg, backends: { ...cfg.backends, [n]: {} as never } }, ctx), (e: unknown) => e instanceof NotBuiltError && /not built yet/.test((e as Error).message));
  });

  it("card: regions unioned, sorted and deduplicated; TDX if any; caps summed; signed", () => {
    const cfg = parseConfigText(CFG, "t");
    const id = Identity.ephemeral();
    const card = buildCard(cfg, Fleet.of([a, b, full], systemClock), id);
    assert.deepEqual(card.regions, ["ap-1", "eu-1", "us-1"]);
    assert.equal(card.tdx_capable, true);
    assert.equal(card.max_cpu_millicores, 4000 + 16000 + 64000);
    assert.equal(card.max_ram_mib, 8192 + 65536 + 65536);
    assert.deepEqual(card.backends.map((x) => x.name), ["a", "b", "full"]);
    assert.equal(card.config_digest, configDigest(cfg));
    assert.ok(verifySignedDoc(card, card.public_key));
    assert.equal(verifySignedDoc({ ...card, max_ram_mib: 1 } as typeof card, card.public_key), false, "a tampered card must not verify");
    const noTdx = buildCard(cfg, Fleet.of([a], systemClock), id);
    assert.equal(noTdx.tdx_capable, false);
  });
});
