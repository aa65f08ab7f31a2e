import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { bearerChecker } from "../../src/listener/auth.js";

describe("bearer check", () => {
  it("accepts 'Bearer <token>' with the scheme in any case (RFC 9110) and nothing else", () => {
    const ok = bearerChecker("s3cret-token-0123456789");
    for (const h of ["Bearer s3cret-token-0123456789", "bearer s3cret-token-0123456789", "BEARER s3cret-token-0123456789", "bEaReR  s3cret-token-0123456789"]) assert.equal(ok(h), true, h);
    for (const h of [undefined, "", "Bearer ", "Bearers3cret-token-0123456789", "Bearer\ts3cret-token-0123456789", "Bearer s3cret-token-0123456789 ", "Bearer s3cret-token-0123456788", "Bearer s3cret-token-012345678", "Bearer s3cret-token-01234567890", "Basic s3cret-token-0123456789"])
      assert.equal(ok(h), false, JSON.stringify(h));
  });

  it("compares the bytes on the wire, so a non-ASCII token works", () => {
    const ok = bearerChecker("tökën-ü");
    // How node's HTTP parser hands over the UTF-8 bytes of such a header: one latin1 char per byte.
    assert.equal(ok(`Bearer ${Buffer.from("tökën-ü").toString("latin1")}`), true);
    assert.equal(ok(`Bearer ${Buffer.from("tökën-ö").toString("latin1")}`), false);
  });
});
