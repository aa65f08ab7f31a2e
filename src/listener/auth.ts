import { hash, timingSafeEqual } from "node:crypto";

/**
 * Constant-time bearer check: both sides are compared as SHA-256 digests, so neither the token's
 * length nor its prefix leaks through timing. The token's digest is computed once.
 */
export function bearerChecker(token: string): (header: string | undefined) => boolean {
  const want = hash("sha256", token, "buffer");
  return (header) => {
    if (!header || !header.startsWith("Bearer ")) return false;
    return timingSafeEqual(hash("sha256", header.slice(7), "buffer"), want);
  };
}
