/**
 * A minimal DER reader: enough to walk an X.509 certificate's extensions and a CRL's revoked
 * serial numbers, which node:crypto does not expose. Definite lengths only (DER has no other).
 */
export interface Tlv {
  tag: number;
  /** The whole element (tag, length and content). */
  raw: Buffer;
  content: Buffer;
}

export class DerError extends Error {
  override name = "DerError";
}

/** The element at `offset` of `buf`. */
export function readTlv(buf: Buffer, offset = 0): Tlv {
  if (offset + 2 > buf.length) throw new DerError("DER truncated");
  const tag = buf[offset]!;
  let len = buf[offset + 1]!;
  let head = 2;
  if (len & 0x80) {
    const n = len & 0x7f;
    if (n === 0 || n > 4 || offset + 2 + n > buf.length) throw new DerError("unsupported DER length");
    len = 0;
    for (let i = 0; i < n; i++) len = len * 256 + buf[offset + 2 + i]!;
    head += n;
  }
  if (offset + head + len > buf.length) throw new DerError("DER element runs past its container");
  return { tag, raw: buf.subarray(offset, offset + head + len), content: buf.subarray(offset + head, offset + head + len) };
}

/** The elements inside a constructed element's content. */
export function children(content: Buffer): Tlv[] {
  const out: Tlv[] = [];
  for (let pos = 0; pos < content.length; ) {
    const t = readTlv(content, pos);
    out.push(t);
    pos += t.raw.length;
  }
  return out;
}

/** A DER OBJECT IDENTIFIER's content as dotted text. */
export function oidText(content: Buffer): string {
  const parts: number[] = [Math.floor(content[0]! / 40), content[0]! % 40];
  let v = 0;
  for (const b of content.subarray(1)) {
    v = v * 128 + (b & 0x7f);
    if (!(b & 0x80)) {
      parts.push(v);
      v = 0;
    }
  }
  return parts.join(".");
}

/** A non-negative INTEGER's content as a number (small values: SVNs). */
export function intValue(content: Buffer): number {
  let v = 0;
  for (const b of content) v = v * 256 + b;
  return v;
}

/** An INTEGER's content as lowercase hex without leading zero bytes (certificate serials). */
export function serialHex(content: Buffer): string {
  let i = 0;
  while (i < content.length - 1 && content[i] === 0) i++;
  return content.subarray(i).toString("hex");
}
