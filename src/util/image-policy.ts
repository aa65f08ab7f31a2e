import { realpathSync } from "node:fs";
import dns, { type LookupAddress } from "node:dns";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

/**
 * Which image URLs the bridge (and the hosts it controls) may fetch: the answer to "any local file
 * can be hashed" and "image URLs reach any internal address" (issue #16).
 *
 *  - file:// only for a path that lies under one of `fileRoots`, also after resolving symlinks.
 *    No roots (the default) = no file:// at all.
 *  - http(s):// only to public addresses: loopback, link-local (the cloud metadata service),
 *    private, shared (CGNAT), multicast, documentation and other special-purpose ranges are
 *    refused unless an `allowCidrs` entry covers the address. Checked on the literal address, or
 *    on every address a name resolves to, on every request (each redirect is a new request).
 *  - Nothing else.
 *
 * Messages say what is refused, never what was found there (no addresses a name resolved to, no
 * hint whether a file exists outside the roots).
 */
export interface ImagePolicyConfig {
  /** Absolute directories file:// images may come from. */
  fileRoots: readonly string[];
  /** Addresses or CIDR blocks in otherwise refused ranges that http(s) images may come from. */
  allowCidrs: readonly string[];
}

export class ImagePolicyError extends Error {
  override name = "ImagePolicyError";
}

/** IANA special-purpose (non-global) address blocks, plus multicast. */
const SPECIAL_V4 = [
  "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24",
  "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
];
const SPECIAL_V6 = [
  "::/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
];

/** "a.b.c.d", "a.b.c.d/n", an IPv6 address or "addr/n": [address, prefix, family] or null. */
export function parseCidr(s: string): [string, number, "ipv4" | "ipv6"] | null {
  const [addr = "", bits, extra] = s.split("/");
  if (extra !== undefined) return null;
  const v = net.isIP(addr);
  if (v === 0) return null;
  const max = v === 4 ? 32 : 128;
  const prefix = bits === undefined ? max : /^\d{1,3}$/.test(bits) ? Number(bits) : NaN;
  if (!(prefix >= 0 && prefix <= max)) return null;
  return [addr, prefix, v === 4 ? "ipv4" : "ipv6"];
}

function blockList(cidrs: readonly string[]): net.BlockList {
  const list = new net.BlockList();
  for (const c of cidrs) {
    const p = parseCidr(c);
    if (!p) throw new ImagePolicyError(`"${c}" is not an IP address or CIDR block`);
    list.addSubnet(p[0], p[1], p[2]);
  }
  return list;
}

/** An IPv4-mapped IPv6 address (::ffff:a.b.c.d, in either notation) as the IPv4 address it is. */
function unmap(ip: string): [string, "ipv4" | "ipv6"] {
  if (net.isIPv4(ip)) return [ip, "ipv4"];
  const m = /^::ffff:(?:(\d+\.\d+\.\d+\.\d+)|([0-9a-f]{1,4}):([0-9a-f]{1,4}))$/i.exec(ip);
  if (m) {
    if (m[1]) return [m[1], "ipv4"];
    const hi = parseInt(m[2]!, 16), lo = parseInt(m[3]!, 16);
    return [`${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`, "ipv4"];
  }
  return [ip.toLowerCase(), "ipv6"];
}

const SPECIAL = blockList([...SPECIAL_V4, ...SPECIAL_V6]);
const REFUSED_HOST = "its host is not a public address, or does not resolve (loopback, link-local, private and other special-purpose ranges are refused unless the operator allows them with image_allow_cidrs)";

export class ImagePolicy {
  private readonly roots: string[];
  private readonly allowed: net.BlockList;

  constructor(
    private readonly cfg: ImagePolicyConfig,
    /** Name resolution for the admission check (tests inject one). */
    private readonly resolve: (host: string) => Promise<LookupAddress[]> = (host) => dns.promises.lookup(host, { all: true, verbatim: true }),
  ) {
    for (const r of cfg.fileRoots) if (!path.isAbsolute(r)) throw new ImagePolicyError(`image root "${r}" must be an absolute path`);
    // Roots compared by their real path (a root given as /tmp may be a symlink on some systems).
    this.roots = cfg.fileRoots.map((r) => {
      try {
        return realpathSync(r);
      } catch {
        return path.resolve(r);
      }
    });
    this.allowed = blockList(cfg.allowCidrs);
  }

