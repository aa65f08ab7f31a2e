import assert from "node:assert/strict";
import { statSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { canonicalJson } from "../../src/util/canonical-json.js";
import { Identity, verifySignedDoc } from "../../src/util/identity.js";
import { shJoin, shq } from "../../src/util/shell.js";
import { execFileSync } from "node:child_process";
import { tempDir } from "../helpers/tmp.js";

describe("identity", () => {
  it("is generated once with mode 0600 and reused", (t) => {
    const dir = tempDir(t);
    const a = Identity.loadOrCreate(dir);
    assert.equal(statSync(path.join(dir, "identity.key")).mode & 0o777, 0o600);
    const b = Identity.loadOrCreate(dir);
    assert.equal(a.publicKeyBase64, b.publicKeyBase64);
    const doc = { x: 1, y: [2, 3] };
    assert.ok(verifySignedDoc({ ...doc, signature: a.signDoc(doc) }, b.publicKeyBase64));
  });
});

describe("canonical JSON", () => {
  it("sorts keys at every depth and drops undefined", () => {
    assert.equal(canonicalJson({ b: 1, a: { d: undefined, c: [{ z: 1, y: 2 }] } }), '{"a":{"c":[{"y":2,"z":1}]},"b":1}');
  });
});

describe("shell quoting", () => {
  it("makes every hostile string a single literal word", () => {
    const hostile = ["a'b", "$(touch /tmp/x)", "`id`", "a;b", "line\nbreak", "\\", "", "--", "'\"'\"'", "${HOME}", "*"];
    const out = execFileSync("/bin/sh", ["-c", `printf '%s\\0' ${shJoin(hostile)}`]).toString();
    assert.deepEqual(out.split("\0").slice(0, -1), hostile);
    assert.throws(() => shq("a\0b"));
  });
});
