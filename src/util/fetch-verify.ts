import { createHash, randomUUID } from "node:crypto";
import { createReadStream, createWriteStream, mkdirSync, renameSync, rmSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import path from "node:path";
import { Readable, Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import { fileURLToPath } from "node:url";

export class DigestMismatchError extends Error {
  override name = "DigestMismatchError";
  constructor(
    readonly expected: string,
    readonly actual: string,
  ) {
    super(`image sha256 mismatch: expected ${expected}, got ${actual}`);
  }
}

export class FetchError extends Error {
  override name = "FetchError";
}

const MAX_REDIRECTS = 5;

function open(url: URL, signal: AbortSignal, redirects = 0): Promise<Readable> {
  if (url.protocol === "file:") return Promise.resolve(createReadStream(fileURLToPath(url)));
  const mod = url.protocol === "https:" ? https : url.protocol === "http:" ? http : null;
  if (!mod) return Promise.reject(new FetchError(`unsupported URL scheme ${url.protocol}`));
  return new Promise((resolve, reject) => {
    const req = mod.get(url, { signal, headers: { "user-agent": "compute-bridge" } }, (res) => {
      const status = res.statusCode ?? 0;
      if (status >= 300 && status < 400 && res.headers.location) {
        res.resume();
        if (redirects >= MAX_REDIRECTS) return reject(new FetchError(`too many redirects fetching the image`));
        const next = new URL(res.headers.location, url);
        if (next.protocol !== "http:" && next.protocol !== "https:") return reject(new FetchError(`refusing redirect to ${next.protocol}`));
        return open(next, signal, redirects + 1).then(resolve, reject);
      }
      if (status !== 200) {
        res.resume();
        return reject(new FetchError(`image fetch failed: HTTP ${status}`));
      }
      resolve(res);
    });
    req.on("error", (e) => reject(signal.aborted ? e : new FetchError(`image fetch failed: ${e.message}`)));
  });
}

/**
 * Download `url` into `dest` only if its sha256 equals `sha256`: the bytes are hashed while they
 * stream to a temp file, which is renamed into place after the digest matches (so `dest` either
 * holds verified bytes or does not exist). On a mismatch the temp file is removed.
 */
export async function fetchVerified(
  url: string,
  sha256: string,
  dest: string,
  opts: { maxBytes: number; signal: AbortSignal },
): Promise<void> {
  mkdirSync(path.dirname(dest), { recursive: true, mode: 0o700 });
  const tmp = `${dest}.${randomUUID()}.part`;
  const hash = createHash("sha256");
  let bytes = 0;
  const meter = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      bytes += chunk.length;
      if (bytes > opts.maxBytes) return cb(new FetchError(`image is larger than the limit of ${opts.maxBytes} bytes`));
      hash.update(chunk);
      cb(null, chunk);
    },
  });
  try {
    const src = await open(new URL(url), opts.signal);
    await pipeline(src, meter, createWriteStream(tmp, { mode: 0o600 }), { signal: opts.signal });
    const actual = hash.digest("hex");
    if (actual !== sha256) throw new DigestMismatchError(sha256, actual);
    renameSync(tmp, dest);
  } catch (e) {
    rmSync(tmp, { force: true });
    if ((e as NodeJS.ErrnoException).code === "ENOENT" && url.startsWith("file:")) throw new FetchError(`image fetch failed: no such file`);
    throw e;
  }
}

/** Hash a file already on disk. */
export async function sha256File(file: string): Promise<string> {
  const hash = createHash("sha256");
  await pipeline(createReadStream(file), hash);
  return hash.digest("hex");
}

