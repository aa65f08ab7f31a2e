/**
 * Offline verification of a TDX quote v4, with node:crypto alone:
 *
 * - structure: the quote parses as v4 / ECDSA P-256 / TDX (tdx-quote.ts);
 * - signature: the attestation key's ECDSA P-256 signature over SHA-256(header || TD report body);
 *   the QE report's signature by the PCK certificate's key; and the QE report's REPORTDATA binding
 *   the attestation key: its first 32 bytes are SHA-256(attestation key || QE auth data), the
 *   rest zero. Together: Intel's quoting enclave, on a platform holding that PCK, vouched for the
 *   key that signed this TD report;
 * - pck_chain: every certificate of the chain is signed by the next and valid at `now`, the
 *   intermediates are CAs, and the chain ends in Intel's SGX root CA (intel-root-ca.ts), compared
 *   byte for byte;
 * - binding: REPORTDATA equals the expected 64 bytes (binding.ts), when they are given.
 *
 * TCB status (is this platform's microcode and TDX module current?) needs Intel's collateral
 * (TCB info, QE identity, CRLs) and is not judged here; the verdict never claims it.
 */
import { createHash, createPublicKey, timingSafeEqual, verify as verifySignature, X509Certificate, type KeyObject } from "node:crypto";
import { INTEL_SGX_ROOT_CA_PEM } from "./intel-root-ca.js";
import { evaluateTcb, type Collateral } from "./tcb.js";
import { parseTdxQuote, splitPemChain, type TdxQuoteV4 } from "./tdx-quote.js";

export interface QuoteChecks {
  structure: boolean;
  signature: boolean;
  pck_chain: boolean;
  /** Present only when an expected REPORTDATA was given. */
  binding?: boolean;
  /** Present only when collateral was given (tcb.ts): the platform's TCB is UpToDate. */
  tcb?: boolean;
}

export interface QuoteVerification {
  checks: QuoteChecks;
  /** Why each failed check failed (check name -> reason). */
  reasons: Record<string, string>;
  quote: TdxQuoteV4 | null;
  /** The TCB status the collateral gives (UpToDate, OutOfDate, Revoked, ...), when checked. */
  tcbStatus?: string | null;
}

export interface VerifyQuoteOptions {
  /** The 64 bytes REPORTDATA must hold. */
  expectedReportData?: Buffer;
  /** Time at which the certificates must be valid; default now. */
  now?: Date;
  /** Trust anchor (PEM); default Intel's SGX root CA. Tests only. */
  rootPem?: string;
  /** Intel's collateral: the TCB status is judged (tcb.ts). */
  collateral?: Collateral;
}

/** An uncompressed P-256 point (x || y, 64 bytes) as a public key. */
export function p256Key(xy: Buffer): KeyObject {
  return createPublicKey({
    key: { kty: "EC", crv: "P-256", x: xy.subarray(0, 32).toString("base64url"), y: xy.subarray(32, 64).toString("base64url") },
    format: "jwk",
  });
}

/** ECDSA P-256 / SHA-256 over `data`, signature as raw r || s. */
export function verifyP256(data: Buffer, rs: Buffer, key: KeyObject): boolean {
  try {
    return verifySignature("sha256", data, { key, dsaEncoding: "ieee-p1363" }, rs);
  } catch {
    return false;
  }
}

