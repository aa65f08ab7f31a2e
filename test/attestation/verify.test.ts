import assert from "node:assert/strict";
import { X509Certificate, createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { BindingInputError, bindingDigest, bindingPreimage } from "../../src/attestation/binding.js";
import { INTEL_SGX_ROOT_CA_PEM, INTEL_SGX_ROOT_CA_SHA256 } from "../../src/attestation/intel-root-ca.js";
import { parseTdxQuote, QuoteFormatError, SIGNED_LEN } from "../../src/attestation/tdx-quote.js";
import { verifyTdxQuote } from "../../src/attestation/verify.js";

const vector = (name: string) => readFileSync(new URL(`./vectors/${name}`, import.meta.url));
// Every PCK certificate of the vectors is valid on this date (the newest was issued 2025-02-06).
const NOW = new Date("2026-06-01T00:00:00Z");

/** The hardware-made quotes (test/attestation/vectors/README.md), each as exactly the quote's bytes. */
const QUOTES = {
  gce: vector("go-tdx-guest_cos-113-tdx-quote.dat"),
  phala: vector("dcap-qvl_tdx_quote.dat"),
  // The published file carries a test line "extra bytes(only for testing purpose)" after the quote.
  spr: vector("go-tdx-guest_tdx_prod_quote_SPR_E4.dat").subarray(0, 4935),
};

function flip(b: Buffer, offset: number): Buffer {
  const c = Buffer.from(b);
  c[offset] = c[offset]! ^ 0x01;
  return c;
}

describe("Intel SGX root CA", () => {
  it("is the certificate with the documented fingerprint, self-signed, and the root of every vector's chain", () => {
    const root = new X509Certificate(INTEL_SGX_ROOT_CA_PEM);
    assert.equal(root.fingerprint256, INTEL_SGX_ROOT_CA_SHA256);
    assert.equal(createHash("sha256").update(root.raw).digest("hex").toUpperCase().match(/../g)!.join(":"), INTEL_SGX_ROOT_CA_SHA256);
    assert.ok(root.verify(root.publicKey));
    assert.match(root.subject, /CN=Intel SGX Root CA/);
    for (const q of Object.values(QUOTES)) assert.ok(parseTdxQuote(q).pckChainPem.includes(INTEL_SGX_ROOT_CA_PEM.split("\n")[1]!));
  });
});

describe("TDX quote v4 parser", () => {
  it("reads the fields of a GCE quote where they are", () => {
    const q = parseTdxQuote(QUOTES.gce);
    assert.equal(q.version, 4);
    assert.equal(q.teeType, 0x81);
    assert.equal(q.attestationKeyType, 2);
    assert.equal(q.qeVendorId.toString("hex"), "939a7233f79c4ca9940a0db3957f0607"); // Intel's QE vendor id
    assert.equal(q.length, 4935);
    assert.deepEqual(q.body.reportData, Buffer.alloc(64)); // its nonce.dat: 64 zero bytes
    assert.equal(q.body.mrTd.length, 48);
    assert.equal(q.signedBytes.length, SIGNED_LEN);
    assert.equal(q.qeAuthData.length, 32);
    assert.equal(q.pckChainPem.match(/BEGIN CERTIFICATE/g)!.length, 3);
  });

  it("reads REPORTDATA from the last 64 bytes of the TD report body", () => {
    const q = parseTdxQuote(QUOTES.phala);
    assert.deepEqual(q.body.reportData, QUOTES.phala.subarray(SIGNED_LEN - 64, SIGNED_LEN));
    assert.equal(q.body.reportData.toString("hex").slice(0, 16), "9a9d48e7f6799642");
  });

  it("refuses a v5 quote, a truncated quote, garbage after the quote and a wrong TEE type, naming the problem", () => {
    assert.throws(() => parseTdxQuote(vector("go-tdx-guest_quote_v5_sample.dat")), { name: "QuoteFormatError", message: /version 5 is not supported/ });
    assert.throws(() => parseTdxQuote(QUOTES.gce.subarray(0, 4000)), { name: "QuoteFormatError", message: /truncated in signature data/ });
    assert.throws(() => parseTdxQuote(QUOTES.gce.subarray(0, 40)), /truncated in header/);
    assert.throws(() => parseTdxQuote(vector("go-tdx-guest_tdx_prod_quote_SPR_E4.dat")), { name: "QuoteFormatError", message: /non-zero bytes after the end of the quote \(offset 4935\)/ });
    const sgx = Buffer.from(QUOTES.gce);
    sgx.writeUInt32LE(0, 4);
    assert.throws(() => parseTdxQuote(sgx), /TEE type 0x0 is not TDX/);
    assert.throws(() => parseTdxQuote(Buffer.alloc(70 * 1024)), /at most 65536/);
    assert.ok(new QuoteFormatError("x") instanceof Error);
  });

  it("accepts the zero padding the legacy ioctl buffer leaves after the quote", () => {
    const padded = vector("go-tdx-guest_cos-113-tdx-quote.dat");
    assert.equal(padded.length, 8000);
    assert.equal(parseTdxQuote(padded).length, 4935);
  });
});

describe("TDX quote verification (real quotes)", () => {
  for (const [name, quote] of Object.entries(QUOTES)) {
    it(`${name}: structure, both signatures, the QE binding and the chain to Intel's root hold`, () => {
      const r = verifyTdxQuote(quote, { now: NOW });
      assert.deepEqual(r.reasons, {});
      assert.deepEqual(r.checks, { structure: true, signature: true, pck_chain: true });
    });
  }

  it("binding holds when REPORTDATA is the expected 64 bytes and fails otherwise", () => {
    assert.equal(verifyTdxQuote(QUOTES.gce, { now: NOW, expectedReportData: Buffer.alloc(64) }).checks.binding, true);
    const r = verifyTdxQuote(QUOTES.gce, { now: NOW, expectedReportData: bindingDigest("req-42", "00".repeat(16), null) });
    assert.equal(r.checks.binding, false);
    assert.match(r.reasons.binding!, /REPORTDATA 0{128} is not the expected/);
    assert.equal(r.checks.signature, true);
  });

  const tampered: [string, (q: Buffer) => number, keyof ReturnType<typeof verifyTdxQuote>["checks"], RegExp][] = [
    ["a header byte", () => 20, "signature", /quote signature does not verify/],
    ["MRTD", () => 48 + 16 + 48 + 48 + 24, "signature", /quote signature does not verify/],
    ["REPORTDATA", () => SIGNED_LEN - 1, "signature", /quote signature does not verify/],
    ["the quote signature", () => SIGNED_LEN + 4 + 10, "signature", /quote signature does not verify/],
    ["the attestation key", () => SIGNED_LEN + 4 + 64 + 5, "signature", /./],
    ["the QE report", () => SIGNED_LEN + 4 + 128 + 6 + 100, "signature", /QE report signature does not verify/],
    ["the QE report signature", () => SIGNED_LEN + 4 + 128 + 6 + 384 + 3, "signature", /QE report signature does not verify/],
    ["the QE auth data", () => SIGNED_LEN + 4 + 128 + 6 + 384 + 64 + 2 + 1, "signature", /does not bind the attestation key/],
  ];
  for (const [what, at, check, why] of tampered) {
    it(`one flipped bit in ${what} fails ${check}`, () => {
      const r = verifyTdxQuote(flip(QUOTES.gce, at(QUOTES.gce)), { now: NOW });
      assert.equal(r.checks.structure, true);
      assert.equal(r.checks[check], false);
      assert.match(r.reasons[check]!, why);
    });
  }

  it("a changed certificate in the chain fails pck_chain", () => {
    const q = parseTdxQuote(QUOTES.gce);
    const pem = q.pckChainPem;
    // A byte inside the intermediate CA's signature (its PEM body, second certificate).
    const second = pem.indexOf("-----BEGIN CERTIFICATE-----", 10);
    const end = pem.indexOf("-----END CERTIFICATE-----", second);
    const start = QUOTES.gce.indexOf(Buffer.from(pem.slice(0, 40), "latin1"));
    const off = start + end - 10;
    const c = Buffer.from(QUOTES.gce);
    c[off] = c[off] === 0x41 ? 0x42 : 0x41;
    const r = verifyTdxQuote(c, { now: NOW });
    assert.equal(r.checks.pck_chain, false);
    assert.ok(r.reasons.pck_chain);
  });

  it("a chain that does not end in Intel's root fails pck_chain, while the signatures still hold", () => {
    // Trusting the Phala quote's PCK leaf instead of Intel's root.
    const otherRoot = parseTdxQuote(QUOTES.phala).pckChainPem.match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/)![0];
    const r = verifyTdxQuote(QUOTES.gce, { now: NOW, rootPem: otherRoot });
    assert.equal(r.checks.pck_chain, false);
    assert.match(r.reasons.pck_chain!, /not Intel's SGX root CA/);
    assert.equal(r.checks.signature, true);
  });

  it("certificates outside their validity fail pck_chain", () => {
    const r = verifyTdxQuote(QUOTES.gce, { now: new Date("2034-01-01T00:00:00Z") });
    assert.equal(r.checks.pck_chain, false);
    assert.match(r.reasons.pck_chain!, /is not valid at 2034-01-01/);
  });

  it("an unparsable quote fails every check, the structure with its reason", () => {
    const r = verifyTdxQuote(Buffer.from("not a quote"), { expectedReportData: Buffer.alloc(64) });
    assert.deepEqual(r.checks, { structure: false, signature: false, pck_chain: false, binding: false });
    assert.match(r.reasons.structure!, /quote version/);
  });
});

describe("binding", () => {
  // Computed by hand, outside this code:
  //   printf 'compute-bridge/attestation/v1\nrequest_id=req-42\nnonce=000102030405060708090a0b0c0d0e0f\nhost_key=SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU\n' | sha512sum
  const HAND = "b78b504c00aa1d05909197ef3aefd9fd7a69b9098869b1291f6e1b6d85a6ed69e13885111f4d05bc20bb368ddb14cb577fdeff6ee70480add0422b111feba246";
  const HAND_NO_KEY = "e57a537dcc8f55380c0ba968fa96c3533431e1ca4a269618718471b192345df324cedcedd4dc1b9b95fed57931234eb6c6d9f022194b7232af56f4a6fc173102";
  const FP = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";

  it("matches the hand-computed vectors (with and without a host key), the nonce's case not mattering", () => {
    assert.equal(bindingDigest("req-42", "000102030405060708090a0b0c0d0e0f", FP).toString("hex"), HAND);
    assert.equal(bindingDigest("req-42", "000102030405060708090A0B0C0D0E0F", FP).toString("hex"), HAND);
    assert.equal(bindingDigest("req-42", "000102030405060708090a0b0c0d0e0f", null).toString("hex"), HAND_NO_KEY);
    assert.equal(bindingPreimage("req-42", "000102030405060708090a0b0c0d0e0f", null), "compute-bridge/attestation/v1\nrequest_id=req-42\nnonce=000102030405060708090a0b0c0d0e0f\nhost_key=none\n");
  });

  it("every input changes it", () => {
    const base = bindingDigest("req-42", "00".repeat(16), FP);
    assert.notDeepEqual(bindingDigest("req-43", "00".repeat(16), FP), base);
    assert.notDeepEqual(bindingDigest("req-42", "00".repeat(17), FP), base);
    assert.notDeepEqual(bindingDigest("req-42", "00".repeat(16), null), base);
  });

  it("refuses inputs that would make the encoding ambiguous, naming the field", () => {
    assert.throws(() => bindingDigest("a\nnonce=00", "00".repeat(16), null), (e) => e instanceof BindingInputError && /request_id/.test(e.message));
    assert.throws(() => bindingDigest("r", "00".repeat(15), null), /nonce must be 16 to 64 bytes/);
    assert.throws(() => bindingDigest("r", "00".repeat(65), null), /nonce/);
    assert.throws(() => bindingDigest("r", "0g".repeat(16), null), /nonce/);
    assert.throws(() => bindingDigest("r", "00".repeat(16), "SHA256:short"), /host key/);
  });
});
