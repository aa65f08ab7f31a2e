import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { parseConfigText } from "../../src/config/load.js";
import type { BootConfig } from "../../src/config/schema.js";
import { Almanac, type ComputeGrant } from "../../src/domain/index.js";
import { Budgets, windowOf } from "../../src/fleet/budget.js";
import { Fleet } from "../../src/fleet/fleet.js";
import { BILLING, billedSeconds, costOf } from "../../src/fleet/pricing.js";
import { Spend } from "../../src/fleet/spend.js";
import { createLogger } from "../../src/util/logger.js";
import { staticBackend } from "../helpers/fake-backend.js";
import { ManualClock } from "../helpers/manual-clock.js";

const EXAMPLE = fileURLToPath(new URL("../../config/example.toml", import.meta.url));

describe("billing rules (cost = price x billed time)", () => {
  it("AWS and GCP: per second after a 60 s minimum; Azure: 300 s minimum; own machines: per second", () => {
    assert.equal(billedSeconds(0, BILLING.aws), 0, "nothing ran, nothing billed");
    assert.equal(billedSeconds(1, BILLING.aws), 60);
    assert.equal(billedSeconds(59.9, BILLING.gcp), 60);
    assert.equal(billedSeconds(61.2, BILLING.aws), 62);
    assert.equal(billedSeconds(90, BILLING.azure), 300);
    assert.equal(billedSeconds(300.4, BILLING.azure), 301);
    assert.equal(billedSeconds(0.4, BILLING.baremetal), 1);
    assert.equal(billedSeconds(3600, BILLING.local), 3600);
    // 0.096/h for 61.2 s on EC2: 62 s billed.
    assert.equal(costOf(0.096, 61.2, BILLING.aws), 0.001653);
    assert.equal(costOf(0.5, 90, BILLING.azure), 0.041667);
    assert.equal(costOf(3.6, 10, BILLING.baremetal), 0.01);
    assert.equal(costOf(1, 3600 * 24, BILLING.gcp), 24);
  });
});

describe("Budgets", () => {
  const day = Date.parse("2026-12-01T10:00:00Z");

  it("caps per fleet and per backend, per UTC day and month; actual cost replaces the worst case", () => {
    const b = new Budgets({ per_day: 10, per_month: 100 }, new Map([["aws", { per_day: 4 }]]));
    assert.equal(b.check("aws", 4, day), null);
    b.charge({ request_id: "a", backend: "aws", amount: 4, at_ms: day });
    assert.deepEqual(b.check("aws", 0.01, day), { scope: "aws", period: "day", limit: 4, remaining: 0 });
    assert.equal(b.check("gcp", 6, day), null, "gcp only meets the fleet cap");
    assert.deepEqual(b.check("gcp", 6.5, day), { scope: "fleet", period: "day", limit: 10, remaining: 6 });
    b.settle("a", 1.25);
    assert.equal(b.check("aws", 2.75, day), null, "the actual cost freed the rest of the worst case");
    assert.deepEqual(b.check("aws", 2.76, day)?.remaining, 2.75);
    const rep = b.report(day).find((r) => r.scope === "aws" && r.period === "day")!;
    assert.deepEqual(rep, { scope: "aws", period: "day", window: "2026-12-01", spent: 1.25, reserved: 0, limit: 4 });
  });

  it("rolls over at UTC midnight and at the month's start (injected clock); a grant stays charged to its accept day", () => {
    const clock = new ManualClock(Date.parse("2026-12-31T23:59:00Z"));
    const b = new Budgets({ per_day: 5, per_month: 7 }, new Map());
    b.charge({ request_id: "late", backend: "local", amount: 5, at_ms: clock.now() });
    assert.equal(b.check("local", 1, clock.now())?.period, "day");
    clock.advance(60_000); // 2027-01-01T00:00:00Z: a new day and a new month
    assert.equal(windowOf("day", clock.now()), "2027-01-01");
    assert.equal(b.check("local", 5, clock.now()), null);
    b.charge({ request_id: "jan", backend: "local", amount: 5, at_ms: clock.now() });
    assert.equal(b.check("local", 0.5, clock.now())?.period, "day");
    clock.advance(24 * 3600_000);
    assert.deepEqual(b.check("local", 3, clock.now()), { scope: "fleet", period: "month", limit: 7, remaining: 2 });
    b.prune(clock.now());
    assert.ok(b.get("late"), "an open grant of last month keeps its charge until it ends");
    b.settle("late", 4);
    b.prune(clock.now());
    assert.equal(b.get("late"), undefined, "an ended grant of a past month is forgotten");
    assert.ok(b.get("jan"));
  });

  it("admission never overshoots: 200 grants at once against a day cap, the sum of worst cases stays within it", () => {
    const clock = new ManualClock(Date.parse("2026-12-01T00:00:00Z"));
    const almanac = new Almanac(new Date("2026-01-01T00:00:00Z"), 1);
    const cfg = parseConfigText(
      `[bridge]\nprovider_id = "p"\nstate_dir = "/tmp/x"\n[listener]\nbind = "127.0.0.1:0"\ntoken_file = "t"\n[almanac]\ngenesis = 2026-01-01T00:00:00Z\ntick_seconds = 1\n[fleet.budget]\nper_day = 10\n[backends.local]\nregion = "l"\ncpu_millicores = 1000000\nram_mib = 1000000\nmax_concurrent = 1000\nprice_per_cpu_hour = 1.0\nprice_per_gib_hour = 0\n`,
      "t",
    );
    const spend = Spend.fromConfig(cfg, almanac, clock);
    const fleet = Fleet.of([staticBackend("local", { regions: ["l"], tdx_capable: false, max_cpu_millicores: 1e6, max_ram_mib: 1e6 })], clock, 60_000, spend);
    const validTo = (clock.now() - Date.parse("2026-01-01T00:00:00Z")) / 1000 + 3600;
    let accepted = 0;
    let worst = 0;
    for (let i = 0; i < 200; i++) {
      const g: ComputeGrant = { request_id: `b-${i}`, region: "l", tdx_required: false, cpu_millicores: 250, ram_mib: 64, valid_to: validTo };
      const r = fleet.admit(g);
      if (r.ok) {
        accepted++;
        worst += r.worst_case;
      } else {
        assert.equal(r.declines[0]!.code, "budget_exhausted");
        assert.equal(r.declines[0]!.currency, "USD");
        assert.ok(r.declines[0]!.remaining! < 0.25);
      }
    }
    // 0.25/h for an hour each: 40 fit in 10.
    assert.equal(accepted, 40);
    assert.ok(worst <= 10 + 1e-9, `sum of worst cases ${worst}`);
    fleet.settle("b-0", 0.05);
    assert.equal(fleet.admit({ request_id: "b-new", region: "l", tdx_required: false, cpu_millicores: 250, ram_mib: 64, valid_to: validTo }).ok, false, "0.2 freed is less than a worst case of 0.25");
    fleet.settle("b-1", 0);
    assert.equal(fleet.admit({ request_id: "b-new", region: "l", tdx_required: false, cpu_millicores: 250, ram_mib: 64, valid_to: validTo }).ok, true);
  });
});

