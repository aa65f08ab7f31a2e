import assert from "node:assert/strict";
import net from "node:net";
import { describe, it } from "node:test";
import { probeSsh, SshNotReadyError, waitForSsh } from "../../../src/backends/common/ssh-ready.js";
import { systemClock, type Clock } from "../../../src/util/clock.js";

const BANNER = "SSH-2.0-OpenSSH_9.2p1 Debian-2";

/** A loopback TCP server; `onConn` decides what each connection gets. */
async function server(t: { after: (fn: () => Promise<void> | void) => void }, onConn: (s: net.Socket) => void, port = 0): Promise<{ port: number; conns: () => number; srv: net.Server }> {
  let n = 0;
  const sockets = new Set<net.Socket>();
  const srv = net.createServer((s) => {
    n++;
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
    s.on("error", () => undefined);
    onConn(s);
  });
  await new Promise<void>((r) => srv.listen(port, "127.0.0.1", r));
  t.after(
    () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        srv.close(() => r());
      }),
  );
  return { port: (srv.address() as net.AddressInfo).port, conns: () => n, srv };
}

/** A port nothing listens on (bound, then released). */
async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

describe("waitForSsh", () => {
  it("reads a banner that arrives late (after the TCP accept)", async (t) => {
    const s = await server(t, (sock) => setTimeout(() => sock.write(`${BANNER}\r\n`), 80));
    const r = await waitForSsh("127.0.0.1", s.port, { timeoutMs: 5000, intervalMs: 10 });
    assert.equal(r.banner, BANNER);
    assert.equal(r.attempts, 1);
  });

  it("accepts pre-banner lines (RFC 4253 4.2) and a banner split across packets", async (t) => {
    const s = await server(t, (sock) => {
      sock.write("Welcome to the box\r\nanother line\r\nSSH-2.0-Open");
      setTimeout(() => sock.write("SSH_9.2p1\r\n"), 20);
    });
    assert.equal((await waitForSsh("127.0.0.1", s.port, { timeoutMs: 5000, intervalMs: 10 })).banner, "SSH-2.0-OpenSSH_9.2p1");
  });

  it("retries while nothing listens, then succeeds once sshd starts", async (t) => {
    const port = await freePort();
    let sleeps = 0;
    let started: Promise<unknown> | null = null;
    // The server comes up after the third failed attempt: driven by the probe's own sleeps, no timing guesses.
    const clock: Clock = {
      now: () => systemClock.now(),
      sleep: async (ms, signal) => {
        if (++sleeps === 3) started = server(t, (sock) => sock.write(`${BANNER}\r\n`), port);
        if (started) await started;
        return systemClock.sleep(Math.min(ms, 5), signal);
      },
    };
    const r = await waitForSsh("127.0.0.1", port, { timeoutMs: 10_000, intervalMs: 5, clock });
    assert.equal(r.banner, BANNER);
    assert.equal(r.attempts, 4);
  });

  it("a silent server times out with a clear error naming host, port and the last failure", async (t) => {
    const s = await server(t, () => undefined);
    await assert.rejects(waitForSsh("127.0.0.1", s.port, { timeoutMs: 300, intervalMs: 20, attemptTimeoutMs: 100 }), (e: unknown) => {
      assert.ok(e instanceof SshNotReadyError);
      assert.match(e.message, new RegExp(`127\\.0\\.0\\.1:${s.port}`));
      assert.match(e.message, /timed out/);
      assert.ok(e.attempts >= 2);
      return true;
    });
  });

  it("refuses a non-SSH-2 banner and a server that hangs up", async (t) => {
    const old = await server(t, (sock) => sock.end("SSH-1.5-ancient\r\n"));
    await assert.rejects(probeSsh("127.0.0.1", old.port, { timeoutMs: 2000 }), /unsupported SSH protocol version/);
    const rude = await server(t, (sock) => sock.destroy());
    await assert.rejects(probeSsh("127.0.0.1", rude.port, { timeoutMs: 2000 }), /closed before the SSH banner|ECONNRESET/);
    const refused = await freePort();
    await assert.rejects(probeSsh("127.0.0.1", refused, { timeoutMs: 2000 }), /ECONNREFUSED/);
  });

  it("aborts promptly on the signal", async (t) => {
    const s = await server(t, () => undefined);
    const ctl = new AbortController();
    const p = waitForSsh("127.0.0.1", s.port, { timeoutMs: 60_000, intervalMs: 10, signal: ctl.signal });
    setImmediate(() => ctl.abort());
    await assert.rejects(p, (e: unknown) => e instanceof Error && e.name === "AbortError");
  });
});
