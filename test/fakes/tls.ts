/**
 * Throw-away TLS material for local test servers.
 *
 * `makeTestCert()` shells out to the `openssl` CLI (OpenSSL 3.x, verified with
 * 3.0.19) and returns a fresh self-signed P-256 certificate for CN=127.0.0.1
 * with `subjectAltName=IP:127.0.0.1`, valid for one day. The certificate is its
 * own CA, so a client trusts it by passing `ca` (for the Azure SDK pipeline:
 * `tlsOptions: { ca }`). Nothing is written anywhere but a private temporary
 * directory, which is removed before the promise settles.
 */
import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

const execFileAsync = promisify(execFile);

export interface TestCert {
  /** PEM certificate (self-signed). */
  cert: string;
  /** PEM private key (unencrypted PKCS#8). */
  key: string;
  /** PEM CA bundle a client should trust; identical to `cert`. */
  ca: string;
}

export interface MakeTestCertOptions {
  /** Common name; defaults to 127.0.0.1. */
  commonName?: string;
  /** subjectAltName value; defaults to `IP:127.0.0.1`. */
  subjectAltName?: string;
  /** Validity in days; defaults to 1. */
  days?: number;
}

export async function makeTestCert(options: MakeTestCertOptions = {}): Promise<TestCert> {
  const commonName = options.commonName ?? "127.0.0.1";
  const san = options.subjectAltName ?? "IP:127.0.0.1";
  const days = String(options.days ?? 1);
  const dir = await mkdtemp(join(tmpdir(), "test-cert-"));
  const keyPath = join(dir, "key.pem");
  const certPath = join(dir, "cert.pem");
  try {
    await execFileAsync(
      "openssl",
      [
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        days,
        "-subj",
        `/CN=${commonName}`,
        "-addext",
        `subjectAltName=${san}`,
        "-keyout",
        keyPath,
        "-out",
        certPath,
      ],
      { timeout: 30_000 },
    );
    const [cert, key] = await Promise.all([readFile(certPath, "utf8"), readFile(keyPath, "utf8")]);
    return { cert, key, ca: cert };
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === "ENOENT") {
      throw new Error("makeTestCert: the `openssl` CLI is not installed (apt-get install openssl)");
    }
    throw new Error(`makeTestCert: openssl failed: ${e.stderr?.trim() || e.message}`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
