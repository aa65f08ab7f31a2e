/**
 * Intel TDX quote version 4 (ECDSA P-256 attestation key), as the Intel DCAP "Quote Library API"
 * (Appendix A.3/A.4, TDX DCAP Quote Generation Library and Quote Verification Library) lays it out.
 * All integers are little-endian.
 *
 *   header            48  version u16 (4), attestation key type u16 (2 = ECDSA-256-with-P-256),
 *                         TEE type u32 (0x81 = TDX), reserved 4, QE vendor id 16, user data 20
 *   TD report body   584  TEE_TCB_SVN 16, MRSEAM 48, MRSIGNERSEAM 48, SEAMATTRIBUTES 8,
 *                         TDATTRIBUTES 8, XFAM 8, MRTD 48, MRCONFIGID 48, MROWNER 48,
 *                         MROWNERCONFIG 48, RTMR0..3 4x48, REPORTDATA 64
 *   signature length   4  u32: the bytes that follow
 *   signature data        quote signature 64 (r||s) over SHA-256(header || body),
 *                         attestation public key 64 (x||y),
 *                         certification data: type u16 (6 = QE report certification data), size u32,
 *                           QE report 384 (an SGX report body), QE report signature 64 (r||s, by the
 *                           PCK key), QE auth data (size u16, bytes),
 *                           certification data: type u16 (5 = PCK certificate chain, PEM), size u32, bytes
 *
 * Only the structure is checked here; signatures and the chain are verify.ts's.
 */

export const HEADER_LEN = 48;
export const TD_REPORT_LEN = 584;
export const QE_REPORT_LEN = 384;
export const SIGNED_LEN = HEADER_LEN + TD_REPORT_LEN;
/** Largest quote accepted (real ones are about 5 KB; the PEM chain dominates). */
export const MAX_QUOTE_BYTES = 64 * 1024;

const TEE_TYPE_TDX = 0x81;
const AK_TYPE_ECDSA_P256 = 2;
const CERT_TYPE_QE_REPORT = 6;
const CERT_TYPE_PCK_CHAIN = 5;

export class QuoteFormatError extends Error {
  override name = "QuoteFormatError";
}

export interface TdReportBody {
  teeTcbSvn: Buffer;
  mrSeam: Buffer;
  mrSignerSeam: Buffer;
  seamAttributes: Buffer;
  tdAttributes: Buffer;
  xfam: Buffer;
  mrTd: Buffer;
  mrConfigId: Buffer;
  mrOwner: Buffer;
  mrOwnerConfig: Buffer;
  rtmrs: [Buffer, Buffer, Buffer, Buffer];
  reportData: Buffer;
}

export interface TdxQuoteV4 {
  version: 4;
  attestationKeyType: number;
  teeType: number;
  qeVendorId: Buffer;
  userData: Buffer;
  body: TdReportBody;
  /** header || body: what the attestation key signed. */
  signedBytes: Buffer;
  /** r || s, 64 bytes. */
  signature: Buffer;
  /** x || y, 64 bytes (an uncompressed P-256 point without its 0x04 prefix). */
  attestationKey: Buffer;
  qeReport: Buffer;
  /** The QE report's REPORTDATA (its last 64 bytes). */
  qeReportData: Buffer;
  qeReportSignature: Buffer;
  qeAuthData: Buffer;
  /** The PEM certificate chain: PCK leaf, intermediate CA, root CA. */
  pckChainPem: string;
  /** Bytes of the quote proper (a capture may be zero-padded after it). */
  length: number;
}

