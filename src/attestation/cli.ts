/**
 * `compute-bridge verify-evidence FILE --request-id ID --nonce HEX [--host-key SHA256:...]`
 *
 * Offline: reads FILE (the JSON of `GET /v1/grants/{id}/attestation`, or a raw TDX quote), checks
 * it against the nonce the requester chose, and prints one JSON object with a boolean per check
 * (structure, signature, pck_chain, binding, and tcb with --collateral) plus the reasons of the failed ones and the TD's
 * measurements. Exit 0 only when every check holds, 1 when one fails (or the evidence is absent),
 * 2 when FILE cannot be read or the arguments are wrong.
 */
import { readFile } from "node:fs/promises";
import { parseArgs } from "node:util";
import { AttestationEvidence } from "../domain/attestation.js";
import { BindingInputError, bindingDigest } from "./binding.js";
import { verifyAzureEvidence } from "./azure.js";
import { CollateralError, parseCollateral, type Collateral } from "./tcb.js";
import { verifyTdxQuote, type QuoteChecks, type QuoteVerification } from "./verify.js";

export const VERIFY_EVIDENCE_USAGE = `Usage: compute-bridge verify-evidence FILE --request-id ID --nonce HEX [--host-key SHA256:...] [--collateral FILE]

FILE is the JSON of GET /v1/grants/{id}/attestation, or a raw TDX quote (binary).
--request-id  the grant's request_id
--nonce       the attestation_nonce you sent (hex), or the bridge's nonce from the evidence
--host-key    the SSH host key fingerprint you will pin (default: the one the evidence names;
              "none" for a guest that reported no host key)
--collateral  Intel's collateral for the quote (JSON: tcb_info, qe_identity, CRLs and their
              signatures and issuer chains, as Intel PCS/PCCS and dcap-qvl give them): adds the
              check tcb (the platform's TCB status is UpToDate) and reports tcb_status
Prints one JSON object with a boolean per check; exit 0 all hold, 1 one fails, 2 unreadable input.
`;

interface Io {
  out: (s: string) => void;
  err: (s: string) => void;
}
const stdio: Io = { out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s) };

class UnreadableInput extends Error {}

export interface EvidenceReport extends QuoteChecks {
  reasons: Record<string, string>;
  tcb_status?: string | null;
  host_key_sha256: string | null;
  measurements?: { mrtd: string; rtmr0: string; rtmr1: string; rtmr2: string; rtmr3: string; td_attributes: string; xfam: string; mrconfigid: string; tee_tcb_svn: string };
}

/** Certificate validity time and (tests only) another trust anchor. */
export interface VerifyEvidenceOptions {
  now?: Date;
  rootPem?: string;
  collateral?: Collateral;
}

/** Evidence and what a requester asserts about it -> checks. */
export function verifyEvidence(input: { evidence: AttestationEvidence } | { quote: Buffer }, requestId: string, nonceHex: string, hostKey: string | null | undefined, o: VerifyEvidenceOptions = {}): EvidenceReport {
  let quote: Buffer;
  let boundKey: string | null;
  if ("quote" in input) {
    quote = input.quote;
    boundKey = hostKey ?? null;
  } else {
    const e = input.evidence;
    if (e.status === "absent") {
      return { structure: false, signature: false, pck_chain: false, binding: false, reasons: { structure: `no evidence: ${e.reason}` }, host_key_sha256: null };
    }
    const blob = (name: keyof typeof e.blobs) => {
      const v = e.blobs[name];
      if (v === undefined) throw new UnreadableInput(`the ${e.format} evidence has no ${name} blob`);
      return Buffer.from(v, "base64");
    };
    quote = blob("td_quote");
    boundKey = hostKey === undefined ? e.binding.host_key_sha256 : hostKey;
    if (e.format === "azure-tdx-vtpm") {
      const expected = bindingDigest(requestId, nonceHex, boundKey);
      return report(verifyAzureEvidence({ hcl_report: blob("hcl_report"), td_quote: quote, tpm_quote: blob("tpm_quote"), tpm_signature: blob("tpm_signature") }, { expectedReportData: expected, ...o }), boundKey);
    }
  }
  const expected = bindingDigest(requestId, nonceHex, boundKey);
  return report(verifyTdxQuote(quote, { expectedReportData: expected, ...o }), boundKey);
}

