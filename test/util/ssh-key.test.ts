import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import ssh2 from "ssh2";
import { generateEd25519 } from "../../src/util/ssh-key.js";
import { tempDir } from "../helpers/tmp.js";

describe("per-grant ed25519 keys from node:crypto", () => {
  it("OpenSSH reads the private key and derives the same public key; ssh2 parses both and they sign/verify", (t) => {
    const dir = tempDir(t);
    for (const comment of ["compute-bridge-r-1", "x", "compute-bridge-a.b_c-0123456789abcdefghijklmnopqrstuvwxyz"]) {
      const kp = generateEd25519(comment);
      assert.match(kp.private, /^-----BEGIN OPENSSH PRIVATE KEY-----\n([A-Za-z0-9+/=]{1,70}\n)+-----END OPENSSH PRIVATE KEY-----\n$/);
      const file = path.join(dir, `k-${comment.length}`);
      writeFileSync(file, kp.private, { mode: 0o600 });
      // ssh-keygen -y prints the public key (with the comment stored in the private key).
      const derived = execFileSync("ssh-keygen", ["-y", "-f", file], { encoding: "utf8" }).trim();
      assert.equal(derived, kp.public);
      const priv = ssh2.utils.parseKey(kp.private);
      const pub = ssh2.utils.parseKey(kp.public);
      assert.ok(!(priv instanceof Error) && !(pub instanceof Error));
      const p = Array.isArray(priv) ? priv[0]! : priv;
      const q = Array.isArray(pub) ? pub[0]! : pub;
      const data = Buffer.from("challenge");
      assert.equal(q.verify(data, p.sign(data)), true);
      assert.equal(p.getPublicSSH().toString("base64"), q.getPublicSSH().toString("base64"));
    }
  });

  it("every key is new", () => {
    const a = generateEd25519("c");
    const b = generateEd25519("c");
    assert.notEqual(a.private, b.private);
    assert.notEqual(a.public, b.public);
  });
});
