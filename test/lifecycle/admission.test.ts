import assert from "node:assert/strict";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { spawnDaemon, type ChildDaemon } from "../helpers/child-daemon.js";
import { tickIn, writeLocalConfig } from "../helpers/config.js";
import { startTestDaemon } from "../helpers/daemon.js";
import { call, until } from "../helpers/http.js";
import { scriptImage, type TestImage } from "../helpers/images.js";
import { tempDir } from "../helpers/tmp.js";

// Issue #15: a 202 is a promise. Capacity is reserved at accept, so an accepted grant never fails
// for capacity the bridge already knew about; provisioning runs through a bounded queue.

const TERMINAL = ["completed", "failed", "expired", "cancelled"];

function body(id: string, image: { url: string; sha256: string }, validIn = 120) {
  return {
    grant: { request_id: id, region: "local", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: tickIn(validIn) },
    envelope: { image: { url: image.url, sha256: image.sha256, format: "bundle" } },
  };
}

/** An image server that holds every request until released (or forever). */
async function heldImageServer(t: { after: (fn: () => unknown) => void }, img: TestImage) {
  const { readFileSync } = await import("node:fs");
  const held: http.ServerResponse[] = [];
  let requests = 0;
  const server = http.createServer((_req, res) => {
    requests++;
    held.push(res);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  t.after(() => {
    server.closeAllConnections();
    server.close();
  });
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/image`,
    sha256: img.sha256,
    get requests() {
      return requests;
    },
    releaseOne: () => held.shift()?.end(readFileSync(img.file)),
  };
}

async function finalStates(url: string, ids: string[]): Promise<Record<string, { state: string; error: { kind: string } | null }>> {
  const out: Record<string, { state: string; error: { kind: string } | null }> = {};
  await until(async () => {
    for (const id of ids) {
      const r = await call(url, "GET", `/v1/grants/${id}`);
      if (!TERMINAL.includes(r.body.state)) return false;
      out[id] = { state: r.body.state, error: r.body.error };
    }
    return true;
  }, "every accepted grant to end", 180_000, 50);
  return out;
}

describe("admission keeps its word", () => {
  for (const [posted, max] of [
    [10, 2],
    [200, 8],
  ] as const) {
    it(`${posted} grants at once with max_concurrent = ${max}: ${max} accepted, the rest declined at_capacity, every accepted one completes`, async (t) => {
      const d = await startTestDaemon(t, { local: { max_concurrent: max } });
      // Nothing ends before every post is answered: a finished grant would free its slot.
      const gate = path.join(d.dir, "gate");
      const img = scriptImage(d.dir, "gated", `while [ ! -e ${gate} ]; do sleep 0.05; done; exit 0`);
      const ids = Array.from({ length: posted }, (_, i) => `burst-${i}`);
      const res = await Promise.all(ids.map((id) => call(d.url, "POST", "/v1/grants", body(id, img))));
      const accepted = ids.filter((_, i) => res[i]!.status === 202);
      const declined = res.filter((r) => r.status === 422);
      assert.equal(accepted.length, max, `statuses: ${res.map((r) => r.status).join(",")}`);
      assert.equal(declined.length, posted - max);
      for (const r of declined) assert.deepEqual(r.body.declines.map((x: { code: string }) => x.code), ["at_capacity"]);
      writeFileSync(gate, "");
      const states = await finalStates(d.url, accepted);
      for (const id of accepted) assert.equal(states[id]!.state, "completed", `${id}: ${JSON.stringify(states[id])}`);
      // Released before a reader sees the grants end: the next grant is accepted at once.
      const after = body("after-burst", img);
      assert.equal((await call(d.url, "POST", "/v1/grants", after)).status, 202, "a slot is free as soon as a grant is seen ended");
      assert.equal((await finalStates(d.url, ["after-burst"]))["after-burst"]!.state, "completed");
    });
  }

  it("waiting grants hold a queue position, obey cancel and valid_to while waiting, and start in order as slots free", async (t) => {
    const d = await startTestDaemon(t, { imageAllowCidrs: ["127.0.0.0/8"], extra: "\n[fleet]\nprovision_concurrency = 1\n" });
    const img = scriptImage(d.dir, "held", "exit 0");
    const srv = await heldImageServer(t, img);
    for (const id of ["q-1", "q-2", "q-3", "q-4"]) assert.equal((await call(d.url, "POST", "/v1/grants", body(id, srv, id === "q-4" ? 3 : 120))).status, 202);
    await until(() => srv.requests === 1, "the first grant to start its download");
    const q2 = await call(d.url, "GET", "/v1/grants/q-2");
    assert.equal(q2.body.state, "provisioning");
    assert.equal(q2.body.queue.position, 1);
    assert.equal((await call(d.url, "GET", "/v1/grants/q-3")).body.queue.position, 2);
    assert.equal((await call(d.url, "GET", "/v1/grants/q-1")).body.queue, undefined, "the one provisioning holds the slot");

    // Cancel while waiting: ends at once, never provisioned.
    const c = await call(d.url, "DELETE", "/v1/grants/q-2");
    assert.ok([200, 202].includes(c.status));
    await until(async () => (await call(d.url, "GET", "/v1/grants/q-2")).body.state === "cancelled", "the waiting grant to end cancelled");
    assert.equal((await call(d.url, "GET", "/v1/grants/q-3")).body.queue.position, 1, "the next one moves up");
    // valid_to while waiting (q-4 was valid for 3 s): expired without a slot.
    await until(async () => (await call(d.url, "GET", "/v1/grants/q-4")).body.state === "expired", "the waiting grant to expire", 20_000);
    assert.equal(srv.requests, 1, "neither waiting grant fetched anything");
    const log = await call(d.url, "GET", "/v1/grants/q-4/log");
    assert.equal(log.body.exit_reason, "expired");

    // q-3 gets the slot once q-1 is running (the image is then in the local cache: no second fetch).
    srv.releaseOne();
    const states = await finalStates(d.url, ["q-1", "q-3"]);
    assert.deepEqual([states["q-1"]!.state, states["q-3"]!.state], ["completed", "completed"]);
    const metrics = await call(d.url, "GET", "/metrics");
    assert.match(metrics.text, /cb_provision_queue_wait_seconds_count\{backend="local"\} [1-9]/);
    assert.match(metrics.text, /cb_reservations\{backend="local"\} 0/);
  });

  it("cancel and valid_to cut a blocked image download short at once", async (t) => {
    const d = await startTestDaemon(t, { imageAllowCidrs: ["127.0.0.0/8"] });
    const img = scriptImage(d.dir, "never", "exit 0");
    const srv = await heldImageServer(t, img);
    assert.equal((await call(d.url, "POST", "/v1/grants", body("cut-cancel", srv))).status, 202);
    assert.equal((await call(d.url, "POST", "/v1/grants", body("cut-expire", srv, 3))).status, 202);
    await until(() => srv.requests === 2, "both downloads to start");
    await call(d.url, "DELETE", "/v1/grants/cut-cancel");
    await until(async () => (await call(d.url, "GET", "/v1/grants/cut-cancel")).body.state === "cancelled", "the cancel to end the download", 10_000);
    await until(async () => (await call(d.url, "GET", "/v1/grants/cut-expire")).body.state === "expired", "valid_to to end the download", 20_000);
    assert.equal((await call(d.url, "GET", "/v1/grants/cut-expire/log")).body.partial, true);
  });

  it("reservations survive kill -9: a restarted bridge does not over-admit before its grants resume", async (t) => {
    const dir = tempDir(t);
    const config = writeLocalConfig(dir, { stateDir: path.join(dir, "state"), local: { max_concurrent: 2 } });
    const img = scriptImage(dir, "long", "sleep 60");
    const keep = [1, 2, 3].map((i) => body(`keep-${i}`, img, 300));
    let daemon: ChildDaemon | null = await spawnDaemon(config);
    t.after(async () => {
      if (daemon) await daemon.kill9();
    });
    assert.equal((await call(daemon.url, "POST", "/v1/grants", keep[0])).status, 202);
    assert.equal((await call(daemon.url, "POST", "/v1/grants", keep[1])).status, 202);
    await daemon.kill9();
    daemon = await spawnDaemon(config);
    const third = await call(daemon.url, "POST", "/v1/grants", keep[2]);
    assert.equal(third.status, 422, third.text);
    assert.equal(third.body.declines[0].code, "at_capacity");
    // Re-posting an accepted grant is answered from the store, not routed again.
    assert.equal((await call(daemon.url, "POST", "/v1/grants", keep[0])).status, 200);
    for (const id of ["keep-1", "keep-2"]) await call(daemon.url, "DELETE", `/v1/grants/${id}`);
    await finalStates(daemon.url, ["keep-1", "keep-2"]);
    // Ended grants have freed their reservations by the time a reader sees them ended.
    const keep4 = body("keep-4", img, 60);
    assert.equal((await call(daemon.url, "POST", "/v1/grants", keep4)).status, 202);
    await call(daemon.url, "DELETE", "/v1/grants/keep-4");
    await finalStates(daemon.url, ["keep-4"]);
  });
});

describe("spend caps over HTTP", () => {
  it("declines budget_exhausted with what is left, records cost in the record and the ComputeLog, and keeps spend across a restart", async (t) => {
    // 100 millicores at 36 per 1,000 millicores-hour: 3.6 an hour, 0.001 a second; valid for 100 s: a worst case of 0.1.
    const d0 = await startTestDaemon(t, { extra: "price_per_cpu_hour = 36\nprice_per_gib_hour = 0\n\n[fleet.budget]\nper_day = 0.28\n" });
    // s-1 ends only once the test lets it: its worst case must still count when s-3 is posted.
    const gate = path.join(d0.dir, "gate");
    const quick = scriptImage(d0.dir, "quick", `while [ ! -e ${gate} ]; do sleep 0.05; done; exit 0`);
    const long = scriptImage(d0.dir, "long", "sleep 60");
    assert.equal((await call(d0.url, "POST", "/v1/grants", body("s-1", quick, 100))).status, 202);
    assert.equal((await call(d0.url, "POST", "/v1/grants", body("s-2", long, 100))).status, 202);
    const third = await call(d0.url, "POST", "/v1/grants", body("s-3", long, 100));
    const earlier = async () => JSON.stringify(await Promise.all(["s-1", "s-2"].map(async (id) => (await call(d0.url, "GET", `/v1/grants/${id}`)).body)));
    assert.equal(third.status, 422, `${third.text}; the grants before it: ${third.status === 422 ? "" : await earlier()}`);
    assert.equal(third.body.declines[0].code, "budget_exhausted");
    assert.equal(third.body.declines[0].currency, "USD");
    // Each worst case is 100 to 101 billed seconds (valid_to is a whole tick): 0.28 - 2 x (0.100 to 0.101).
    assert.ok(third.body.declines[0].remaining >= 0.078 && third.body.declines[0].remaining <= 0.08, `remaining ${third.body.declines[0].remaining}`);
    assert.match(third.body.declines[0].message, /fleet per_day budget \(0\.28 USD\)/);

    writeFileSync(gate, "");
    await finalStates(d0.url, ["s-1"]);
    const log = (await call(d0.url, "GET", "/v1/grants/s-1/log")).body;
    assert.equal(log.usage.currency, "USD");
    assert.equal(log.usage.cost, Math.round(Math.max(1, Math.ceil(log.usage.wall_seconds - 1e-9)) * 0.001 * 1e6) / 1e6, "per second of allocation, rounded up");
    const s1 = (await call(d0.url, "GET", "/v1/grants/s-1")).body;
    assert.deepEqual(s1.cost, { amount: log.usage.cost, currency: "USD", final: true });
    await until(async () => (await call(d0.url, "GET", "/v1/grants/s-2")).body.state === "running", "s-2 to run");
    const s2 = (await call(d0.url, "GET", "/v1/grants/s-2")).body;
    assert.equal(s2.cost.final, false, "cost so far while it runs");
    // s-1's worst case was replaced by its actual cost before it was seen ended: room for one more.
    assert.match((await call(d0.url, "GET", "/metrics")).text, /cb_spend\{scope="fleet",period="day"\} 0\.00[1-9]/);
    const fourth = await call(d0.url, "POST", "/v1/grants", body("s-4", long, 100));
    assert.equal(fourth.status, 202, fourth.text);
    const metrics = (await call(d0.url, "GET", "/metrics")).text;
    assert.match(metrics, /cb_budget_remaining\{scope="fleet",period="day"\} 0\.0[0-9]+/);

    const d1 = await d0.restart();
    const fifth = await call(d1.url, "POST", "/v1/grants", body("s-5", long, 100));
    assert.equal(fifth.status, 422, "the spend and the open grants' worst cases survived the restart");
    assert.equal(fifth.body.declines[0].code, "budget_exhausted");
    for (const id of ["s-2", "s-4"]) await call(d1.url, "DELETE", `/v1/grants/${id}`);
    await finalStates(d1.url, ["s-2", "s-4"]);
  });
});
