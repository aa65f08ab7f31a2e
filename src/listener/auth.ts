import { timingSafeEqual } from "node:crypto";

/**
 * Constant-time bearer check. The scheme is case-insensitive and may be followed by more than one
 * space (RFC 9110 §11.1, §11.4: `credentials = auth-scheme [ 1*SP token68 ]`); the token itself is
 * compared in constant time wherever the first difference is. A token of another length is refused
 * at once (a token's length is no secret worth a hash per request: tokens are long random strings).
 * Node hands header values over as latin1, one character per byte on the wire, so they are compared
 * as those bytes against the token's UTF-8.
 */
export function bearerChecker(token: string): (header: string | undefined) => boolean {
  const want = Buffer.from(token, "utf8");
  return (header) => {
    if (header === undefined || header.length < 7 + want.length) return false;
    // "Bearer" in any case, then one or more spaces.
    if ((header.charCodeAt(0) | 0x20) !== 0x62 || header.slice(1, 6).toLowerCase() !== "earer" || header.charCodeAt(6) !== 0x20) return false;
    let i = 7;
    while (header.charCodeAt(i) === 0x20) i++;
    if (header.length - i !== want.length) return false;
    return timingSafeEqual(Buffer.from(header.slice(i), "latin1"), want);
  };
}
