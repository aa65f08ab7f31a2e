import { generateKeyPairSync, randomBytes } from "node:crypto";

/**
 * A fresh ed25519 key pair in OpenSSH's formats, from node:crypto alone: the daemon's accept path
 * generates one per grant without an SSH key, and loading ssh2 for that cost every start about a
 * tenth of a second (issue #23).
 *
 * The private key is OpenSSH's own container (PROTOCOL.key in openssh-portable): magic
 * "openssh-key-v1\0", cipher and KDF "none", one public key, then the private section (two equal
 * check words, key type, public key, 64-byte private key = seed || public, comment, padding
 * 1, 2, 3, ... to the 8-byte block size), base64 in 70-column lines.
 */
export function generateEd25519(comment: string): { private: string; public: string } {
  const { publicKey, privateKey } = generateKeyPairSync("ed25519");
  const pub = Buffer.from(publicKey.export({ format: "jwk" }).x!, "base64url");
  const seed = Buffer.from(privateKey.export({ format: "jwk" }).d!, "base64url");
  const type = Buffer.from("ssh-ed25519");
  const pubBlob = Buffer.concat([str(type), str(pub)]);
  const check = randomBytes(4);
  let priv = Buffer.concat([check, check, str(type), str(pub), str(Buffer.concat([seed, pub])), str(Buffer.from(comment))]);
  const pad = (8 - (priv.length % 8)) % 8;
  priv = Buffer.concat([priv, Buffer.from(Array.from({ length: pad }, (_, i) => i + 1))]);
  const body = Buffer.concat([Buffer.from("openssh-key-v1\0"), str(Buffer.from("none")), str(Buffer.from("none")), str(Buffer.alloc(0)), u32(1), str(pubBlob), str(priv)]);
  const b64 = body.toString("base64").replace(/.{70}/g, "$&\n").replace(/\n$/, "");
  return {
    private: `-----BEGIN OPENSSH PRIVATE KEY-----\n${b64}\n-----END OPENSSH PRIVATE KEY-----\n`,
    public: `ssh-ed25519 ${pubBlob.toString("base64")}${comment ? ` ${comment}` : ""}`,
  };
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

/** An SSH wire "string": uint32 length, then the bytes. */
function str(b: Buffer): Buffer {
  return Buffer.concat([u32(b.length), b]);
}
