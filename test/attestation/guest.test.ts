import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { bindingDigest } from "../../src/attestation/binding.js";
import { evidenceFromConsole, parseConsoleEvidence, renderAttestStep, renderGuestAttestScript } from "../../src/attestation/guest.js";
import { parseHostKey, renderBootScript } from "../../src/backends/common/cloud-init.js";
import { tempDir } from "../helpers/tmp.js";
import { GCE_QUOTE, fakeTpm2, fakeTsm, makeHostKey, runGuestScript } from "./guest-run.js";

const RID = "tdx-1";
const NONCE = "5e".repeat(32);
// An image URL nothing listens on: the script reports its evidence, then fails the fetch.
const IMAGE = { url: "http://127.0.0.1:9/none", sha256: "0".repeat(64), format: "bundle" as const };

function bootScript(mode: "tdx" | "azure", nonce = NONCE): string {
  return renderBootScript({ requestId: RID, envelope: { image: IMAGE }, sshUser: "cb", attestation: { mode, nonce } });
}

describe("guest evidence: the boot script's configfs-tsm step, executed with a stand-in configfs-tsm", () => {
  it("writes the binding of (request_id, nonce, host key) to inblob, prints outblob between markers before the image is fetched", async (t) => {
    const dir = tempDir(t);
    const hk = makeHostKey(dir);
    const tsm = fakeTsm(dir, RID);
    const consoleText = await runGuestScript(dir, bootScript("tdx"), { CB_TSM: tsm.root, CB_SSH_HOST_KEY: hk.pub });
    // The fake kernel received exactly the binding as REPORTDATA.
    assert.deepEqual(readFileSync(path.join(tsm.entry, "inblob")), bindingDigest(RID, NONCE, hk.fingerprint));
    const lines = consoleText.split("\n");
    const done = lines.indexOf(`COMPUTE-BRIDGE-EVIDENCE-DONE ${RID} tdx-quote-v4 ${hk.fingerprint}`);
    assert.ok(done > 0, consoleText);
    assert.ok(done < lines.indexOf("compute-bridge: fetching the image"), "evidence before anything from the image");
    assert.ok(lines.indexOf(`COMPUTE-BRIDGE-HOSTKEY ${RID} ${hk.fingerprint}`) < done);
    const ev = evidenceFromConsole("gcp", RID, NONCE, consoleText);
    assert.ok(ev && ev.status === "present");
    assert.deepEqual(Buffer.from(ev.blobs.td_quote!, "base64"), GCE_QUOTE);
    assert.deepEqual(ev.binding, { scheme: "compute-bridge/attestation/v1", request_id: RID, host_key_sha256: hk.fingerprint, digest: bindingDigest(RID, NONCE, hk.fingerprint).toString("hex") });
    assert.equal(ev.format, "tdx-quote-v4");
    assert.deepEqual(parseHostKey(consoleText, RID), { fingerprint: hk.fingerprint });
  });

  it("without a host key the binding says none", async (t) => {
    const dir = tempDir(t);
    const tsm = fakeTsm(dir, RID);
    const consoleText = await runGuestScript(dir, bootScript("tdx"), { CB_TSM: tsm.root });
    assert.deepEqual(readFileSync(path.join(tsm.entry, "inblob")), bindingDigest(RID, NONCE, null));
    const ev = evidenceFromConsole("gcp", RID, NONCE, consoleText);
    assert.ok(ev && ev.status === "present");
    assert.equal(ev.binding.host_key_sha256, null);
  });

  it("a kernel without configfs-tsm: evidence absent with the reason, the boot goes on", async (t) => {
    const dir = tempDir(t);
    const consoleText = await runGuestScript(dir, bootScript("tdx"), { CB_TSM: path.join(dir, "no-tsm") });
    const ev = evidenceFromConsole("gcp", RID, NONCE, consoleText);
    assert.ok(ev && ev.status === "absent");
    assert.match(ev.reason, /this guest kernel has no configfs-tsm/);
    assert.match(consoleText, /COMPUTE-BRIDGE-FAIL tdx-1 fetch/, "the script went on to the image");
  });

  it("a configfs-tsm provider that is not tdx_guest, and an unreadable outblob, are reported, not papered over", async (t) => {
    const dir = tempDir(t);
    const tsm = fakeTsm(dir, RID, { provider: "sev_guest" });
    let ev = evidenceFromConsole("gcp", RID, NONCE, await runGuestScript(dir, bootScript("tdx"), { CB_TSM: tsm.root }));
    assert.ok(ev && ev.status === "absent");
    assert.match(ev.reason, /provider is 'sev_guest', not tdx_guest/);
    const dir2 = tempDir(t);
    const tsm2 = fakeTsm(dir2, RID, { outblob: Buffer.alloc(0) });
    ev = evidenceFromConsole("gcp", RID, NONCE, await runGuestScript(dir2, bootScript("tdx"), { CB_TSM: tsm2.root }));
    assert.ok(ev && ev.status === "absent");
    assert.match(ev.reason, /reading the TD quote from configfs-tsm failed/);
  });

  it("the bare-metal credential script does the same from systemd credentials", async (t) => {
    const dir = tempDir(t);
    const hk = makeHostKey(dir);
    const tsm = fakeTsm(dir, RID);
    const creds = path.join(dir, "creds");
    mkdirSync(creds);
    writeFileSync(path.join(creds, "compute-bridge.request_id"), RID);
    writeFileSync(path.join(creds, "compute-bridge.attestation_nonce"), NONCE);
    const consoleText = await runGuestScript(dir, renderGuestAttestScript(), { CB_TSM: tsm.root, CB_SSH_HOST_KEY: hk.pub, CREDENTIALS_DIRECTORY: creds });
    assert.deepEqual(readFileSync(path.join(tsm.entry, "inblob")), bindingDigest(RID, NONCE, hk.fingerprint));
    const ev = evidenceFromConsole("baremetal", RID, NONCE, consoleText);
    assert.ok(ev && ev.status === "present", consoleText);
    assert.equal(ev.binding.host_key_sha256, hk.fingerprint);
    // A missing nonce credential: a reason, no quote.
    writeFileSync(path.join(creds, "compute-bridge.attestation_nonce"), "");
    const dir2 = tempDir(t);
    const again = await runGuestScript(dir2, renderGuestAttestScript(), { CB_TSM: fakeTsm(dir2, RID).root, CREDENTIALS_DIRECTORY: creds });
    assert.match(again, /COMPUTE-BRIDGE-EVIDENCE-NONE tdx-1 the compute-bridge.attestation_nonce credential is missing/);
  });

  it("refuses a nonce that is not hex before rendering anything", () => {
    assert.throws(() => renderAttestStep("tdx", "'; rm -rf / #".padEnd(40, "0")), /nonce/);
    assert.throws(() => bootScript("tdx", "ab"), /nonce/);
  });
});

