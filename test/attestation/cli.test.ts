import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { before, describe, it } from "node:test";
import { bindingDigest } from "../../src/attestation/binding.js";
import { verifyEvidenceCommand } from "../../src/attestation/cli.js";
import { main } from "../../src/cli.js";
import type { AttestationEvidence } from "../../src/domain/attestation.js";
import { tempDir } from "../helpers/tmp.js";
import { buildQuote, makePki, type SyntheticPki } from "./synthetic-quote.js";

const RID = "req-7";
const NONCE = "a1".repeat(32);
const FP = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";
const OTHER_FP = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
const GCE_QUOTE = readFileSync(new URL("./vectors/go-tdx-guest_cos-113-tdx-quote.dat", import.meta.url));
const NOW = new Date("2026-06-01T00:00:00Z");

function capture() {
  const out: string[] = [];
  const err: string[] = [];
  return { io: { out: (s: string) => void out.push(s), err: (s: string) => void err.push(s) }, out, err, json: () => JSON.parse(out.join("")) as Record<string, unknown> };
}

function evidence(quote: Buffer, hostKey: string | null): AttestationEvidence {
  return {
    status: "present",
    platform: "gcp",
    format: "tdx-quote-v4",
    nonce: NONCE,
    nonce_source: "requester",
    binding: { scheme: "compute-bridge/attestation/v1", request_id: RID, host_key_sha256: hostKey, digest: bindingDigest(RID, NONCE, hostKey).toString("hex") },
    blobs: { td_quote: quote.toString("base64") },
  };
}

describe("compute-bridge verify-evidence", () => {
  let dir: string;
  let pki: SyntheticPki;
  let good: string;
  before(() => {
    dir = tempDir(undefined, "cb-verify-");
    pki = makePki();
    good = path.join(dir, "good.json");
    writeFileSync(good, JSON.stringify(evidence(buildQuote(bindingDigest(RID, NONCE, FP), pki), FP)));
  });
  const write = (name: string, data: string | Buffer) => {
    const f = path.join(dir, name);
    writeFileSync(f, data);
    return f;
  };

  it("exits 0 with every check true when the quote verifies and binds request_id, nonce and host key", async () => {
    const c = capture();
    assert.equal(await verifyEvidenceCommand([good, "--request-id", RID, "--nonce", NONCE], c.io, { rootPem: pki.rootPem }), 0);
    const r = c.json();
    assert.deepEqual([r.structure, r.signature, r.pck_chain, r.binding], [true, true, true, true]);
    assert.deepEqual(r.reasons, {});
    assert.equal(r.host_key_sha256, FP);
    assert.equal((r.measurements as Record<string, string>).mrtd, "11".repeat(48));
    assert.equal(c.err.length, 0);
  });

  it("exits 1 with binding false for another nonce, request id or pinned host key", async () => {
    for (const args of [
      ["--request-id", RID, "--nonce", "b2".repeat(32)],
      ["--request-id", "req-8", "--nonce", NONCE],
      ["--request-id", RID, "--nonce", NONCE, "--host-key", OTHER_FP],
      ["--request-id", RID, "--nonce", NONCE, "--host-key", "none"],
    ]) {
      const c = capture();
      assert.equal(await verifyEvidenceCommand([good, ...args], c.io, { rootPem: pki.rootPem }), 1, args.join(" "));
      const r = c.json();
      assert.equal(r.binding, false);
      assert.equal(r.signature, true);
    }
  });

  it("exits 1 with pck_chain false when the chain does not end in Intel's SGX root CA (the default anchor)", async () => {
    const c = capture();
    assert.equal(await verifyEvidenceCommand([good, "--request-id", RID, "--nonce", NONCE], c.io), 1);
    const r = c.json();
    assert.equal(r.pck_chain, false);
    assert.match((r.reasons as Record<string, string>).pck_chain!, /not Intel's SGX root CA/);
  });

  it("checks a raw hardware quote: structure, signature and chain hold, the binding does not (REPORTDATA is zero)", async () => {
    const f = write("gce.quote", GCE_QUOTE);
    const c = capture();
    assert.equal(await verifyEvidenceCommand([f, "--request-id", RID, "--nonce", NONCE, "--host-key", FP], c.io, { now: NOW }), 1);
    const r = c.json();
    assert.deepEqual([r.structure, r.signature, r.pck_chain, r.binding], [true, true, true, false]);
  });

  it("a tampered byte in the quote fails signature", async () => {
    const t = Buffer.from(GCE_QUOTE);
    t[100] = t[100]! ^ 0x80;
    const c = capture();
    assert.equal(await verifyEvidenceCommand([write("tampered.quote", t), "--request-id", RID, "--nonce", NONCE], c.io, { now: NOW }), 1);
    assert.equal(c.json().signature, false);
  });

  it("absent evidence exits 1 and says why", async () => {
    const f = write("absent.json", JSON.stringify({ status: "absent", platform: "gcp", nonce: NONCE, nonce_source: "bridge", reason: "the guest kernel has no configfs-tsm" }));
    const c = capture();
    assert.equal(await verifyEvidenceCommand([f, "--request-id", RID, "--nonce", NONCE], c.io), 1);
    assert.match((c.json().reasons as Record<string, string>).structure!, /no evidence: the guest kernel has no configfs-tsm/);
  });

  it("exits 2 on unreadable input, naming the problem", async () => {
    const cases: [string, RegExp][] = [
      [path.join(dir, "missing.json"), /cannot read .*missing\.json/],
      [write("bad.json", "{ not json"), /is not valid JSON/],
      [write("other.json", JSON.stringify({ status: "present", platform: "gcp" })), /is not attestation evidence/],
    ];
    for (const [f, why] of cases) {
      const c = capture();
      assert.equal(await verifyEvidenceCommand([f, "--request-id", RID, "--nonce", NONCE], c.io), 2);
      assert.match(c.err.join(""), why);
      assert.equal(c.out.length, 0);
    }
  });

  it("exits 2 on wrong arguments, naming the flag", async () => {
    const cases: [string[], RegExp][] = [
      [[good, "--request-id", RID, "--nonce", NONCE, "--colateral", "x"], /Unknown option '--colateral'/],
      [[good, "--request-id", RID], /--nonce is required/],
      [[good, "--nonce", NONCE], /--request-id is required/],
      [["--request-id", RID, "--nonce", NONCE], /FILE is required/],
      [[good, good, "--request-id", RID, "--nonce", NONCE], /one FILE expected/],
      [[good, "--request-id", RID, "--nonce", "abc"], /--nonce must be 16 to 64 bytes/],
      [[good, "--request-id", "a b", "--nonce", NONCE], /--request-id must be/],
      [[good, "--request-id", RID, "--nonce", NONCE, "--host-key", "ssh-ed25519 AAAA"], /--host-key must be/],
    ];
    for (const [args, why] of cases) {
      const c = capture();
      assert.equal(await verifyEvidenceCommand(args, c.io), 2, args.join(" "));
      assert.match(c.err.join(""), why);
    }
  });

  it("is dispatched by `compute-bridge verify-evidence`", async () => {
    const c = capture();
    assert.equal(await main(["verify-evidence", path.join(dir, "missing.json"), "--request-id", RID, "--nonce", NONCE], c.io), 2);
    assert.match(c.err.join(""), /cannot read/);
    const d = capture();
    assert.equal(await main(["verify-evidence", good, "--request-id", RID, "--nonce", NONCE], d.io), 1);
    assert.equal(d.json().pck_chain, false);
  });
});
