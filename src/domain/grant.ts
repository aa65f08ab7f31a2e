import { hash } from "node:crypto";
import { z } from "zod";
import { AlmanacTick } from "./almanac.js";

/** Identifiers that end up in unit names, tags, file names and shell words: keep them boring. */
export const RequestId = z
  .string()
  .min(1)
  .max(64)
  .regex(/^[A-Za-z0-9._-]+$/, "must be 1-64 characters of A-Z a-z 0-9 . _ -")
  .refine((s) => s !== "." && s !== "..", "must not be '.' or '..'");

export const Region = z
  .string()
  .min(1)
  .max(64)
  .regex(/^[a-z0-9][a-z0-9-]*$/, "must be lowercase letters, digits and '-'");

export const ComputeGrant = z.strictObject({
  request_id: RequestId,
  region: Region,
  tdx_required: z.boolean(),
  cpu_millicores: z.number().int().min(1).max(1_024_000),
  ram_mib: z.number().int().min(1).max(16 * 1024 * 1024),
  valid_to: AlmanacTick,
});
export type ComputeGrant = z.infer<typeof ComputeGrant>;

const noNul = (s: string) => !s.includes("\0");

export const ImagePointer = z.strictObject({
  url: z
    .string()
    .max(2048)
    .refine(noNul, "must not contain NUL")
    .refine((u) => {
      try {
        const p = new URL(u);
        return ["http:", "https:", "file:"].includes(p.protocol);
      } catch {
        return false;
      }
    }, "must be an http://, https:// or file:// URL"),
  sha256: z
    .string()
    .regex(/^[0-9a-fA-F]{64}$/, "must be 64 hex characters")
    .transform((s) => s.toLowerCase()),
  format: z.enum(["bundle", "disk"]),
});
export type ImagePointer = z.infer<typeof ImagePointer>;

export const EnvName = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]{0,127}$/, "must be a shell-safe variable name");

/** One line of an OpenSSH authorized_keys entry: type, base64 body and an optional plain comment. */
export const SshPublicKey = z
  .string()
  .max(16384)
  .regex(
    /^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( [A-Za-z0-9@._+-]{1,128})?$/,
    "must be a single OpenSSH public key line ('<type> <base64> [comment]')",
  );

/** An attestation nonce: 16 to 64 bytes as hex, kept lowercase. */
export const NonceHex = z
  .string()
  .regex(/^(?:[0-9a-fA-F]{2}){16,64}$/, "must be 16 to 64 bytes as hex (32 to 128 hex digits)")
  .transform((s) => s.toLowerCase());

export const Envelope = z.strictObject({
  image: ImagePointer,
  command: z
    .array(z.string().min(1).max(4096).refine(noNul, "must not contain NUL"))
    .min(1)
    .max(256)
    .optional(),
  env: z
    .record(EnvName, z.string().max(32768).refine(noNul, "must not contain NUL"))
    .refine((e) => Object.keys(e).length <= 128, "at most 128 variables")
    .optional(),
  ssh_public_key: SshPublicKey.optional(),
  /**
   * The requester's nonce for a TDX grant's attestation evidence (src/attestation/binding.ts binds
   * it into the quote). Without it the bridge picks a random one and records it.
   */
  attestation_nonce: NonceHex.optional(),
});
export type Envelope = z.infer<typeof Envelope>;

export const GrantRequest = z.strictObject({ grant: ComputeGrant, envelope: Envelope });
export type GrantRequest = z.infer<typeof GrantRequest>;

/** Every key of T, present (a field added to a schema and left out here fails to compile). */
type Complete<T> = { [K in keyof Required<T>]: T[K] };

/**
 * canonicalJson() of a validated GrantRequest (keys sorted at every depth, absent members
 * omitted), built directly: the store's writer digests it for every accepted grant, and the
 * generic deep sort costs that thread about a quarter more per accept (measured: 30 vs 23 µs).
 * The same bytes as canonicalJson (test/domain/grant.test.ts).
 */
export function canonicalGrantRequest(r: GrantRequest): string {
  const { grant: g, envelope: e } = r;
  const image: Complete<ImagePointer> = { format: e.image.format, sha256: e.image.sha256, url: e.image.url };
  let env: Record<string, string> | undefined;
  if (e.env) {
    env = {};
    for (const k of Object.keys(e.env).sort()) env[k] = e.env[k]!;
  }
  const envelope: Complete<Envelope> = { attestation_nonce: e.attestation_nonce, command: e.command, env, image, ssh_public_key: e.ssh_public_key };
  const grant: Complete<ComputeGrant> = {
    cpu_millicores: g.cpu_millicores,
    ram_mib: g.ram_mib,
    region: g.region,
    request_id: g.request_id,
    tdx_required: g.tdx_required,
    valid_to: g.valid_to,
  };
  return JSON.stringify({ envelope, grant });
}

/**
 * The identity of a request's body: SHA-256 of its canonical JSON. A re-post with the same digest
 * is the same grant (200); the same request_id with another digest is a conflict (409).
 */
export function grantRequestDigest(r: GrantRequest): string {
  return hash("sha256", canonicalGrantRequest(r), "hex");
}
