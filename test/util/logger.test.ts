import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { registerSecret } from "../../src/config/secrets.js";
import { createLogger } from "../../src/util/logger.js";
import { LogSink } from "../helpers/daemon.js";

describe("log redaction", () => {
  it("redacts secret paths and any known secret value, wherever it appears", async () => {
    const canary = "CANARY-secret-7f3a9c";
    registerSecret(canary);
    const sink = new LogSink();
    const log = createLogger("info", sink);
    log.info({ private_key: "-----BEGIN OPENSSH PRIVATE KEY-----abc", req: { headers: { authorization: "Bearer xyz" } } }, "paths");
    log.info({ detail: `token was ${canary}` }, `message with ${canary} inside`);
    log.error({ err: new Error(`failed with "${canary}"`) }, "error");
    await new Promise((r) => setImmediate(r));
    const text = sink.text;
    assert.ok(!text.includes(canary), text);
    assert.ok(!text.includes("BEGIN OPENSSH"));
    assert.ok(!text.includes("Bearer xyz"));
    assert.ok(text.includes("[REDACTED]"));
    assert.equal(sink.lines.length, 3);
    for (const l of sink.lines) JSON.parse(l);
  });
});