describe("cheapest policy across aws, gcp, azure and bare metal", () => {
  function exampleWithPrices(policy: "ordered" | "cheapest", prices: { aws: number; gcp: number; azure: number; cpu: number }): BootConfig {
    const text = readFileSync(EXAMPLE, "utf8");
    const cfg = parseConfigText(text, EXAMPLE);
    const R = "europe-west4";
    // Every backend serves one region, so all four can take the grant.
    cfg.backends.aws!.regions = { [R]: Object.values(cfg.backends.aws!.regions)[0]! };
    cfg.backends.azure!.regions = [R];
    cfg.backends.azure!.subnet_id = Object.values(cfg.backends.azure!.subnet_id as Record<string, string>)[0]!;
    for (const m of cfg.backends.baremetal!.machines) m.region = R;
    cfg.fleet.policy = policy;
    for (const t of cfg.backends.aws!.instance_types) cfg.backends.aws!.prices[t] = prices.aws;
    for (const m of [...cfg.backends.gcp!.machine_types, ...cfg.backends.gcp!.tdx_machine_types]) cfg.backends.gcp!.prices[m.name] = prices.gcp;
    for (const m of [...cfg.backends.azure!.vm_sizes, ...cfg.backends.azure!.tdx_vm_sizes]) cfg.backends.azure!.prices[m.name] = prices.azure;
    for (const m of cfg.backends.baremetal!.machines) Object.assign(m, { price_per_cpu_hour: prices.cpu, price_per_gib_hour: 0 });
    return cfg;
  }

  async function fleetOf(cfg: BootConfig) {
    const clock = new ManualClock(Date.parse("2026-12-01T00:00:00Z"));
    const almanac = new Almanac(new Date("2026-01-01T00:00:00Z"), 1);
    const f = await Fleet.build(cfg, { providerId: "p", stateDir: "/tmp/cb-unused", configDir: path.dirname(EXAMPLE), log: createLogger("silent"), clock, almanac });
    const grant: ComputeGrant = { request_id: "c-1", region: "europe-west4", tdx_required: false, cpu_millicores: 2000, ram_mib: 4096, valid_to: (clock.now() - Date.parse("2026-01-01T00:00:00Z")) / 1000 + 600 };
    return { f, grant };
  }

  for (const [cheapest, prices] of [
    ["gcp", { aws: 0.2, gcp: 0.1, azure: 0.3, cpu: 0.5 }],
    ["azure", { aws: 0.2, gcp: 0.15, azure: 0.12, cpu: 0.5 }],
    ["baremetal", { aws: 0.2, gcp: 0.15, azure: 0.3, cpu: 0.01 }],
    ["aws", { aws: 0.09, gcp: 0.1, azure: 0.3, cpu: 0.5 }],
  ] as const) {
    it(`picks ${cheapest} when it is cheapest for the grant, ordered picks the operator's first`, async (t) => {
      const { f, grant } = await fleetOf(exampleWithPrices("cheapest", prices));
      t.after(() => f.close());
      const r = f.route(grant);
      assert.equal(r.ok && r.backend.name, cheapest);
      const { f: ordered } = await fleetOf(exampleWithPrices("ordered", prices));
      t.after(() => ordered.close());
      const o = ordered.route(grant);
      assert.equal(o.ok && o.backend.name, ordered.backends[0]!.name);
    });
  }

  it("ties go to the operator's order", async (t) => {
    const { f, grant } = await fleetOf(exampleWithPrices("cheapest", { aws: 0.1, gcp: 0.1, azure: 0.1, cpu: 0.05 }));
    t.after(() => f.close());
    // bare metal: 2 CPUs x 0.05 = 0.1, the same as every cloud: the first in order wins.
    const r = f.route(grant);
    assert.equal(r.ok && r.backend.name, f.backends[0]!.name);
    assert.equal(r.ok && r.price_per_hour, 0.1);
  });
});