/** Check a PEM chain (leaf first) up to the trust anchor; returns the leaf, or a reason. */
export function verifyChain(pem: string, now: Date, rootPem: string = INTEL_SGX_ROOT_CA_PEM): { leaf: X509Certificate } | { error: string } {
  let certs: X509Certificate[];
  try {
    certs = splitPemChain(pem).map((p) => new X509Certificate(p));
  } catch (e) {
    return { error: `a certificate in the chain does not parse: ${(e as Error).message}` };
  }
  if (certs.length < 2) return { error: `the chain has ${certs.length} certificate(s); a leaf, its CA and the root are expected` };
  const root = new X509Certificate(rootPem);
  const last = certs[certs.length - 1]!;
  if (!last.raw.equals(root.raw)) return { error: `the chain ends in "${last.subject.replace(/\n/g, ", ")}" (SHA-256 ${last.fingerprint256}), not Intel's SGX root CA` };
  for (let i = 0; i < certs.length; i++) {
    const c = certs[i]!;
    const issuer = certs[Math.min(i + 1, certs.length - 1)]!;
    const t = now.getTime();
    if (t < Date.parse(c.validFrom) || t > Date.parse(c.validTo)) return { error: `certificate ${i} ("${c.subject.replace(/\n/g, ", ")}") is not valid at ${now.toISOString()} (${c.validFrom} to ${c.validTo})` };
    if (i > 0 && !c.ca) return { error: `certificate ${i} ("${c.subject.replace(/\n/g, ", ")}") is not a CA certificate` };
    if (!c.checkIssued(issuer) || !c.verify(issuer.publicKey)) return { error: `certificate ${i} ("${c.subject.replace(/\n/g, ", ")}") is not signed by the next one in the chain` };
  }
  return { leaf: certs[0]! };
}

export function verifyTdxQuote(raw: Uint8Array, o: VerifyQuoteOptions = {}): QuoteVerification {
  const reasons: Record<string, string> = {};
  let quote: TdxQuoteV4;
  try {
    quote = parseTdxQuote(raw);
  } catch (e) {
    const why = (e as Error).message;
    const checks: QuoteChecks = { structure: false, signature: false, pck_chain: false, ...(o.expectedReportData ? { binding: false } : {}), ...(o.collateral ? { tcb: false } : {}) };
    for (const k of Object.keys(checks)) reasons[k] = k === "structure" ? why : "the quote does not parse";
    return { checks, reasons, quote: null };
  }

  const chain = verifyChain(quote.pckChainPem, o.now ?? new Date(), o.rootPem);
  const pckChain = "leaf" in chain;
  if (!pckChain) reasons.pck_chain = chain.error;

  let signature = false;
  let ak: KeyObject | null = null;
  try {
    ak = p256Key(quote.attestationKey);
  } catch {
    reasons.signature = "the attestation key is not a P-256 point";
  }
  if (ak) {
    const expectedQeData = Buffer.concat([createHash("sha256").update(Buffer.concat([quote.attestationKey, quote.qeAuthData])).digest(), Buffer.alloc(32)]);
    // The leaf's key signs the QE report; a chain that fails for another reason (expired, wrong
    // root) still lets the signatures be judged on their own.
    let pckKey: KeyObject | null = null;
    try {
      pckKey = new X509Certificate(splitPemChain(quote.pckChainPem)[0] ?? "").publicKey;
    } catch {
      pckKey = null;
    }
    if (!verifyP256(quote.signedBytes, quote.signature, ak)) reasons.signature = "the quote signature does not verify with the attestation key";
    else if (!pckKey) reasons.signature = "the PCK certificate does not parse: the QE report signature cannot be checked";
    else if (!verifyP256(quote.qeReport, quote.qeReportSignature, pckKey)) reasons.signature = "the QE report signature does not verify with the PCK certificate's key";
    else if (!timingSafeEqual(quote.qeReportData, expectedQeData)) reasons.signature = "the QE report does not bind the attestation key (its REPORTDATA is not SHA-256(attestation key || QE auth data))";
    else signature = true;
  }

  const checks: QuoteChecks = { structure: true, signature, pck_chain: pckChain };
  if (o.expectedReportData) {
    const want = o.expectedReportData;
    checks.binding = want.length === 64 && timingSafeEqual(quote.body.reportData, want);
    if (!checks.binding) reasons.binding = `REPORTDATA ${quote.body.reportData.toString("hex")} is not the expected ${want.toString("hex")}`;
  }
  if (o.collateral) {
    // A TCB status means something only for a quote whose signatures and chain hold.
    const t = signature && pckChain ? evaluateTcb(quote, o.collateral, o.now ?? new Date(), o.rootPem) : { ok: false, status: null, reason: "the quote's signatures or PCK chain do not hold" };
    checks.tcb = t.ok;
    if (t.reason) reasons.tcb = t.reason;
    return { checks, reasons, quote, tcbStatus: t.status };
  }
  return { checks, reasons, quote };
}
