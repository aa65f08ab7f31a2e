import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import path from "node:path";
import { describe, it } from "node:test";
import { verifySignedDoc } from "../../src/util/identity.js";
import { tickIn } from "../helpers/config.js";
import { startTestDaemon } from "../helpers/daemon.js";
import { call, until } from "../helpers/http.js";
import { scriptImage } from "../helpers/images.js";
import { tempDir } from "../helpers/tmp.js";

const MARKET_TOKEN = "market-token-abcdef123456";

/** A market receiver that fails the first `failFirst` requests of each kind with 503. */
async function receiver(t: { after: (fn: () => void) => void }, failFirst: number) {
  const got: { method: string; url: string; auth: string | undefined; body: unknown }[] = [];
  const seen = new Map<string, number>();
  let down = false;
  const server = http.createServer((req, res) => {
    let data = "";
    req.on("data", (d: Buffer) => (data += d.toString()));
    req.on("end", () => {
      const n = (seen.get(req.url!) ?? 0) + 1;
      seen.set(req.url!, n);
      if (down || n <= failFirst) {
        res.statusCode = 503;
        return res.end("unavailable");
      }
      got.push({ method: req.method!, url: req.url!, auth: req.headers.authorization, body: JSON.parse(data) });
      res.statusCode = 204;
      res.end();
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  t.after(() => server.close());
  return { base: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, got, seen, setDown: (v: boolean) => (down = v) };
}

describe("market publishing", () => {
  it("delivers the signed card and every ComputeLog despite failures and restarts", async (t) => {
    const m = await receiver(t, 2);
    const dir = tempDir(t);
    writeFileSync(path.join(dir, "market-token"), MARKET_TOKEN);
    const extra = `
[market]
card_url = "${m.base}/card"
log_url = "${m.base}/logs"
token_file = ${JSON.stringify(path.join(dir, "market-token"))}
retry_max_seconds = 0.2
`;
    let td = await startTestDaemon(t, { extra });
    await until(() => m.got.some((g) => g.url === "/card"), "the card to be delivered after 2 failures");
    const card = m.got.find((g) => g.url === "/card")!;
    assert.equal(card.method, "PUT");
    assert.equal(card.auth, `Bearer ${MARKET_TOKEN}`);
    assert.ok(verifySignedDoc(card.body as never, (card.body as { public_key: string }).public_key));
    assert.equal(m.seen.get("/card"), 3, "retried until acknowledged");

    // Market goes down; a grant finishes; the bridge restarts; the market comes back: the log arrives.
    m.setDown(true);
    const img = scriptImage(tempDir(t), "q", "exit 0");
    await call(td.url, "POST", "/v1/grants", {
      grant: { request_id: "m-1", region: "local", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: tickIn(60) },
      envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" } },
    });
    await until(async () => (await td.d.store.computeLog("m-1")), "grant m-1 to finish");
    await until(() => (m.seen.get("/logs") ?? 0) >= 1, "a failed delivery attempt");
    td = await td.restart();
    m.setDown(false);
    await until(() => m.got.some((g) => g.url === "/logs"), "the ComputeLog to be delivered after the outage", 20_000);
    const log = m.got.find((g) => g.url === "/logs")!;
    assert.equal(log.method, "POST");
    assert.equal((log.body as { request_id: string }).request_id, "m-1");
    await until(async () => (await td.d.store.outboxSize()) === 0, "the outbox to drain");
    assert.equal(m.got.filter((g) => g.url === "/logs").length, 1);
    assert.ok(!td.logs.text.includes(MARKET_TOKEN), "the market token never reaches the log");
  });
});
