/**
 * Azure TDX confidential VMs (DCesv5/ECesv5): the paravisor owns the TD's REPORTDATA, so the chain
 * from the hardware to the requester's nonce has three links, all checked offline here:
 *
 * 1. The HCL report (vTPM NV index 0x01400001): a 32-byte header ("HCLA"), the TD report (1024
 *    bytes at offset 32, REPORTDATA at TD report offset 128), then the runtime data: data size,
 *    version, report type (4 = TDX), hash type (1 SHA-256, 2 SHA-384, 3 SHA-512), variable data
 *    size (u32 LE each, at offset 1216), then the variable data: JSON with the vTPM attestation
 *    key ("keys": [{"kid": "HCLAkPub", "kty": "RSA", ...}]) and "user-data" (hex of NV 0x01400002).
 *    The TD report's REPORTDATA starts with the hash of the variable data.
 * 2. The TD quote (from the host's quoting service through IMDS) is a TDX quote v4 over that TD
 *    report: Intel's signatures and PCK chain (verify.ts), and its REPORTDATA equals the HCL
 *    report's. So Intel vouches for the attestation key.
 * 3. The TPM2 quote (TPMS_ATTEST) is signed by that key (RSASSA-PKCS1-v1_5, SHA-256; the raw
 *    signature, tpm2_quote -f plain) and carries the binding's first 32 bytes as qualifying data
 *    (extraData); the HCL user data, when the report has it, is the whole binding.
 *
 * Layouts: kinvolk/azure-cvm-tooling (az-cvm-vtpm/src/hcl), whose test data are this module's
 * vectors; TPMS_ATTEST: TPM 2.0 Library Part 2, 10.12.
 */
import { createHash, createPublicKey, timingSafeEqual, verify as verifySignature, type JsonWebKey, type KeyObject } from "node:crypto";
import { verifyTdxQuote, type QuoteChecks, type QuoteVerification, type VerifyQuoteOptions } from "./verify.js";

export class AzureEvidenceError extends Error {
  override name = "AzureEvidenceError";
}

const HCL_HEADER = 32;
const TD_REPORT_LEN = 1024;
const HW_REPORT_LEN = 1184;
const RUNTIME_OFFSET = HCL_HEADER + HW_REPORT_LEN;
const REPORT_TYPE_TDX = 4;
const HASHES: Record<number, string> = { 1: "sha256", 2: "sha384", 3: "sha512" };

export interface HclReport {
  tdReport: Buffer;
  /** The TD report's REPORTDATA (64 bytes). */
  reportData: Buffer;
  hashType: string;
  varData: Buffer;
  akPub: KeyObject;
  /** "user-data" of the runtime data, as bytes, or null when the report has none. */
  userData: Buffer | null;
}

export function parseHclReport(buf: Buffer): HclReport {
  if (buf.length < RUNTIME_OFFSET + 20) throw new AzureEvidenceError(`the HCL report is ${buf.length} bytes; at least ${RUNTIME_OFFSET + 20} expected`);
  if (buf.subarray(0, 4).toString("latin1") !== "HCLA") throw new AzureEvidenceError("the HCL report does not start with HCLA");
  const reportType = buf.readUInt32LE(RUNTIME_OFFSET + 8);
  if (reportType !== REPORT_TYPE_TDX) throw new AzureEvidenceError(`the HCL report is of type ${reportType}, not TDX (4)`);
  const hashType = HASHES[buf.readUInt32LE(RUNTIME_OFFSET + 12)];
  if (!hashType) throw new AzureEvidenceError(`the HCL report's hash type ${buf.readUInt32LE(RUNTIME_OFFSET + 12)} is unknown`);
  const size = buf.readUInt32LE(RUNTIME_OFFSET + 16);
  if (RUNTIME_OFFSET + 20 + size > buf.length) throw new AzureEvidenceError("the HCL report's variable data runs past its end");
  const varData = buf.subarray(RUNTIME_OFFSET + 20, RUNTIME_OFFSET + 20 + size);
  let json: { keys?: (JsonWebKey & { kid?: string })[]; "user-data"?: unknown };
  try {
    json = JSON.parse(varData.toString("utf8")) as typeof json;
  } catch {
    throw new AzureEvidenceError("the HCL report's variable data is not JSON");
  }
  const jwk = json.keys?.find((k) => k.kid === "HCLAkPub");
  if (!jwk || jwk.kty !== "RSA") throw new AzureEvidenceError("the HCL report's variable data has no RSA HCLAkPub key");
  let akPub: KeyObject;
  try {
    akPub = createPublicKey({ key: { kty: "RSA", n: jwk.n, e: jwk.e }, format: "jwk" });
  } catch {
    throw new AzureEvidenceError("the HCL report's HCLAkPub is not a valid RSA key");
  }
  const ud = json["user-data"];
  const userData = typeof ud === "string" && /^(?:[0-9a-fA-F]{2})+$/.test(ud) ? Buffer.from(ud, "hex") : null;
  const tdReport = buf.subarray(HCL_HEADER, HCL_HEADER + TD_REPORT_LEN);
  return { tdReport, reportData: tdReport.subarray(128, 192), hashType, varData, akPub, userData };
}

