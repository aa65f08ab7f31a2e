/**
 * TCB status of a TDX quote from Intel's collateral (Intel PCS v4: TCB info, QE identity, CRLs), in
 * the JSON layout Phala-Network/dcap-qvl and Intel's PCCS hand out:
 *   { tcb_info, tcb_info_signature (hex r||s), tcb_info_issuer_chain (PEM),
 *     qe_identity, qe_identity_signature, qe_identity_issuer_chain,
 *     pck_crl (hex DER), pck_crl_issuer_chain, root_ca_crl (hex DER) }
 *
 * Checked, all offline (Intel's "TDX DCAP Quote Verification" algorithm; the steps are named in
 * go-tdx-guest's testing/testdata/README.md):
 * - TCB info and QE identity are signed by Intel's TCB signing certificate, whose chain ends in the
 *   SGX root CA; neither has passed its nextUpdate at `now`;
 * - the CRLs are signed by the PCK's issuing CA and the root CA, current at `now`, and list neither
 *   the PCK certificate nor its CA;
 * - the QE report matches the QE identity (MRSIGNER, ISVPRODID, masked MISCSELECT and ATTRIBUTES)
 *   at a TCB level whose status is UpToDate;
 * - the PCK certificate's FMSPC is the TCB info's; the platform's TCB level is the first one whose
 *   SGX components and PCESVN (from the PCK certificate's SGX extensions) and TDX components
 *   (TEE_TCB_SVN) are all at least its own; for a TDX module with a major version (TEE_TCB_SVN[1])
 *   above 0, the module's identity (TDX_0<major>) must be at an UpToDate level for its minor SVN.
 * `tcb` holds when all of that holds and the level's status is UpToDate; the status is reported.
 */
import { verify as verifySignature, X509Certificate } from "node:crypto";
import { children, DerError, intValue, oidText, readTlv, serialHex, type Tlv } from "./der.js";
import { INTEL_SGX_ROOT_CA_PEM } from "./intel-root-ca.js";
import { splitPemChain, type TdxQuoteV4 } from "./tdx-quote.js";
import { verifyChain } from "./verify.js";

export interface Collateral {
  tcb_info: string;
  tcb_info_signature: string;
  tcb_info_issuer_chain: string;
  qe_identity: string;
  qe_identity_signature: string;
  qe_identity_issuer_chain: string;
  pck_crl: string;
  pck_crl_issuer_chain: string;
  root_ca_crl: string;
}

export class CollateralError extends Error {
  override name = "CollateralError";
}

/** Parse collateral JSON text; a CollateralError names the missing field. */
export function parseCollateral(text: string): Collateral {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw new CollateralError("the collateral is not JSON");
  }
  const keys = ["tcb_info", "tcb_info_signature", "tcb_info_issuer_chain", "qe_identity", "qe_identity_signature", "qe_identity_issuer_chain", "pck_crl", "pck_crl_issuer_chain", "root_ca_crl"] as const;
  if (typeof v !== "object" || v === null) throw new CollateralError("the collateral is not a JSON object");
  for (const k of keys) if (typeof (v as Record<string, unknown>)[k] !== "string") throw new CollateralError(`the collateral has no ${k} (string)`);
  return v as Collateral;
}

export interface TcbResult {
  ok: boolean;
  /** The platform's TCB status (UpToDate, OutOfDate, Revoked, ...) when it got that far. */
  status: string | null;
  reason: string | null;
}

interface TcbLevel {
  tcb: { sgxtcbcomponents?: { svn: number }[]; pcesvn?: number; tdxtcbcomponents?: { svn: number }[]; isvsvn?: number };
  tcbStatus: string;
}

const SGX_EXT = "1.2.840.113741.1.13.1";

/** FMSPC, the 16 SGX TCB component SVNs and PCESVN from a PCK certificate's SGX extension. */
export function pckExtensions(cert: X509Certificate): { fmspc: string; compSvns: number[]; pceSvn: number } {
  const tbs = children(readTlv(cert.raw).content)[0]!;
  const exts = children(tbs.content).find((t) => t.tag === 0xa3);
  if (!exts) throw new CollateralError("the PCK certificate has no extensions");
  let sgx: Tlv | undefined;
  for (const ext of children(children(exts.content)[0]!.content)) {
    const parts = children(ext.content);
    if (oidText(parts[0]!.content) === SGX_EXT) sgx = parts[parts.length - 1];
  }
  if (!sgx) throw new CollateralError("the PCK certificate has no SGX extension");
  let fmspc: string | null = null;
  const compSvns: number[] = [];
  let pceSvn: number | null = null;
  for (const item of children(readTlv(sgx.content).content)) {
    const [oid, value] = children(item.content);
    const id = oidText(oid!.content);
    if (id === `${SGX_EXT}.4`) fmspc = value!.content.toString("hex").toUpperCase();
    if (id === `${SGX_EXT}.2`) {
      for (const comp of children(value!.content)) {
        const [o, v] = children(comp.content);
        const n = Number(oidText(o!.content).split(".").pop());
        if (n >= 1 && n <= 16) compSvns[n - 1] = intValue(v!.content);
        if (n === 17) pceSvn = intValue(v!.content);
      }
    }
  }
  if (fmspc === null || pceSvn === null || compSvns.filter((x) => x !== undefined).length !== 16) throw new CollateralError("the PCK certificate's SGX extension lacks FMSPC or TCB components");
  return { fmspc, compSvns, pceSvn };
}

