/**
 * What a TD quote (REPORTDATA) or, on Azure, a TPM quote (qualifying data) is bound to: the grant,
 * the requester's nonce and the SSH host key the market will connect to.
 *
 *   binding = SHA-512( "compute-bridge/attestation/v1\n"
 *                      "request_id=" <request_id> "\n"
 *                      "nonce=" <nonce, lowercase hex> "\n"
 *                      "host_key=" <"SHA256:" + 43 base64 characters, or "none"> "\n" )
 *
 * 64 bytes: exactly the size of TDX REPORTDATA. The first line separates this use of SHA-512 from
 * any other; none of the three values can contain "\n" or "=" (request ids are A-Z a-z 0-9 . _ -,
 * the nonce is hex, a fingerprint is base64 after "SHA256:"), so the encoding is unambiguous. The
 * guest's boot script computes the same bytes with printf | sha512sum (cloud-init.ts), a requester
 * with one shell line (docs/operations.md).
 */
import { createHash } from "node:crypto";
import { NonceHex, RequestId } from "../domain/grant.js";
import { HOST_KEY_FINGERPRINT } from "../domain/instance.js";

export const BINDING_SCHEME = "compute-bridge/attestation/v1";

export class BindingInputError extends Error {
  override name = "BindingInputError";
}

/** The exact bytes that are hashed (exported for documentation and tests). */
export function bindingPreimage(requestId: string, nonceHex: string, hostKey: string | null): string {
  if (!RequestId.safeParse(requestId).success) throw new BindingInputError("request_id must be 1-64 characters of A-Z a-z 0-9 . _ -");
  if (!NonceHex.safeParse(nonceHex).success) throw new BindingInputError("nonce must be 16 to 64 bytes as hex (32 to 128 hex digits)");
  if (hostKey !== null && !HOST_KEY_FINGERPRINT.test(hostKey)) throw new BindingInputError("host key must be an ssh-keygen SHA-256 fingerprint (SHA256: and 43 base64 characters)");
  return `${BINDING_SCHEME}\nrequest_id=${requestId}\nnonce=${nonceHex.toLowerCase()}\nhost_key=${hostKey ?? "none"}\n`;
}

/** The 64-byte binding (TDX REPORTDATA). */
export function bindingDigest(requestId: string, nonceHex: string, hostKey: string | null): Buffer {
  return createHash("sha512").update(bindingPreimage(requestId, nonceHex, hostKey), "utf8").digest();
}