export interface TpmsAttest {
  type: number;
  extraData: Buffer;
}

/** The parts of a TPMS_ATTEST (big-endian) the chain needs; a quote (TPM_ST_ATTEST_QUOTE) only. */
export function parseTpmsAttest(buf: Buffer): TpmsAttest {
  let pos = 0;
  const take = (n: number) => {
    if (pos + n > buf.length) throw new AzureEvidenceError("the TPM quote (TPMS_ATTEST) is truncated");
    const b = buf.subarray(pos, pos + n);
    pos += n;
    return b;
  };
  if (take(4).readUInt32BE(0) !== 0xff544347) throw new AzureEvidenceError("the TPM quote is not a TPMS_ATTEST (magic is not TPM_GENERATED_VALUE)");
  const type = take(2).readUInt16BE(0);
  if (type !== 0x8018) throw new AzureEvidenceError(`the TPMS_ATTEST is of type 0x${type.toString(16)}, not a quote (0x8018)`);
  take(take(2).readUInt16BE(0)); // qualifiedSigner
  const extraData = Buffer.from(take(take(2).readUInt16BE(0)));
  take(17 + 8); // clockInfo, firmwareVersion
  const count = take(4).readUInt32BE(0);
  for (let i = 0; i < count; i++) {
    take(2);
    take(take(1)[0]!);
  }
  take(take(2).readUInt16BE(0)); // pcrDigest
  if (pos !== buf.length) throw new AzureEvidenceError("unexplained bytes after the TPMS_ATTEST");
  return { type, extraData };
}

export interface AzureBlobs {
  hcl_report: Buffer;
  td_quote: Buffer;
  tpm_quote: Buffer;
  tpm_signature: Buffer;
}

/** The three links, against the 64-byte binding when it is given. */
export function verifyAzureEvidence(b: AzureBlobs, o: VerifyQuoteOptions = {}): QuoteVerification {
  const reasons: Record<string, string> = {};
  const want = o.expectedReportData;
  const { expectedReportData: _, ...quoteOptions } = o;
  const td = verifyTdxQuote(b.td_quote, quoteOptions);
  Object.assign(reasons, td.reasons);
  let hcl: HclReport | null = null;
  let attest: TpmsAttest | null = null;
  try {
    hcl = parseHclReport(b.hcl_report);
    attest = parseTpmsAttest(b.tpm_quote);
  } catch (e) {
    reasons.structure = (e as Error).message;
  }
  const checks: QuoteChecks = { structure: td.checks.structure && hcl !== null && attest !== null, signature: false, pck_chain: td.checks.pck_chain, ...(td.checks.tcb !== undefined ? { tcb: td.checks.tcb } : {}) };
  if (hcl && attest && td.quote && td.checks.signature) {
    const digest = createHash(hcl.hashType).update(hcl.varData).digest();
    if (!td.quote.body.reportData.equals(hcl.reportData)) reasons.signature = "the TD quote is not over the HCL report's TD report (REPORTDATA differs)";
    else if (!hcl.reportData.subarray(0, digest.length).equals(digest)) reasons.signature = `the TD report's REPORTDATA does not start with ${hcl.hashType} of the HCL variable data (the attestation key is not the one the TD vouched for)`;
    else if (!verifySignature("sha256", b.tpm_quote, hcl.akPub, b.tpm_signature)) reasons.signature = "the TPM quote's signature does not verify with the attestation key (HCLAkPub)";
    else checks.signature = true;
  } else if (!reasons.signature) reasons.signature = reasons.structure ? "the evidence does not parse" : "the TD quote's signatures do not verify";
  if (want) {
    checks.binding = false;
    if (!attest || !hcl) reasons.binding = "the evidence does not parse";
    else if (!(attest.extraData.length === 32 && timingSafeEqual(attest.extraData, want.subarray(0, 32)))) reasons.binding = `the TPM quote's qualifying data ${attest.extraData.toString("hex")} is not the binding's first 32 bytes ${want.subarray(0, 32).toString("hex")}`;
    else if (hcl.userData !== null && !hcl.userData.equals(want)) reasons.binding = "the HCL report's user data is not the binding";
    else checks.binding = true;
  }
  return { checks, reasons, quote: td.quote, ...(td.tcbStatus !== undefined ? { tcbStatus: td.tcbStatus } : {}) };
}
