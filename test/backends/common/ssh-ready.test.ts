import assert from "node:assert/strict";
import net from "node:net";
import { describe, it } from "node:test";
import { CredentialError } from "../../../src/backends/backend.js";
import { hostKeyMarker } from "../../../src/backends/common/cloud-init.js";
import { ConsoleUnavailableError, probeSsh, SshNotReadyError, waitForHostKey, waitForSsh } from "../../../src/backends/common/ssh-ready.js";
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

/** A clock whose sleeps pass at once, moving its time on: waits cost no real time. */
function steppingClock(): Clock & { slept: number[] } {
  let t = 0;
  const slept: number[] = [];
  return {
    slept,
    now: () => t,
    sleep: async (ms) => {
      slept.push(ms);
      t += ms;
    },
  };
}

const FP = "SHA256:" + "x".repeat(43);

describe("waitForHostKey", () => {
  it("reads the console until the guest's report appears, then returns its fingerprint", async () => {
    const clock = steppingClock();
    const consoles = ["[ 1.0] booting", "[ 2.0] cloud-init: compute-bridge: boot script for r-1 started", `[ 2.1] ${hostKeyMarker("r-1", FP)}\nlater`];
    let reads = 0;
    const r = await waitForHostKey(async () => consoles[Math.min(reads++, consoles.length - 1)]!, "r-1", { timeoutMs: 60_000, intervalMs: 2000, clock });
    assert.deepEqual(r, { fingerprint: FP, missing: null });
    assert.equal(reads, 3);
    assert.deepEqual(clock.slept, [2000, 2000]);
  });

  it("a guest without an ed25519 key: null at once, with the reason", async () => {
    const clock = steppingClock();
    const r = await waitForHostKey(async () => hostKeyMarker("r-1", null), "r-1", { timeoutMs: 60_000, intervalMs: 2000, clock });
    assert.deepEqual(r, { fingerprint: null, missing: "the guest reported no ed25519 SSH host key" });
    assert.deepEqual(clock.slept, []);
  });

  it("gives up at the timeout with null (another grant's report does not count); timeout 0 reads once", async () => {
    const clock = steppingClock();
    let reads = 0;
    const r = await waitForHostKey(
      async () => {
        reads++;
        return hostKeyMarker("r-2", FP);
      },
      "r-1",
      { timeoutMs: 10_000, intervalMs: 3000, clock },
    );
    assert.equal(r.fingerprint, null);
    assert.match(r.missing!, /no SSH host key on its serial console within 10 s/);
    assert.equal(reads, 5); // at 0, 3, 6, 9 and 10 s
    assert.deepEqual(clock.slept, [3000, 3000, 3000, 1000]);
    reads = 0;
    const once = await waitForHostKey(async () => (reads++, ""), "r-1", { timeoutMs: 0, intervalMs: 3000, clock });
    assert.equal(once.fingerprint, null);
    assert.equal(reads, 1);
  });

  it("console read errors are retried; if they last, null names the last one", async () => {
    const clock = steppingClock();
    let reads = 0;
    const r = await waitForHostKey(
      async () => {
        if (reads++ < 2) throw new Error("ThrottlingException: Rate exceeded");
        return hostKeyMarker("r-1", FP);
      },
      "r-1",
      { timeoutMs: 60_000, intervalMs: 1000, clock },
    );
    assert.equal(r.fingerprint, FP);
    const failing = await waitForHostKey(
      async () => {
        throw new Error("UnsupportedOperation: latest console output is not supported");
      },
      "r-1",
      { timeoutMs: 5000, intervalMs: 1000, clock },
    );
    assert.deepEqual(failing, { fingerprint: null, missing: "the serial console could not be read: UnsupportedOperation: latest console output is not supported" });
    // A console that will never show it: no waiting.
    reads = 0;
    const slept = clock.slept.length;
    const unavailable = await waitForHostKey(
      async () => {
        reads++;
        throw new ConsoleUnavailableError("this instance type has no live console output");
      },
      "r-1",
      { timeoutMs: 60_000, intervalMs: 1000, clock },
    );
    assert.deepEqual(unavailable, { fingerprint: null, missing: "the serial console cannot be read: this instance type has no live console output" });
    assert.equal(reads, 1);
    // Nor does a refusal of the bridge's permissions.
    const refused = await waitForHostKey(
      async () => {
        reads++;
        throw new CredentialError("GetConsoleOutput was refused (UnauthorizedOperation)", "aws");
      },
      "r-1",
      { timeoutMs: 60_000, intervalMs: 1000, clock },
    );
    assert.deepEqual(refused, { fingerprint: null, missing: "the serial console cannot be read: GetConsoleOutput was refused (UnauthorizedOperation)" });
    assert.equal(reads, 2);
    assert.equal(clock.slept.length, slept);
  });

  it("aborts on the signal, also while a read is in flight", async () => {
    const ctl = new AbortController();
    const p = waitForHostKey(
      () =>
        new Promise<string>((_, reject) => {
          ctl.signal.addEventListener("abort", () => reject(new Error("request aborted")), { once: true });
        }),
      "r-1",
      { timeoutMs: 60_000, intervalMs: 1000, clock: steppingClock(), signal: ctl.signal },
    );
    ctl.abort();
    await assert.rejects(p, (e: unknown) => e instanceof Error && e.name === "AbortError");
  });
});
