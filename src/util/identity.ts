import { createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import path from "node:path";
import { canonicalJson } from "./canonical-json.js";

/** The bridge's ed25519 identity: signs the ProviderCard and every ComputeLog. */
export class Identity {
  private constructor(
    private readonly privateKey: KeyObject,
    readonly publicKey: KeyObject,
  ) {}

  /** Load `identity.key` from state_dir, generating it (mode 0600) on first start. */
  static loadOrCreate(stateDir: string): Identity {
    mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    const file = path.join(stateDir, "identity.key");
    if (!existsSync(file)) {
      const { privateKey } = generateKeyPairSync("ed25519");
      const pem = privateKey.export({ format: "pem", type: "pkcs8" }) as string;
      const tmp = `${file}.${process.pid}.tmp`;
      writeFileSync(tmp, pem, { mode: 0o600 });
      renameSync(tmp, file);
    }
    chmodSync(file, 0o600);
    const privateKey = createPrivateKey(readFileSync(file));
    if (privateKey.asymmetricKeyType !== "ed25519") throw new Error(`${file} is not an ed25519 key`);
    return new Identity(privateKey, createPublicKey(privateKey));
  }

  static ephemeral(): Identity {
    const { privateKey, publicKey } = generateKeyPairSync("ed25519");
    return new Identity(privateKey, publicKey);
  }

  /** Raw 32-byte public key, base64. */
  get publicKeyBase64(): string {
    const der = this.publicKey.export({ format: "der", type: "spki" });
    return der.subarray(der.length - 32).toString("base64");
  }

  /** Sign the canonical JSON of `doc` (which must not contain `signature`). */
  signDoc(doc: object): string {
    return sign(null, Buffer.from(canonicalJson(doc)), this.privateKey).toString("base64");
  }
}

/** Verify a signed document against a raw base64 ed25519 public key. */
export function verifySignedDoc(doc: { signature: string } & object, publicKeyBase64: string): boolean {
  const { signature, ...rest } = doc;
  const raw = Buffer.from(publicKeyBase64, "base64");
  const spki = Buffer.concat([Buffer.from("302a300506032b6570032100", "hex"), raw]);
  const key = createPublicKey({ key: spki, format: "der", type: "spki" });
  return verify(null, Buffer.from(canonicalJson(rest)), key, Buffer.from(signature, "base64"));
}