describe("guest evidence: the Azure vTPM chain, executed with tpm2-tools stand-ins and a loopback IMDS", () => {
  let imds: http.Server;
  let imdsUrl = "";
  let lastReport = "";
  let answer: () => [number, string] = () => [200, JSON.stringify({ quote: GCE_QUOTE.toString("base64url") })];
  before(async () => {
    imds = http.createServer((req, res) => {
      let body = "";
      req.on("data", (c) => (body += c));
      req.on("end", () => {
        if (req.method !== "POST" || req.url !== "/acc/tdquote" || req.headers["content-type"] !== "application/json") return void res.writeHead(404).end();
        lastReport = (JSON.parse(body) as { report: string }).report;
        const [status, text] = answer();
        res.writeHead(status, { "content-type": "application/json" }).end(text);
      });
    });
    await new Promise<void>((r) => imds.listen(0, "127.0.0.1", r));
    imdsUrl = `http://127.0.0.1:${(imds.address() as AddressInfo).port}`;
  });
  after(() => new Promise<void>((r) => imds.close(() => r())));

  it("binding as HCL user data and TPM qualifying data, HCL report's TD report sent to IMDS, four blobs on the console", async (t) => {
    const dir = tempDir(t);
    const hk = makeHostKey(dir);
    const hcl = Buffer.alloc(2600);
    hcl.write("HCLA", 0);
    hcl.fill(0x42, 32, 32 + 1024); // the TD report
    const bin = fakeTpm2(dir, hcl);
    answer = () => [200, JSON.stringify({ quote: GCE_QUOTE.toString("base64url") })];
    const consoleText = await runGuestScript(dir, bootScript("azure"), { CB_TPM2_TOOLS: bin, CB_AZURE_IMDS: imdsUrl, CB_SSH_HOST_KEY: hk.pub });
    const binding = bindingDigest(RID, NONCE, hk.fingerprint);
    assert.deepEqual(readFileSync(path.join(dir, "nv_user_data.bin")), binding);
    const log = readFileSync(path.join(dir, "tpm2.log"), "utf8");
    assert.match(log, new RegExp(`-q ${binding.subarray(0, 32).toString("hex")} `));
    assert.match(log, /-c 0x81000003 /);
    assert.match(log, /-C o -o \S+ 0x01400001/);
    assert.equal(Buffer.from(lastReport, "base64url").toString("hex"), "42".repeat(1024));
    const ev = evidenceFromConsole("azure", RID, NONCE, consoleText);
    assert.ok(ev && ev.status === "present", consoleText);
    assert.equal(ev.format, "azure-tdx-vtpm");
    assert.deepEqual(Buffer.from(ev.blobs.hcl_report!, "base64"), hcl);
    assert.deepEqual(Buffer.from(ev.blobs.td_quote!, "base64"), GCE_QUOTE);
    assert.equal(Buffer.from(ev.blobs.tpm_quote!, "base64").toString(), "TPMS_ATTEST");
    assert.equal(Buffer.from(ev.blobs.tpm_signature!, "base64").toString(), "TPMT_SIGNATURE");
  });

  it("missing tpm2-tools and an IMDS without a quote give absent evidence with the reason", async (t) => {
    const dir = tempDir(t);
    let ev = evidenceFromConsole("azure", RID, NONCE, await runGuestScript(dir, bootScript("azure"), { CB_TPM2_TOOLS: path.join(dir, "nothing-here"), CB_AZURE_IMDS: imdsUrl }));
    assert.ok(ev && ev.status === "absent");
    assert.match(ev.reason, /tpm2-tools is not installed/);
    const dir2 = tempDir(t);
    answer = () => [503, "{}"];
    ev = evidenceFromConsole("azure", RID, NONCE, await runGuestScript(dir2, bootScript("azure"), { CB_TPM2_TOOLS: fakeTpm2(dir2, Buffer.alloc(2600, 1)), CB_AZURE_IMDS: imdsUrl }));
    assert.ok(ev && ev.status === "absent");
    assert.match(ev.reason, /IMDS \/acc\/tdquote\) gave no TD quote/);
  });
});

