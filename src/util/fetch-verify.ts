import { createHash, randomUUID } from "node:crypto";
import { constants as fsc, createReadStream, createWriteStream, mkdirSync, renameSync, rmSync } from "node:fs";
import { open as openFile } from "node:fs/promises";
import http from "node:http";
import https from "node:https";
import path from "node:path";
import { Readable, Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import { abortError } from "./clock.js";
import { ImagePolicyError, type ImagePolicy } from "./image-policy.js";

/** The bytes' sha256 is not the one the grant named. The message never carries the actual digest. */
export class DigestMismatchError extends Error {
  override name = "DigestMismatchError";
  constructor(readonly expected: string) {
    super(`image sha256 mismatch: the image is not the one with sha256 ${expected}; nothing was run`);
  }
}

/** The image could not be fetched (network, timeout, size): worth another try while the grant is valid. */
export class FetchError extends Error {
  override name = "FetchError";
}

/** The image policy refused the URL or a redirect: retrying cannot help. */
export class ImageRefusedError extends Error {
  override name = "ImageRefusedError";
}

export interface FetchOptions {
  maxBytes: number;
  /** Cancel and shutdown: aborts the fetch at once (rejects with an AbortError). */
  signal: AbortSignal;
  /** Which files and addresses may be fetched; checked for every connection and redirect. */
  policy: ImagePolicy;
  /** Fails when connecting, or waiting for the next byte, takes longer than this. */
  idleTimeoutMs: number;
  /** Wall-clock ms by which the whole fetch must be done (the grant's valid_to). */
  deadlineMs?: number;
}

const MAX_REDIRECTS = 5;

/** A connection error as a message naming no address, port or host (they may be internal). */
function connectMessage(e: NodeJS.ErrnoException): string {
  switch (e.code) {
    case "ENOTFOUND":
    case "EAI_AGAIN":
    case "EAI_FAIL":
      return "image fetch failed: the image host's name did not resolve";
    case "ECONNREFUSED":
    case "EHOSTUNREACH":
    case "ENETUNREACH":
    case "ETIMEDOUT":
      return "image fetch failed: could not connect to the image host";
    default:
      if (e.code?.startsWith("ERR_TLS") || /certificate|ssl|tls/i.test(e.message)) return "image fetch failed: the TLS handshake with the image host failed";
      return "image fetch failed: the connection to the image host broke off";
  }
}

async function openLocal(u: URL, o: FetchOptions): Promise<Readable> {
  const file = o.policy.filePath(u);
  // O_NONBLOCK: a FIFO (or a device) opens at once instead of blocking a libuv thread for good;
  // then only a regular file is read. O_NOFOLLOW: the path was resolved by the policy check.
  let fh;
  try {
    fh = await openFile(file, fsc.O_RDONLY | fsc.O_NONBLOCK | fsc.O_NOFOLLOW);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new FetchError(code === "ENOENT" ? "image fetch failed: no such file" : `image fetch failed: cannot open the file (${code ?? "error"})`);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw new FetchError("image fetch failed: not a regular file");
    if (st.size > o.maxBytes) throw new FetchError(`image is larger than the limit of ${o.maxBytes} bytes`);
  } catch (e) {
    await fh.close();
    throw e;
  }
  return fh.createReadStream();
}

function openHttp(url: URL, o: FetchOptions, signal: AbortSignal, progress: () => void, redirects = 0): Promise<Readable> {
  try {
    o.policy.checkHttp(url);
  } catch (e) {
    return Promise.reject(e instanceof ImagePolicyError ? new ImageRefusedError(`image fetch ${e.message}`) : e);
  }
  const mod = url.protocol === "https:" ? https : http;
  return new Promise((resolve, reject) => {
    const req = mod.get(url, { signal, agent: false, lookup: o.policy.lookup, headers: { "user-agent": "compute-bridge" } }, (res) => {
      progress();
      const status = res.statusCode ?? 0;
      if (status >= 300 && status < 400 && res.headers.location) {
        res.resume();
        if (redirects >= MAX_REDIRECTS) return reject(new FetchError(`image fetch failed: more than ${MAX_REDIRECTS} redirects`));
        let next: URL;
        try {
          next = new URL(res.headers.location, url);
        } catch {
          return reject(new FetchError("image fetch failed: a redirect to an invalid URL"));
        }
        if (next.protocol !== "http:" && next.protocol !== "https:") return reject(new ImageRefusedError(`image fetch refused: a redirect to a ${next.protocol.replace(/:$/, "")} URL`));
        return openHttp(next, o, signal, progress, redirects + 1).then(resolve, reject);
      }
      if (status !== 200) {
        res.resume();
        return reject(new FetchError(`image fetch failed: HTTP ${status}`));
      }
      const length = Number(res.headers["content-length"]);
      if (Number.isFinite(length) && length > o.maxBytes) {
        res.destroy();
        return reject(new FetchError(`image is larger than the limit of ${o.maxBytes} bytes`));
      }
      resolve(res);
    });
    req.on("error", (e: NodeJS.ErrnoException) => {
      if (signal.aborted) return reject(e);
      if ((e as { code?: string }).code === "EIMAGEPOLICY" || e instanceof ImagePolicyError) return reject(new ImageRefusedError(`image fetch ${e.message}`));
      reject(new FetchError(connectMessage(e)));
    });
  });
}

/**
 * Download `url` into `dest` only if its sha256 equals `sha256`: the bytes are hashed while they
 * stream to a temp file, which is renamed into place after the digest matches (so `dest` either
 * holds verified bytes or does not exist). The temp file is removed on every failure.
 *
 * Bounded: no byte for `idleTimeoutMs` (connect included) fails it, `deadlineMs` ends it, more than
 * `maxBytes` stops it while streaming, and `signal` aborts it at once. Only what `policy` admits is
 * read: file:// under its roots (regular files only), http(s) to allowed addresses, per redirect.
 */
export async function fetchVerified(url: string, sha256: string, dest: string, o: FetchOptions): Promise<void> {
  if (o.signal.aborted) throw abortError(o.signal);
  mkdirSync(path.dirname(dest), { recursive: true, mode: 0o700 });
  const tmp = `${dest}.${randomUUID()}.part`;
  const hash = createHash("sha256");
  let bytes = 0;

  // Our own reasons to stop (idle, deadline) abort `limit`; the caller's signal aborts as itself.
  const limit = new AbortController();
  const stop = (why: string) => limit.abort(new FetchError(why));
  let idle: NodeJS.Timeout | undefined;
  const progress = () => {
    clearTimeout(idle);
    idle = setTimeout(() => stop(`image fetch failed: nothing arrived for ${Math.round(o.idleTimeoutMs / 1000)} s`), o.idleTimeoutMs);
  };
  const deadline = o.deadlineMs === undefined ? undefined : setTimeout(() => stop("image fetch failed: the image did not arrive before the grant's valid_to"), Math.max(0, o.deadlineMs - Date.now()));
  const signal = AbortSignal.any([o.signal, limit.signal]);
  const meter = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      progress();
      bytes += chunk.length;
      if (bytes > o.maxBytes) return cb(new FetchError(`image is larger than the limit of ${o.maxBytes} bytes`));
      hash.update(chunk);
      cb(null, chunk);
    },
  });
  try {
    progress();
    let u: URL;
    try {
      u = new URL(url);
    } catch {
      throw new ImageRefusedError("image fetch refused: not a valid URL");
    }
    const src = u.protocol === "file:" ? await openLocal(u, o) : await openHttp(u, o, signal, progress);
    await pipeline(src, meter, createWriteStream(tmp, { mode: 0o600 }), { signal });
    if (hash.digest("hex") !== sha256) throw new DigestMismatchError(sha256);
    renameSync(tmp, dest);
  } catch (e) {
    rmSync(tmp, { force: true });
    if (o.signal.aborted) throw abortError(o.signal);
    if (limit.signal.aborted) throw limit.signal.reason;
    if (e instanceof ImagePolicyError) throw new ImageRefusedError(`image fetch ${e.message}`);
    throw e;
  } finally {
    clearTimeout(idle);
    clearTimeout(deadline);
  }
}

/** Hash a file already on disk. */
export async function sha256File(file: string): Promise<string> {
  const hash = createHash("sha256");
  await pipeline(createReadStream(file), hash);
  return hash.digest("hex");
}
