import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, truncateSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { describe, it } from "node:test";
import { ImageVerificationError, InvalidRequestError, TransientError } from "../../src/backends/backend.js";
import { ImagePolicy } from "../../src/util/image-policy.js";
import { scriptImage } from "../helpers/images.js";
import { until } from "../helpers/http.js";
import { localBackend, localGrant } from "../helpers/local.js";
import { loopbackServer } from "../helpers/http-server.js";
import { tempDir } from "../helpers/tmp.js";

const never = new AbortController().signal;
const SHA = "ab".repeat(32);

const server = loopbackServer;

/** A backend whose policy lets images come from 127.0.0.1 (the test servers) and `roots`. */
function backend(dir: string, over: Parameters<typeof localBackend>[1] = {}, roots = [os.tmpdir()]) {
  return localBackend(path.join(dir, "state"), over, { imagePolicy: new ImagePolicy({ fileRoots: roots, allowCidrs: ["127.0.0.1/32"] }) });
}

function partFiles(dir: string): string[] {
  const images = path.join(dir, "state", "local", "images");
  return existsSync(images) ? readdirSync(images).filter((f) => f.endsWith(".part")) : [];
}

function bundle(url: string, sha256 = SHA) {
  return { image: { url, sha256, format: "bundle" as const } };
}

