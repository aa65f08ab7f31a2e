import { timingSafeEqual } from "node:crypto";

/**
 * Constant-time bearer check. The comparison takes the same time wherever the first difference
 * is; a header of another length is refused at once (a token's length is no secret worth a hash
 * per request: tokens are long random strings). Node hands header values over as latin1, one
 * character per byte on the wire, so they are compared as those bytes against the token's UTF-8.
 */
export function bearerChecker(token: string): (header: string | undefined) => boolean {
  const want = Buffer.from(`Bearer ${token}`, "utf8");
  return (header) => {
    if (header === undefined || header.length !== want.length) return false;
    return timingSafeEqual(Buffer.from(header, "latin1"), want);
  };
}
