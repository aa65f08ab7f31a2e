/**
 * A TDX quote v4 signed by keys made here, under a throw-away root CA (openssl CLI): the only way a
 * test can hold a quote whose REPORTDATA is a binding it chose AND whose signatures verify. It is
 * verified against its own root (verifyTdxQuote's rootPem); against Intel's root its chain fails.
 * Real quotes (vectors/) prove the parser and verifier on hardware output.
 */
import { execFileSync } from "node:child_process";
import { createHash, createPrivateKey, generateKeyPairSync, sign, type KeyObject } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { tempDir } from "../helpers/tmp.js";

export interface SyntheticPki {
  rootPem: string;
  chainPem: string;
  pckKeyPem: string;
}

/** Root CA -> PCK leaf (P-256), valid for 10 days. */
export function makePki(): SyntheticPki {
  const d = tempDir(undefined, "cb-pki-");
  const f = (n: string) => path.join(d, n);
  const run = (args: string[]) => execFileSync("openssl", args, { stdio: ["ignore", "ignore", "pipe"] });
  run(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "10", "-subj", "/CN=Test SGX Root CA", "-addext", "basicConstraints=critical,CA:TRUE", "-keyout", f("root.key"), "-out", f("root.pem")]);
  run(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=Test SGX PCK Certificate", "-keyout", f("pck.key"), "-out", f("pck.csr")]);
  writeFileSync(f("ext"), "basicConstraints=critical,CA:FALSE\n");
  run(["x509", "-req", "-in", f("pck.csr"), "-CA", f("root.pem"), "-CAkey", f("root.key"), "-CAcreateserial", "-days", "10", "-extfile", f("ext"), "-out", f("pck.pem")]);
  const rootPem = readFileSync(f("root.pem"), "utf8");
  return { rootPem, chainPem: readFileSync(f("pck.pem"), "utf8") + rootPem, pckKeyPem: readFileSync(f("pck.key"), "utf8") };
}

const p1363 = (data: Buffer, key: KeyObject) => sign("sha256", data, { key, dsaEncoding: "ieee-p1363" });

/** A well-formed TDX quote v4 carrying `reportData`, signed through `pki`. */
export function buildQuote(reportData: Buffer, pki: SyntheticPki): Buffer {
  if (reportData.length !== 64) throw new Error("reportData must be 64 bytes");
  const header = Buffer.alloc(48);
  header.writeUInt16LE(4, 0);
  header.writeUInt16LE(2, 2);
  header.writeUInt32LE(0x81, 4);
  Buffer.from("939a7233f79c4ca9940a0db3957f0607", "hex").copy(header, 12);
  const body = Buffer.alloc(584);
  body.fill(0x11, 16 + 48 + 48 + 24, 16 + 48 + 48 + 24 + 48); // MRTD
  reportData.copy(body, 584 - 64);
  const ak = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const jwk = ak.publicKey.export({ format: "jwk" });
  const akRaw = Buffer.concat([Buffer.from(jwk.x!, "base64url"), Buffer.from(jwk.y!, "base64url")]);
  const signature = p1363(Buffer.concat([header, body]), ak.privateKey);
  const authData = Buffer.alloc(32, 7);
  const qeReport = Buffer.alloc(384);
  createHash("sha256").update(Buffer.concat([akRaw, authData])).digest().copy(qeReport, 384 - 64);
  const qeSig = p1363(qeReport, createPrivateKey(pki.pckKeyPem));
  const chain = Buffer.from(pki.chainPem, "latin1");
  const inner = Buffer.alloc(6);
  inner.writeUInt16LE(5, 0);
  inner.writeUInt32LE(chain.length, 2);
  const auth = Buffer.alloc(2);
  auth.writeUInt16LE(authData.length, 0);
  const certData = Buffer.concat([qeReport, qeSig, auth, authData, inner, chain]);
  const outer = Buffer.alloc(6);
  outer.writeUInt16LE(6, 0);
  outer.writeUInt32LE(certData.length, 2);
  const sigData = Buffer.concat([signature, akRaw, outer, certData]);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(sigData.length, 0);
  return Buffer.concat([header, body, len, sigData]);
}