class Reader {
  constructor(
    private readonly b: Buffer,
    public pos = 0,
  ) {}
  take(n: number, what: string): Buffer {
    if (n < 0 || this.pos + n > this.b.length) throw new QuoteFormatError(`quote truncated in ${what} (needs ${n} bytes at offset ${this.pos}, ${this.b.length - this.pos} left)`);
    const out = this.b.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  u16(what: string): number {
    return this.take(2, what).readUInt16LE(0);
  }
  u32(what: string): number {
    return this.take(4, what).readUInt32LE(0);
  }
}

/** Parse a TDX quote v4; a QuoteFormatError names the first thing that is wrong. */
export function parseTdxQuote(raw: Uint8Array): TdxQuoteV4 {
  const buf = Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength);
  if (buf.length > MAX_QUOTE_BYTES) throw new QuoteFormatError(`quote is ${buf.length} bytes; at most ${MAX_QUOTE_BYTES} are accepted`);
  const r = new Reader(buf);
  const version = r.u16("header.version");
  if (version !== 4) throw new QuoteFormatError(`quote version ${version} is not supported (TDX quote v4 only)`);
  const attestationKeyType = r.u16("header.attestation_key_type");
  if (attestationKeyType !== AK_TYPE_ECDSA_P256) throw new QuoteFormatError(`attestation key type ${attestationKeyType} is not ECDSA P-256 (2)`);
  const teeType = r.u32("header.tee_type");
  if (teeType !== TEE_TYPE_TDX) throw new QuoteFormatError(`TEE type 0x${teeType.toString(16)} is not TDX (0x81)`);
  r.take(4, "header.reserved");
  const qeVendorId = r.take(16, "header.qe_vendor_id");
  const userData = r.take(20, "header.user_data");
  const b = new Reader(r.take(TD_REPORT_LEN, "TD report body"));
  const body: TdReportBody = {
    teeTcbSvn: b.take(16, "tee_tcb_svn"),
    mrSeam: b.take(48, "mrseam"),
    mrSignerSeam: b.take(48, "mrsignerseam"),
    seamAttributes: b.take(8, "seam_attributes"),
    tdAttributes: b.take(8, "td_attributes"),
    xfam: b.take(8, "xfam"),
    mrTd: b.take(48, "mrtd"),
    mrConfigId: b.take(48, "mrconfigid"),
    mrOwner: b.take(48, "mrowner"),
    mrOwnerConfig: b.take(48, "mrownerconfig"),
    rtmrs: [b.take(48, "rtmr0"), b.take(48, "rtmr1"), b.take(48, "rtmr2"), b.take(48, "rtmr3")],
    reportData: b.take(64, "report_data"),
  };
  const sigLen = r.u32("signature data length");
  const sigStart = r.pos;
  const s = new Reader(r.take(sigLen, "signature data"));
  const signature = s.take(64, "quote signature");
  const attestationKey = s.take(64, "attestation key");
  const certType = s.u16("certification data type");
  if (certType !== CERT_TYPE_QE_REPORT) throw new QuoteFormatError(`certification data type ${certType} is not QE report certification data (6)`);
  const certSize = s.u32("certification data size");
  const c = new Reader(s.take(certSize, "QE report certification data"));
  if (s.pos !== sigLen) throw new QuoteFormatError(`${sigLen - s.pos} unexplained bytes after the certification data`);
  const qeReport = c.take(QE_REPORT_LEN, "QE report");
  const qeReportSignature = c.take(64, "QE report signature");
  const qeAuthData = c.take(c.u16("QE auth data size"), "QE auth data");
  const innerType = c.u16("PCK certification data type");
  if (innerType !== CERT_TYPE_PCK_CHAIN) throw new QuoteFormatError(`certification data type ${innerType} is not a PCK certificate chain (5)`);
  const chain = c.take(c.u32("PCK certificate chain size"), "PCK certificate chain");
  if (c.pos !== certSize) throw new QuoteFormatError(`${certSize - c.pos} unexplained bytes after the PCK certificate chain`);
  const length = sigStart + sigLen;
  // The legacy /dev/tdx_guest ioctl hands out a fixed buffer: zeros after the quote are padding,
  // anything else is not part of a quote.
  for (let i = length; i < buf.length; i++) if (buf[i] !== 0) throw new QuoteFormatError(`non-zero bytes after the end of the quote (offset ${i})`);
  // The chain is PEM text, possibly NUL-terminated.
  const pckChainPem = chain.toString("latin1").replace(/\0+$/, "");
  if (!/^[\x09\x0a\x0d\x20-\x7e]*$/.test(pckChainPem) || !pckChainPem.includes("-----BEGIN CERTIFICATE-----")) throw new QuoteFormatError("the PCK certificate chain is not PEM");
  return {
    version: 4,
    attestationKeyType,
    teeType,
    qeVendorId,
    userData,
    body,
    signedBytes: buf.subarray(0, SIGNED_LEN),
    signature,
    attestationKey,
    qeReport,
    qeReportData: qeReport.subarray(QE_REPORT_LEN - 64),
    qeReportSignature,
    qeAuthData,
    pckChainPem,
    length,
  };
}

/** The PEM blocks of a chain, in order. */
export function splitPemChain(pem: string): string[] {
  return pem.match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g) ?? [];
}
