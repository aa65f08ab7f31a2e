import { createHash, timingSafeEqual } from "node:crypto";

/** Constant-time bearer check: both sides are hashed first so lengths never leak. */
export function bearerMatches(header: string | undefined, token: string): boolean {
  if (!header || !header.startsWith("Bearer ")) return false;
  const given = createHash("sha256").update(header.slice(7)).digest();
  const want = createHash("sha256").update(token).digest();
  return timingSafeEqual(given, want);
}