/** Verify a DER CRL's signature with `issuer`, its currency at `now`; return the revoked serials. */
export function crlRevoked(der: Buffer, issuer: X509Certificate, now: Date, what: string): Set<string> {
  const [tbs, , sig] = children(readTlv(der).content);
  if (!tbs || !sig || sig.tag !== 0x03) throw new CollateralError(`the ${what} is not a CRL`);
  if (!verifySignature("sha256", tbs.raw, { key: issuer.publicKey, dsaEncoding: "der" }, sig.content.subarray(1))) throw new CollateralError(`the ${what} is not signed by ${issuer.subject.split("\n").find((l) => l.startsWith("CN=")) ?? "its issuer"}`);
  const fields = children(tbs.content);
  const times = fields.filter((f) => f.tag === 0x17 || f.tag === 0x18).map((f) => parseAsn1Time(f));
  if (times.length >= 2 && now.getTime() > times[1]!) throw new CollateralError(`the ${what} expired at ${new Date(times[1]!).toISOString()}`);
  const revoked = new Set<string>();
  for (const f of fields) {
    if (f.tag !== 0x30) continue;
    const entries = children(f.content);
    if (entries.length === 0 || entries[0]!.tag !== 0x30) continue;
    const first = children(entries[0]!.content)[0];
    if (first?.tag !== 0x02) continue;
    for (const e of entries) revoked.add(serialHex(children(e.content)[0]!.content));
  }
  return revoked;
}

function parseAsn1Time(t: Tlv): number {
  const s = t.content.toString("latin1");
  const m = t.tag === 0x17 ? /^(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(s) : /^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(s);
  if (!m) throw new CollateralError("a CRL time does not parse");
  const year = t.tag === 0x17 ? (Number(m[1]) >= 50 ? 1900 : 2000) + Number(m[1]) : Number(m[1]);
  return Date.UTC(year, Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6]));
}

/** A signed collateral document: chain to the root, signature over the exact JSON text, currency. */
function signedDoc(text: string, sigHex: string, chainPem: string, now: Date, rootPem: string, what: string): Record<string, unknown> {
  const chain = verifyChain(chainPem, now, rootPem);
  if ("error" in chain) throw new CollateralError(`the ${what} issuer chain: ${chain.error}`);
  if (!verifySignature("sha256", Buffer.from(text, "utf8"), { key: chain.leaf.publicKey, dsaEncoding: "ieee-p1363" }, Buffer.from(sigHex, "hex"))) throw new CollateralError(`the ${what} signature does not verify`);
  const doc = JSON.parse(text) as Record<string, unknown>;
  const next = Date.parse(String(doc.nextUpdate));
  if (!Number.isFinite(next) || now.getTime() > next) throw new CollateralError(`the ${what} is past its nextUpdate (${String(doc.nextUpdate)})`);
  return doc;
}

const hexEq = (a: Buffer, b: string) => a.toString("hex").toUpperCase() === b.toUpperCase();
function masked(value: Buffer, want: string, mask: string): boolean {
  const w = Buffer.from(want, "hex");
  const m = Buffer.from(mask, "hex");
  if (w.length !== value.length || m.length !== value.length) return false;
  for (let i = 0; i < value.length; i++) if ((value[i]! & m[i]!) !== (w[i]! & m[i]!)) return false;
  return true;
}