  /** May an http(s) fetch connect to `ip`? */
  addressAllowed(ip: string): boolean {
    const [a, family] = unmap(ip);
    if (net.isIP(a) === 0) return false;
    return !SPECIAL.check(a, family) || this.allowed.check(a, family);
  }

  /**
   * Why `url` may not be fetched, or null when it may (admission: before anything is stored).
   * A name that does not exist is refused; one the resolver cannot answer for right now is let
   * through: the fetch checks every address again.
   */
  async refusal(url: string): Promise<string | null> {
    let u: URL;
    try {
      u = new URL(url);
      if (u.protocol === "file:") {
        this.filePath(u);
        return null;
      }
      this.checkHttp(u);
    } catch (e) {
      if (e instanceof ImagePolicyError) return e.message;
      return "is not a valid URL";
    }
    const host = bareHost(u);
    if (net.isIP(host)) return null;
    let addrs: LookupAddress[];
    try {
      addrs = await this.resolve(host);
    } catch (e) {
      // A name that does not exist is refused like an internal one (no oracle for which internal
      // names exist); a resolver that fails for now leaves the check to the fetch.
      return (e as NodeJS.ErrnoException).code === "ENOTFOUND" ? `refused: ${REFUSED_HOST}` : null;
    }
    return addrs.every((a) => this.addressAllowed(a.address)) ? null : `refused: ${REFUSED_HOST}`;
  }

  /**
   * The real path of a file:// URL's file, if it lies under a root (throws ImagePolicyError
   * otherwise). A file that does not exist (yet) is checked by its path alone.
   */
  filePath(u: URL): string {
    if (this.roots.length === 0) throw new ImagePolicyError("refused: file:// images are not accepted here (no image_roots configured)");
    let p: string;
    try {
      p = fileURLToPath(u);
    } catch {
      throw new ImagePolicyError("refused: a file:// URL must name an absolute local path");
    }
    const outside = `refused: file:// images must lie under one of the configured image_roots`;
    if (!this.underRoot(path.resolve(p))) throw new ImagePolicyError(outside);
    let real: string;
    try {
      real = realpathSync(p);
    } catch {
      return path.resolve(p);
    }
    if (!this.underRoot(real)) throw new ImagePolicyError(outside);
    return real;
  }

  /** Scheme and, for a literal address, the address: throws ImagePolicyError. */
  checkHttp(u: URL): void {
    if (u.protocol !== "http:" && u.protocol !== "https:") throw new ImagePolicyError(`refused: only http, https${this.roots.length ? " and file" : ""} image URLs are accepted, not ${u.protocol.replace(/:$/, "")}`);
    if (u.username || u.password) throw new ImagePolicyError("refused: image URLs may not carry credentials");
    const host = bareHost(u);
    if (net.isIP(host) && !this.addressAllowed(host)) throw new ImagePolicyError(`refused: ${REFUSED_HOST}`);
  }

  /** A dns.lookup replacement for http(s).get that fails unless every address is allowed. */
  readonly lookup: net.LookupFunction = (hostname, options, callback) => {
    dns.lookup(hostname, { ...options, all: true }, (err, addresses) => {
      if (err) return callback(err, "", 0);
      const list = addresses as LookupAddress[];
      if (list.length === 0 || !list.every((a) => this.addressAllowed(a.address)))
        return callback(Object.assign(new ImagePolicyError(`refused: ${REFUSED_HOST}`), { code: "EIMAGEPOLICY" }), "", 0);
      if ((options as dns.LookupOptions).all) return (callback as unknown as (e: null, a: LookupAddress[]) => void)(null, list);
      callback(null, list[0]!.address, list[0]!.family);
    });
  };

  private underRoot(p: string): boolean {
    return this.roots.some((r) => p === r || p.startsWith(r.endsWith(path.sep) ? r : r + path.sep));
  }
}

/** The URL's host without IPv6 brackets. */
function bareHost(u: URL): string {
  return u.hostname.startsWith("[") ? u.hostname.slice(1, -1) : u.hostname;
}
