import assert from "node:assert/strict";
import { createHash, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { before, describe, it } from "node:test";
import { parseHclReport, parseTpmsAttest, verifyAzureEvidence, type AzureBlobs } from "../../src/attestation/azure.js";
import { bindingDigest } from "../../src/attestation/binding.js";
import { verifyEvidenceCommand } from "../../src/attestation/cli.js";
import type { AttestationEvidence } from "../../src/domain/attestation.js";
import { tempDir } from "../helpers/tmp.js";
import { buildQuote, makePki, type SyntheticPki } from "./synthetic-quote.js";

const vector = (name: string) => readFileSync(new URL(`./vectors/${name}`, import.meta.url));

/** azure-cvm-tooling's quote.bin: bincode of { signature: Vec<u8>, message: Vec<u8>, pcrs }. */
function tpmQuoteVector(): { signature: Buffer; message: Buffer } {
  const b = vector("azure-cvm-tooling_quote.bin");
  const n = Number(b.readBigUInt64LE(0));
  const m = Number(b.readBigUInt64LE(8 + n));
  return { signature: b.subarray(8, 8 + n), message: b.subarray(16 + n, 16 + n + m) };
}

describe("Azure vTPM evidence: real vectors (kinvolk/azure-cvm-tooling)", () => {
  it("the HCL report of a TDX CVM: its TD report's REPORTDATA starts with SHA-256 of the variable data holding HCLAkPub", () => {
    const h = parseHclReport(vector("azure-cvm-tooling_hcl-report-tdx.bin"));
    assert.equal(h.hashType, "sha256");
    assert.deepEqual(h.reportData.subarray(0, 32), createHash("sha256").update(h.varData).digest());
    assert.match(h.varData.toString(), /"kid":"HCLAkPub"/);
    assert.equal(h.akPub.asymmetricKeyType, "rsa");
    assert.equal(h.tdReport.length, 1024);
  });

  it("the TPM quote: a TPMS_ATTEST with its qualifying data, signed by the vTPM attestation key; a flipped byte fails", () => {
    const q = tpmQuoteVector();
    const a = parseTpmsAttest(q.message);
    assert.equal(a.type, 0x8018);
    assert.equal(a.extraData.toString(), "challenge");
    const ak = createPublicKey(vector("azure-cvm-tooling_akpub.pem"));
    assert.ok(verify("sha256", q.message, ak, q.signature));
    const t = Buffer.from(q.message);
    t[20] = t[20]! ^ 1;
    assert.equal(verify("sha256", t, ak, q.signature), false);
  });

  it("refuses what is not an HCL report or a TPM quote, naming it", () => {
    assert.throws(() => parseHclReport(Buffer.alloc(100)), /at least 1236/);
    const notHcl = Buffer.from(vector("azure-cvm-tooling_hcl-report-tdx.bin"));
    notHcl.write("XXXX", 0);
    assert.throws(() => parseHclReport(notHcl), /HCLA/);
    assert.throws(() => parseTpmsAttest(Buffer.from("00000000", "hex")), /not a TPMS_ATTEST/);
    assert.throws(() => parseTpmsAttest(tpmQuoteVector().message.subarray(0, 40)), /truncated/);
  });
});

/** An HCL report, TD quote and TPM quote made here, with a chain under a throw-away CA. */
function azureChain(pki: SyntheticPki, binding: Buffer, o: { extraData?: Buffer; userData?: Buffer | null; ak?: KeyObject } = {}): AzureBlobs {
  const ak = generateKeyPairSync("rsa", { modulusLength: 2048 });
  const jwk = ak.publicKey.export({ format: "jwk" });
  const ud = o.userData === undefined ? binding : o.userData;
  const varData = Buffer.from(JSON.stringify({ keys: [{ kid: "HCLAkPub", key_ops: ["sign"], kty: "RSA", e: jwk.e, n: jwk.n }], ...(ud ? { "user-data": ud.toString("hex").toUpperCase() } : {}) }));
  const reportData = Buffer.concat([createHash("sha256").update(varData).digest(), Buffer.alloc(32)]);
  const hcl = Buffer.alloc(32 + 1184 + 20 + varData.length);
  hcl.write("HCLA", 0);
  reportData.copy(hcl, 32 + 128);
  hcl.writeUInt32LE(20 + varData.length, 1216);
  hcl.writeUInt32LE(1, 1220);
  hcl.writeUInt32LE(4, 1224);
  hcl.writeUInt32LE(1, 1228);
  hcl.writeUInt32LE(varData.length, 1232);
  varData.copy(hcl, 1236);
  const extra = o.extraData ?? binding.subarray(0, 32);
  const attest = Buffer.concat([
    Buffer.from("ff5443478018", "hex"),
    Buffer.from("0000", "hex"), // qualifiedSigner (empty)
    Buffer.from([extra.length >> 8, extra.length & 0xff]),
    extra,
    Buffer.alloc(17 + 8),
    Buffer.from("00000001000b03ffffff", "hex"), // one selection: sha256, PCRs 0-23
    Buffer.from("0020", "hex"),
    Buffer.alloc(32, 0xaa),
  ]);
  return { hcl_report: hcl, td_quote: buildQuote(reportData, pki), tpm_quote: attest, tpm_signature: sign("sha256", attest, o.ak ?? ak.privateKey) };
}

describe("Azure vTPM evidence: the whole chain", () => {
  let pki: SyntheticPki;
  before(() => {
    pki = makePki();
  });
  const RID = "az-1";
  const NONCE = "42".repeat(32);
  const binding = bindingDigest(RID, NONCE, null);

  it("every link holds: TD quote over the HCL report, the AK it vouches for signed the TPM quote, which carries the binding", () => {
    const r = verifyAzureEvidence(azureChain(pki, binding), { expectedReportData: binding, rootPem: pki.rootPem });
    assert.deepEqual(r.reasons, {});
    assert.deepEqual(r.checks, { structure: true, signature: true, pck_chain: true, binding: true });
  });

  it("each broken link fails its check, with the reason", () => {
    let r = verifyAzureEvidence(azureChain(pki, binding, { extraData: Buffer.alloc(32) }), { expectedReportData: binding, rootPem: pki.rootPem });
    assert.equal(r.checks.binding, false);
    assert.match(r.reasons.binding!, /qualifying data 0{64} is not the binding's first 32 bytes/);
    r = verifyAzureEvidence(azureChain(pki, binding, { userData: Buffer.alloc(64, 1) }), { expectedReportData: binding, rootPem: pki.rootPem });
    assert.equal(r.checks.binding, false);
    assert.match(r.reasons.binding!, /user data is not the binding/);
    // A report without user data (older paravisors) is bound by the TPM quote alone.
    assert.equal(verifyAzureEvidence(azureChain(pki, binding, { userData: null }), { expectedReportData: binding, rootPem: pki.rootPem }).checks.binding, true);
    r = verifyAzureEvidence(azureChain(pki, binding, { ak: generateKeyPairSync("rsa", { modulusLength: 2048 }).privateKey }), { expectedReportData: binding, rootPem: pki.rootPem });
    assert.equal(r.checks.signature, false);
    assert.match(r.reasons.signature!, /TPM quote's signature does not verify/);
    // The TD quote of another TD report (another VM's attestation key).
    const other = azureChain(pki, binding);
    r = verifyAzureEvidence({ ...azureChain(pki, binding), td_quote: other.td_quote }, { expectedReportData: binding, rootPem: pki.rootPem });
    assert.equal(r.checks.signature, false);
    assert.match(r.reasons.signature!, /not over the HCL report's TD report/);
    // A tampered HCL variable data (another key swapped in).
    const c = azureChain(pki, binding);
    const hcl = Buffer.from(c.hcl_report);
    hcl[1240] = hcl[1240]! ^ 1;
    r = verifyAzureEvidence({ ...c, hcl_report: hcl }, { expectedReportData: binding, rootPem: pki.rootPem });
    assert.equal(r.checks.signature, false);
    // Under Intel's root the synthetic chain does not hold.
    assert.equal(verifyAzureEvidence(azureChain(pki, binding), { expectedReportData: binding }).checks.pck_chain, false);
  });

  it("verify-evidence checks an azure-tdx-vtpm envelope: exit 0 when all hold, 1 for another nonce", async (t) => {
    const c = azureChain(pki, binding);
    const ev: AttestationEvidence = {
      status: "present",
      platform: "azure",
      format: "azure-tdx-vtpm",
      nonce: NONCE,
      nonce_source: "requester",
      binding: { scheme: "compute-bridge/attestation/v1", request_id: RID, host_key_sha256: null, digest: binding.toString("hex") },
      blobs: { hcl_report: c.hcl_report.toString("base64"), td_quote: c.td_quote.toString("base64"), tpm_quote: c.tpm_quote.toString("base64"), tpm_signature: c.tpm_signature.toString("base64") },
    };
    const f = path.join(tempDir(t), "az.json");
    writeFileSync(f, JSON.stringify(ev));
    const out: string[] = [];
    const io = { out: (s: string) => void out.push(s), err: () => {} };
    assert.equal(await verifyEvidenceCommand([f, "--request-id", RID, "--nonce", NONCE], io, { rootPem: pki.rootPem }), 0);
    assert.deepEqual(JSON.parse(out.join("")).binding, true);
    assert.equal(await verifyEvidenceCommand([f, "--request-id", RID, "--nonce", "43".repeat(32)], io, { rootPem: pki.rootPem }), 1);
    const { tpm_signature: _, ...partial } = ev.blobs;
    writeFileSync(f, JSON.stringify({ ...ev, blobs: partial }));
    const err: string[] = [];
    assert.equal(await verifyEvidenceCommand([f, "--request-id", RID, "--nonce", NONCE], { out: () => {}, err: (s) => void err.push(s) }), 2);
    assert.match(err.join(""), /has no tpm_signature blob/);
  });
});
