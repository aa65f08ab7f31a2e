import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { verifyEvidenceCommand } from "../../src/attestation/cli.js";
import { evaluateTcb, parseCollateral, pckExtensions } from "../../src/attestation/tcb.js";
import { parseTdxQuote, SIGNED_LEN } from "../../src/attestation/tdx-quote.js";
import { verifyTdxQuote } from "../../src/attestation/verify.js";
import { X509Certificate } from "node:crypto";
import { tempDir } from "../helpers/tmp.js";

const vector = (name: string) => readFileSync(new URL(`./vectors/${name}`, import.meta.url));
const QUOTE = vector("dcap-qvl_tdx_quote.dat");
const COLLATERAL_TEXT = vector("dcap-qvl_tdx_quote_collateral.json").toString("utf8");
const COLLATERAL = parseCollateral(COLLATERAL_TEXT);
// Inside the collateral's validity (issued 2025-06-19, next update 2025-07-19).
const WHEN = new Date("2025-07-01T00:00:00Z");

describe("TCB status from Intel's collateral (dcap-qvl's sample quote and collateral)", () => {
  it("reads FMSPC, the SGX TCB components and PCESVN from the PCK certificate", () => {
    const pck = new X509Certificate(parseTdxQuote(QUOTE).pckChainPem.match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/)![0]);
    assert.deepEqual(pckExtensions(pck), { fmspc: "B0C06F000000", compSvns: [3, 3, 2, 2, 4, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0], pceSvn: 11 });
  });

  it("UpToDate: the collateral's signatures, CRLs, QE identity, platform level and TDX module level all hold", () => {
    const r = verifyTdxQuote(QUOTE, { now: WHEN, collateral: COLLATERAL });
    assert.deepEqual(r.reasons, {});
    assert.deepEqual(r.checks, { structure: true, signature: true, pck_chain: true, tcb: true });
    assert.equal(r.tcbStatus, "UpToDate");
  });

  it("collateral past its nextUpdate, or altered, is not trusted", () => {
    let r = verifyTdxQuote(QUOTE, { now: new Date("2025-08-01T00:00:00Z"), collateral: COLLATERAL });
    assert.equal(r.checks.tcb, false);
    assert.match(r.reasons.tcb!, /past its nextUpdate/);
    r = verifyTdxQuote(QUOTE, { now: WHEN, collateral: { ...COLLATERAL, tcb_info: COLLATERAL.tcb_info.replace('"OutOfDate"', '"UpToDate"') } });
    assert.equal(r.checks.tcb, false);
    assert.match(r.reasons.tcb!, /TCB info signature does not verify/);
    r = verifyTdxQuote(QUOTE, { now: WHEN, collateral: { ...COLLATERAL, pck_crl: COLLATERAL.pck_crl.replace(/..$/, "00") } });
    assert.equal(r.checks.tcb, false);
    assert.match(r.reasons.tcb!, /PCK CRL is not signed/);
  });

  it("an older TDX module or QE is judged by its own level; another platform's TCB info does not apply", () => {
    // TEE_TCB_SVN of the quote lowered (signatures aside: evaluateTcb judges levels only).
    const q = parseTdxQuote(QUOTE);
    const old = { ...q, body: { ...q.body, teeTcbSvn: Buffer.from(q.body.teeTcbSvn).fill(2, 0, 1) } };
    const r = evaluateTcb(old, COLLATERAL, WHEN);
    assert.equal(r.ok, false);
    assert.notEqual(r.status, "UpToDate");
    const qe = Buffer.from(q.qeReport);
    qe[130] = qe[130]! ^ 1;
    assert.match(evaluateTcb({ ...q, qeReport: qe }, COLLATERAL, WHEN).reason!, /MRSIGNER is not Intel's TD quoting enclave's/);
    const gce = verifyTdxQuote(vector("go-tdx-guest_cos-113-tdx-quote.dat"), { now: WHEN, collateral: COLLATERAL });
    assert.equal(gce.checks.tcb, false);
    assert.match(gce.reasons.tcb!, /FMSPC/);
  });

  it("a quote whose signature fails gets no TCB status", () => {
    const t = Buffer.from(QUOTE);
    t[SIGNED_LEN - 1] = t[SIGNED_LEN - 1]! ^ 1;
    const r = verifyTdxQuote(t, { now: WHEN, collateral: COLLATERAL });
    assert.equal(r.checks.tcb, false);
    assert.match(r.reasons.tcb!, /signatures or PCK chain do not hold/);
  });

  it("verify-evidence --collateral adds tcb and tcb_status; unreadable or incomplete collateral exits 2", async (t) => {
    const dir = tempDir(t);
    const q = path.join(dir, "q.dat");
    writeFileSync(q, QUOTE);
    const c = path.join(dir, "c.json");
    writeFileSync(c, COLLATERAL_TEXT);
    const out: string[] = [];
    const err: string[] = [];
    const io = { out: (s: string) => void out.push(s), err: (s: string) => void err.push(s) };
    // Its REPORTDATA is not a binding of ours: exit 1, but the TCB is judged.
    assert.equal(await verifyEvidenceCommand([q, "--request-id", "r", "--nonce", "00".repeat(16), "--collateral", c], io, { now: WHEN }), 1);
    const r = JSON.parse(out.join(""));
    assert.equal(r.tcb, true);
    assert.equal(r.tcb_status, "UpToDate");
    assert.equal(r.binding, false);
    writeFileSync(c, JSON.stringify({ ...JSON.parse(COLLATERAL_TEXT), qe_identity: undefined }));
    assert.equal(await verifyEvidenceCommand([q, "--request-id", "r", "--nonce", "00".repeat(16), "--collateral", c], io), 2);
    assert.match(err.join(""), /no qe_identity/);
    assert.equal(await verifyEvidenceCommand([q, "--request-id", "r", "--nonce", "00".repeat(16), "--collateral", path.join(dir, "none.json")], io), 2);
    assert.match(err.join(""), /cannot read the collateral/);
  });
});