/** The TCB status of `quote` under `collateral` (whose signatures and CRLs are checked first). */
export function evaluateTcb(quote: TdxQuoteV4, collateral: Collateral, now: Date, rootPem: string = INTEL_SGX_ROOT_CA_PEM): TcbResult {
  try {
    const tcbInfo = signedDoc(collateral.tcb_info, collateral.tcb_info_signature, collateral.tcb_info_issuer_chain, now, rootPem, "TCB info");
    const qeId = signedDoc(collateral.qe_identity, collateral.qe_identity_signature, collateral.qe_identity_issuer_chain, now, rootPem, "QE identity");
    if (tcbInfo.id !== "TDX") throw new CollateralError(`the TCB info is for ${String(tcbInfo.id)}, not TDX`);
    if (qeId.id !== "TD_QE") throw new CollateralError(`the QE identity is for ${String(qeId.id)}, not TD_QE`);

    const certs = splitPemChain(quote.pckChainPem).map((p) => new X509Certificate(p));
    const [pck, pckCa] = certs;
    if (!pck || !pckCa) throw new CollateralError("the quote's PCK chain is incomplete");
    const root = new X509Certificate(rootPem);
    const crlIssuer = verifyChain(collateral.pck_crl_issuer_chain, now, rootPem);
    if ("error" in crlIssuer) throw new CollateralError(`the PCK CRL issuer chain: ${crlIssuer.error}`);
    if (!crlIssuer.leaf.raw.equals(pckCa.raw)) throw new CollateralError("the PCK CRL is not from the CA that issued the PCK certificate");
    if (crlRevoked(Buffer.from(collateral.pck_crl, "hex"), pckCa, now, "PCK CRL").has(pck.serialNumber.toLowerCase().replace(/^0+(?=.)/, ""))) return { ok: false, status: "Revoked", reason: "the PCK certificate is revoked" };
    if (crlRevoked(Buffer.from(collateral.root_ca_crl, "hex"), root, now, "root CA CRL").has(pckCa.serialNumber.toLowerCase().replace(/^0+(?=.)/, ""))) return { ok: false, status: "Revoked", reason: "the PCK certificate's CA is revoked" };

    // The quoting enclave.
    const qe = quote.qeReport;
    if (!hexEq(qe.subarray(128, 160), String(qeId.mrsigner))) return { ok: false, status: null, reason: "the QE report's MRSIGNER is not Intel's TD quoting enclave's" };
    if (qe.readUInt16LE(256) !== Number(qeId.isvprodid)) return { ok: false, status: null, reason: "the QE report's ISVPRODID does not match the QE identity" };
    if (!masked(qe.subarray(16, 20), String(qeId.miscselect), String(qeId.miscselectMask)) || !masked(qe.subarray(48, 64), String(qeId.attributes), String(qeId.attributesMask)))
      return { ok: false, status: null, reason: "the QE report's MISCSELECT or ATTRIBUTES do not match the QE identity" };
    const qeSvn = qe.readUInt16LE(258);
    const qeLevel = (qeId.tcbLevels as TcbLevel[]).find((l) => qeSvn >= (l.tcb.isvsvn ?? Infinity));
    if (qeLevel?.tcbStatus !== "UpToDate") return { ok: false, status: qeLevel?.tcbStatus ?? "Unrecognized", reason: `the quoting enclave's TCB (ISVSVN ${qeSvn}) is ${qeLevel?.tcbStatus ?? "not recognized"}` };

    // The platform.
    const ext = pckExtensions(pck);
    if (ext.fmspc !== String(tcbInfo.fmspc).toUpperCase()) throw new CollateralError(`the TCB info is for FMSPC ${String(tcbInfo.fmspc)}, the PCK certificate's is ${ext.fmspc}`);
    const tee = quote.body.teeTcbSvn;
    const level = (tcbInfo.tcbLevels as TcbLevel[]).find(
      (l) =>
        ext.compSvns.every((v, i) => v >= (l.tcb.sgxtcbcomponents?.[i]?.svn ?? Infinity)) &&
        ext.pceSvn >= (l.tcb.pcesvn ?? Infinity) &&
        [...tee].every((v, i) => v >= (l.tcb.tdxtcbcomponents?.[i]?.svn ?? Infinity)),
    );
    if (!level) return { ok: false, status: "Unrecognized", reason: "no TCB level of the TCB info matches this platform" };
    // A TDX module with a major version (TEE_TCB_SVN[1] > 0) also has its own identity levels.
    if (tee[1]! > 0) {
      const ids = (tcbInfo.tdxModuleIdentities ?? []) as { id: string; tcbLevels: TcbLevel[] }[];
      const mod = ids.find((m) => m.id === `TDX_${tee[1]!.toString(16).toUpperCase().padStart(2, "0")}`);
      const modLevel = mod?.tcbLevels.find((l) => tee[0]! >= (l.tcb.isvsvn ?? Infinity));
      if (modLevel?.tcbStatus !== "UpToDate") return { ok: false, status: modLevel?.tcbStatus ?? "Unrecognized", reason: `the TDX module (major ${tee[1]}, SVN ${tee[0]}) is ${modLevel?.tcbStatus ?? "not in the TCB info"}` };
    }
    return level.tcbStatus === "UpToDate" ? { ok: true, status: "UpToDate", reason: null } : { ok: false, status: level.tcbStatus, reason: `the platform's TCB is ${level.tcbStatus}` };
  } catch (e) {
    if (e instanceof CollateralError || e instanceof DerError || e instanceof SyntaxError) return { ok: false, status: null, reason: e.message };
    throw e;
  }
}