function report(v: QuoteVerification, boundKey: string | null): EvidenceReport {
  const b = v.quote?.body;
  return {
    ...v.checks,
    reasons: v.reasons,
    ...(v.tcbStatus !== undefined ? { tcb_status: v.tcbStatus } : {}),
    host_key_sha256: boundKey,
    ...(b
      ? {
          measurements: {
            mrtd: b.mrTd.toString("hex"),
            rtmr0: b.rtmrs[0].toString("hex"),
            rtmr1: b.rtmrs[1].toString("hex"),
            rtmr2: b.rtmrs[2].toString("hex"),
            rtmr3: b.rtmrs[3].toString("hex"),
            td_attributes: b.tdAttributes.toString("hex"),
            xfam: b.xfam.toString("hex"),
            mrconfigid: b.mrConfigId.toString("hex"),
            tee_tcb_svn: b.teeTcbSvn.toString("hex"),
          },
        }
      : {}),
  };
}

async function readCollateral(file: string): Promise<Collateral> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (e) {
    throw new UnreadableInput(`cannot read the collateral ${file}: ${(e as Error).message}`);
  }
  try {
    return parseCollateral(text);
  } catch (e) {
    if (e instanceof CollateralError) throw new UnreadableInput(`${file}: ${e.message}`);
    throw e;
  }
}

async function readEvidence(file: string): Promise<{ evidence: AttestationEvidence } | { quote: Buffer }> {
  let raw: Buffer;
  try {
    raw = await readFile(file);
  } catch (e) {
    throw new UnreadableInput(`cannot read ${file}: ${(e as Error).message}`);
  }
  // JSON evidence starts with "{" (after whitespace); a TDX quote starts with its version, 04 00.
  const text = raw.subarray(0, 64).toString("latin1").trimStart();
  if (!text.startsWith("{")) return { quote: raw };
  let json: unknown;
  try {
    json = JSON.parse(raw.toString("utf8"));
  } catch (e) {
    throw new UnreadableInput(`${file} is not valid JSON: ${(e as Error).message}`);
  }
  const p = AttestationEvidence.safeParse(json);
  if (!p.success) {
    const i = p.error.issues[0]!;
    throw new UnreadableInput(`${file} is not attestation evidence: ${i.path.join(".") || "(root)"}: ${i.message}`);
  }
  return { evidence: p.data };
}

export async function verifyEvidenceCommand(argv: string[], io: Io = stdio, o: VerifyEvidenceOptions = {}): Promise<number> {
  let values: { "request-id"?: string | undefined; nonce?: string | undefined; "host-key"?: string | undefined; collateral?: string | undefined; help?: boolean | undefined };
  let positionals: string[];
  try {
    ({ values, positionals } = parseArgs({
      args: argv,
      options: { "request-id": { type: "string" }, nonce: { type: "string" }, "host-key": { type: "string" }, collateral: { type: "string" }, help: { type: "boolean", short: "h" } },
      allowPositionals: true,
      strict: true,
    }));
  } catch (e) {
    io.err(`compute-bridge verify-evidence: ${(e as Error).message}\n\n${VERIFY_EVIDENCE_USAGE}`);
    return 2;
  }
  if (values.help) {
    io.out(VERIFY_EVIDENCE_USAGE);
    return 0;
  }
  const usage = (msg: string) => {
    io.err(`compute-bridge verify-evidence: ${msg}\n\n${VERIFY_EVIDENCE_USAGE}`);
    return 2;
  };
  if (positionals.length !== 1) return usage(positionals.length === 0 ? "FILE is required" : `one FILE expected, got ${positionals.length}`);
  if (values["request-id"] === undefined) return usage("--request-id is required");
  if (values.nonce === undefined) return usage("--nonce is required");
  const hk = values["host-key"];
  const hostKey = hk === undefined ? undefined : hk === "none" ? null : hk;
  try {
    // Argument errors surface before the file is read.
    bindingDigest(values["request-id"], values.nonce, hostKey ?? null);
  } catch (e) {
    if (e instanceof BindingInputError) return usage(e.message.replace(/^request_id/, "--request-id").replace(/^nonce/, "--nonce").replace(/^host key/, "--host-key"));
    throw e;
  }
  try {
    const input = await readEvidence(positionals[0]!);
    const collateral = values.collateral === undefined ? undefined : await readCollateral(values.collateral);
    const report = verifyEvidence(input, values["request-id"], values.nonce, hostKey, { ...o, ...(collateral ? { collateral } : {}) });
    io.out(`${JSON.stringify(report)}\n`);
    const ok = report.structure && report.signature && report.pck_chain && report.binding !== false && report.tcb !== false;
    return ok ? 0 : 1;
  } catch (e) {
    if (e instanceof UnreadableInput) {
      io.err(`compute-bridge verify-evidence: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
}