describe("guest evidence: console parsing", () => {
  const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");
  const block = (rid: string, name: string, data: Buffer, digest = sha(data)) =>
    [`COMPUTE-BRIDGE-EVIDENCE-BEGIN ${rid} ${name}`, ...data.toString("base64").match(/.{1,76}/g)!, `COMPUTE-BRIDGE-EVIDENCE-END ${rid} ${name} ${digest}`].join("\r\n");
  const q = Buffer.from("quote bytes ".repeat(20));

  it("tolerates CRLF, kernel lines inside a block and other requests' reports", () => {
    const withNoise = block(RID, "td_quote", q).replace(/\r\n(?=[A-Za-z0-9+/]{76}\r\n)/, "\r\n[   12.345678] random: crng init done\r\n");
    const text = [block("other", "td_quote", Buffer.from("x")), `COMPUTE-BRIDGE-EVIDENCE-DONE other tdx-quote-v4 none`, withNoise, `COMPUTE-BRIDGE-EVIDENCE-DONE ${RID} tdx-quote-v4 none`, ""].join("\r\n");
    const r = parseConsoleEvidence(text, RID);
    assert.ok(r && "blobs" in r);
    assert.deepEqual(Buffer.from(r.blobs.td_quote!, "base64"), q);
  });

  it("a corrupted blob (sha256 mismatch) or a missing one is not evidence; nothing yet is null", () => {
    const bad = `${block(RID, "td_quote", q, "0".repeat(64))}\nCOMPUTE-BRIDGE-EVIDENCE-DONE ${RID} tdx-quote-v4 none\n`;
    assert.deepEqual(parseConsoleEvidence(bad, RID), { none: "the guest's evidence report is incomplete on the console (missing or corrupted: td_quote)" });
    assert.equal(parseConsoleEvidence(block(RID, "td_quote", q), RID), null, "no DONE yet");
    assert.equal(parseConsoleEvidence("", RID), null);
    assert.match((parseConsoleEvidence(`COMPUTE-BRIDGE-EVIDENCE-DONE ${RID} sgx-v3 none`, RID) as { none: string }).none, /unknown evidence format/);
  });

  it("the first DONE or NONE counts: a workload printing later cannot replace the guest's report", () => {
    const text = [`COMPUTE-BRIDGE-EVIDENCE-NONE ${RID} no configfs-tsm`, block(RID, "td_quote", q), `COMPUTE-BRIDGE-EVIDENCE-DONE ${RID} tdx-quote-v4 none`].join("\n");
    assert.deepEqual(parseConsoleEvidence(text, RID), { none: "the guest produced no evidence: no configfs-tsm" });
  });
});
