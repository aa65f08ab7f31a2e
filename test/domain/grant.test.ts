import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { canonicalGrantRequest, GrantRequest } from "../../src/domain/index.js";
import { canonicalJson } from "../../src/util/canonical-json.js";

const grant = { request_id: "r-1", region: "us-east-1", tdx_required: true, cpu_millicores: 2000, ram_mib: 4096, valid_to: 123456 };
const image = { url: "https://images.example/x.tar.gz", sha256: "AB".repeat(32), format: "bundle" };

describe("canonicalGrantRequest", () => {
  it("gives canonicalJson's bytes for minimal and complete requests, whatever the input key order", () => {
    const bodies = [
      { grant, envelope: { image } },
      {
        envelope: { ssh_public_key: "ssh-ed25519 AAAAC3Nz x@y", env: { ZED: "1", ALPHA: "2", _u: "\"quoted\"\n" }, command: ["sh", "-c", "echo é"], image: { format: "disk", url: image.url, sha256: image.sha256 } },
        grant: { valid_to: 1, ram_mib: 1, cpu_millicores: 1, tdx_required: false, region: "r", request_id: "z" },
      },
    ];
    for (const b of bodies) {
      const r = GrantRequest.parse(b);
      assert.equal(canonicalGrantRequest(r), canonicalJson(r));
    }
  });

  it("differs whenever any field differs", () => {
    const base = GrantRequest.parse({ grant, envelope: { image, command: ["a"], env: { A: "1" }, ssh_public_key: "ssh-ed25519 AAAA k" } });
    const variants = [
      { ...base, grant: { ...base.grant, valid_to: 123457 } },
      { ...base, grant: { ...base.grant, tdx_required: false } },
      { ...base, envelope: { ...base.envelope, command: ["b"] } },
      { ...base, envelope: { ...base.envelope, env: { A: "2" } } },
      { ...base, envelope: { ...base.envelope, image: { ...base.envelope.image, format: "disk" as const } } },
      { ...base, envelope: { ...base.envelope, ssh_public_key: "ssh-ed25519 AAAB k" } },
    ];
    for (const v of variants) assert.notEqual(canonicalGrantRequest(v), canonicalGrantRequest(base));
  });
});

describe("envelope.attestation_nonce", () => {
  it("is optional hex of 16 to 64 bytes, kept lowercase, and part of the body's canonical form", () => {
    const r = GrantRequest.parse({ grant, envelope: { image, attestation_nonce: "AB".repeat(16) } });
    assert.equal(r.envelope.attestation_nonce, "ab".repeat(16));
    assert.equal(canonicalGrantRequest(r), canonicalJson(r));
    const other = GrantRequest.parse({ grant, envelope: { image, attestation_nonce: "ab".repeat(17) } });
    assert.notEqual(canonicalGrantRequest(other), canonicalGrantRequest(r));
    assert.notEqual(canonicalGrantRequest(GrantRequest.parse({ grant, envelope: { image } })), canonicalGrantRequest(r));
    GrantRequest.parse({ grant, envelope: { image, attestation_nonce: "0".repeat(128) } });
  });

  it("refuses anything else, naming the field", () => {
    for (const bad of ["ab".repeat(15), "ab".repeat(65), "abc".repeat(11), "zz".repeat(16), 42]) {
      const p = GrantRequest.safeParse({ grant, envelope: { image, attestation_nonce: bad } });
      assert.equal(p.success, false, String(bad));
      assert.deepEqual(p.error!.issues[0]!.path, ["envelope", "attestation_nonce"]);
    }
  });
});
