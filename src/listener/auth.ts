import { timingSafeEqual } from "node:crypto";

/**
 * Constant-time bearer check. The comparison takes the same time wherever the first difference
 * is; a token of another length is refused at once (its length is no secret worth a hash per
 * request: tokens are long random strings).
 */
export function bearerChecker(token: string): (header: string | undefined) => boolean {
  const want = Buffer.from(`Bearer ${token}`);
  return (header) => {
    if (header === undefined || header.length !== want.length) return false;
    const given = Buffer.from(header);
    return given.length === want.length && timingSafeEqual(given, want);
  };
}