describe("local backend: image fetch limits", { timeout: 30_000 }, () => {
  it("a FIFO via file:// fails at once (not a regular file) instead of blocking", async (t) => {
    const dir = tempDir(t);
    const fifo = path.join(dir, "fifo");
    execFileSync("mkfifo", [fifo]);
    const b = backend(dir);
    const started = Date.now();
    await assert.rejects(b.provision(localGrant("fifo-1"), bundle(pathToFileURL(fifo).href), never), (e: unknown) => e instanceof TransientError && /not a regular file/.test((e as Error).message));
    assert.ok(Date.now() - started < 5000, "did not wait on the FIFO");
    assert.deepEqual(partFiles(dir), []);
    assert.equal(b.status()["active"], 0, "the slot is free again");
  });

  it("file:///dev/urandom is never streamed: refused outside the roots, and not a regular file even under one", async (t) => {
    const dir = tempDir(t);
    await assert.rejects(backend(dir).provision(localGrant("rand-0"), bundle("file:///dev/urandom"), never), (e: unknown) => e instanceof InvalidRequestError && /image_roots/.test((e as Error).message));
    const b = backend(dir, { max_image_bytes: 1024 * 1024 }, ["/dev"]);
    await assert.rejects(b.provision(localGrant("rand-1"), bundle("file:///dev/urandom"), never), /not a regular file/);
    assert.deepEqual(partFiles(dir), []);
  });

  it("a file larger than max_image_bytes is refused before reading", async (t) => {
    const dir = tempDir(t);
    const big = path.join(dir, "big");
    writeFileSync(big, "");
    truncateSync(big, 4 * 1024 * 1024);
    const b = backend(dir, { max_image_bytes: 1024 * 1024 });
    await assert.rejects(b.provision(localGrant("big-1"), bundle(pathToFileURL(big).href), never), /larger than the limit of 1048576 bytes/);
    assert.deepEqual(partFiles(dir), []);
  });

  it("an endless HTTP body stops at max_image_bytes while streaming and leaves no partial file", async (t) => {
    const dir = tempDir(t);
    let sent = 0;
    let closed = false;
    const { url } = await server(t, (_req, res) => {
      res.writeHead(200, { "content-type": "application/octet-stream" }); // chunked: no length announced
      const chunk = Buffer.alloc(64 * 1024, 7);
      const pump = () => {
        while (!res.destroyed) {
          sent += chunk.length;
          if (!res.write(chunk)) break;
        }
        if (!res.destroyed) res.once("drain", pump);
      };
      res.on("close", () => (closed = true));
      pump();
    });
    const b = backend(dir, { max_image_bytes: 2 * 1024 * 1024 });
    await assert.rejects(b.provision(localGrant("endless-1"), bundle(`${url}/img`), never), (e: unknown) => e instanceof TransientError && /larger than the limit of 2097152 bytes/.test((e as Error).message));
    await until(() => closed, "the server to see the connection closed", 5000);
    assert.ok(sent < 64 * 1024 * 1024, `the bridge stopped reading early (server wrote ${sent} bytes)`);
    assert.deepEqual(partFiles(dir), []);
  });

  it("an HTTP server that accepts and never answers: the fetch ends at the grant's valid_to", async (t) => {
    const dir = tempDir(t);
    const { url, sockets } = await server(t, () => {
      /* never answers */
    });
    const b = backend(dir, { image_idle_timeout_seconds: 600 });
    const g = localGrant("silent-1", 1500);
    const p = b.provision(g, bundle(`${url}/img`), never);
    await until(() => sockets.size > 0, "the fetch to connect", 5000);
    await assert.rejects(p, (e: unknown) => e instanceof TransientError && /did not arrive before the grant's valid_to/.test((e as Error).message));
    assert.ok(Date.now() < g.valid_to + 2000, "ended at valid_to, not later");
    assert.deepEqual(partFiles(dir), []);
    await until(() => sockets.size === 0, "the connection to be closed", 5000);
  });

  it("an HTTP server that stops sending mid-body: the idle timeout ends the fetch", async (t) => {
    const dir = tempDir(t);
    const { url } = await server(t, (_req, res) => {
      res.writeHead(200, { "content-length": "1000" });
      res.write("partial");
    });
    const b = backend(dir, { image_idle_timeout_seconds: 0.3 });
    await assert.rejects(b.provision(localGrant("stall-1"), bundle(`${url}/img`), never), /nothing arrived for/);
    assert.deepEqual(partFiles(dir), []);
  });

  it("cancel aborts a blocked fetch at once and closes its connection", async (t) => {
    const dir = tempDir(t);
    const { url, sockets } = await server(t, () => {
      /* never answers */
    });
    const b = backend(dir, { image_idle_timeout_seconds: 600 });
    const cancel = new AbortController();
    const p = b.provision(localGrant("cancel-1", 600_000), bundle(`${url}/img`), cancel.signal);
    await until(() => sockets.size > 0, "the fetch to connect", 5000);
    const at = Date.now();
    cancel.abort(Object.assign(new Error("cancelled"), { name: "AbortError" }));
    await assert.rejects(p, (e: unknown) => (e as Error).name === "AbortError");
    assert.ok(Date.now() - at < 1000, "aborted at once");
    await until(() => sockets.size === 0, "the connection to be closed", 5000);
    assert.equal(b.status()["active"], 0);
  });

  it("http(s) to addresses the policy refuses is refused before connecting, also when a redirect leads there", async (t) => {
    const dir = tempDir(t);
    let hits = 0;
    const { url } = await server(t, (req, res) => {
      hits++;
      res.writeHead(302, { location: req.url === "/meta" ? "http://169.254.169.254/latest/meta-data/" : `http://127.0.0.2:${new URL(url).port}/x` });
      res.end();
    });
    const b = backend(dir);
    for (const p of ["/meta", "/other"])
      await assert.rejects(b.provision(localGrant(`redir${p.replace("/", "-")}`), bundle(`${url}${p}`), never), (e: unknown) => {
        assert.ok(e instanceof InvalidRequestError, String(e));
        assert.match(e.message, /not a public address/);
        assert.doesNotMatch(e.message, /169\.254|127\.0\.0\.2/, "names no internal address");
        return true;
      });
    assert.equal(hits, 2);
    // A name is checked on what it resolves to: localhost is loopback, refused by the default policy.
    const strict = localBackend(path.join(dir, "state2"));
    await assert.rejects(strict.provision(localGrant("name-1"), bundle(`http://localhost:${new URL(url).port}/x`), never), (e: unknown) => e instanceof InvalidRequestError && /not a public address/.test((e as Error).message));
    await assert.rejects(strict.provision(localGrant("loop-1"), bundle(`${url}/x`), never), (e: unknown) => e instanceof InvalidRequestError && /not a public address/.test((e as Error).message));
    assert.equal(hits, 2, "the default policy never connected to loopback");
  });

  it("connection errors name no host or port", async (t) => {
    const dir = tempDir(t);
    const b = backend(dir);
    // Port 1 on loopback: nobody listens (connection refused).
    await assert.rejects(b.provision(localGrant("refused-1"), bundle("http://127.0.0.1:1/x"), never), (e: unknown) => {
      assert.ok(e instanceof TransientError);
      assert.equal(e.message, "image fetch failed: could not connect to the image host");
      return true;
    });
  });

  it("a digest mismatch on a local file never reveals the file's sha256", async (t) => {
    const dir = tempDir(t);
    const img = scriptImage(dir, "secretish", "echo s3cret");
    const b = backend(dir);
    await assert.rejects(b.provision(localGrant("mm-1"), bundle(img.url, SHA), never), (e: unknown) => {
      assert.ok(e instanceof ImageVerificationError);
      assert.doesNotMatch(e.message, new RegExp(img.sha256));
      return true;
    });
  });

  it("file:// outside image_roots is refused with a message naming no hash or file detail", async (t) => {
    const dir = tempDir(t);
    const b = localBackend(path.join(dir, "state"), { image_roots: [path.join(dir, "images")] });
    mkdirSync(path.join(dir, "images"));
    for (const u of ["file:///etc/shadow", "file:///proc/self/environ", pathToFileURL(path.join(dir, "token")).href])
      await assert.rejects(b.provision(localGrant(`out-${u.length}`), bundle(u), never), (e: unknown) => e instanceof InvalidRequestError && /image_roots/.test((e as Error).message));
    assert.deepEqual(partFiles(dir), []);
  });

  it("partial files a crash left behind are removed at first use", async (t) => {
    const dir = tempDir(t);
    const images = path.join(dir, "state", "local", "images");
    mkdirSync(images, { recursive: true });
    writeFileSync(path.join(images, `${SHA}.0000.part`), "junk");
    const img = scriptImage(dir, "ok", "exit 0");
    const b = backend(dir);
    const inst = await b.provision(localGrant("clean-1"), { image: { ...img, format: "bundle" } }, never);
    assert.deepEqual(partFiles(dir), []);
    await b.terminate(inst);
  });
});
