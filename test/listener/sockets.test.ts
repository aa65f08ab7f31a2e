import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { spawnDaemon } from "../helpers/child-daemon.js";
import { TEST_TOKEN, writeLocalConfig } from "../helpers/config.js";
import { LogSink, startTestDaemon } from "../helpers/daemon.js";
import { startDaemon } from "../../src/daemon.js";
import { call, until } from "../helpers/http.js";
import { tempDir } from "../helpers/tmp.js";

const RUNNER = fileURLToPath(new URL("../helpers/run-daemon.ts", import.meta.url));

/** A raw connection to the listener; resolves `closed` with what the server sent before closing. */
function rawSocket(url: string) {
  const { port } = new URL(url);
  const s = net.connect(Number(port), "127.0.0.1");
  let got = "";
  s.on("data", (d: Buffer) => (got += d.toString()));
  s.on("error", () => undefined);
  const closed = new Promise<string>((r) => s.once("close", () => r(got)));
  return { s, closed };
}

describe("listener sockets", () => {
  it("slowloris: connections that trickle headers are closed after headers_timeout_seconds; the listener keeps serving", async (t) => {
    const { url } = await startTestDaemon(t, { listenerExtra: "headers_timeout_seconds = 1\nrequest_timeout_seconds = 2" });
    const N = 40;
    const conns = Array.from({ length: N }, () => rawSocket(url));
    t.after(() => conns.forEach((c) => c.s.destroy()));
    for (const c of conns) c.s.write("GET /v1/grants HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    // Each keeps sending a header line now and then, never the blank line that ends them.
    let n = 0;
    const trickle = setInterval(() => conns.forEach((c) => !c.s.destroyed && c.s.write(`X-Slow-${n++}: a\r\n`)), 200);
    t.after(() => clearInterval(trickle));
    const started = Date.now();
    const answers = await Promise.race([Promise.all(conns.map((c) => c.closed)), new Promise<null>((r) => setTimeout(() => r(null), 20_000).unref())]);
    clearInterval(trickle);
    assert.ok(answers, `all ${N} slow connections are closed by the server (the headers timeout is 1 s; waited 20 s)`);
    assert.ok(Date.now() - started >= 900, "not before the timeout");
    for (const a of answers) if (a) assert.match(a, /^HTTP\/1\.1 408/);
    assert.equal((await call(url, "GET", "/v1/provider-card")).status, 200);
  });

  it("a chunk size of FFFFFFFFFFFFFFFF does not keep a request open past request_timeout_seconds", async (t) => {
    const { url } = await startTestDaemon(t, { listenerExtra: "headers_timeout_seconds = 1\nrequest_timeout_seconds = 2" });
    const c = rawSocket(url);
    t.after(() => c.s.destroy());
    c.s.write(
      `POST /v1/grants HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${TEST_TOKEN}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\n{"grant":`,
    );
    const got = await Promise.race([c.closed, new Promise<null>((r) => setTimeout(() => r(null), 15_000).unref())]);
    assert.notEqual(got, null, "the server closed the connection");
    assert.match(got!, /^HTTP\/1\.1 (408|413|400)/, got!);
    assert.equal((await call(url, "GET", "/healthz")).status, 200);
  });

  it("a taken port: one JSON fatal line naming EADDRINUSE, exit 1 within a second of it, nothing on stderr", async (t) => {
    const taken = net.createServer();
    await new Promise<void>((r) => taken.listen(0, "127.0.0.1", r));
    t.after(() => new Promise<void>((r) => taken.close(() => r())));
    const port = (taken.address() as net.AddressInfo).port;
    const dir = tempDir(t);
    const cfg = writeLocalConfig(dir, { stateDir: path.join(dir, "state"), logLevel: "info" });
    writeFileSync(cfg, readFileSync(cfg, "utf8").replace('bind = "127.0.0.1:0"', `bind = "127.0.0.1:${port}"`));
    const proc = spawn(process.execPath, ["--import", "tsx", RUNNER, cfg], { stdio: ["ignore", "pipe", "pipe"] });
    t.after(() => void proc.kill("SIGKILL"));
    let out = "";
    let err = "";
    proc.stdout.on("data", (d: Buffer) => (out += d.toString()));
    proc.stderr.on("data", (d: Buffer) => (err += d.toString()));
    const code = await new Promise<number | null>((resolve, reject) => {
      proc.once("exit", (c) => resolve(c));
      setTimeout(() => reject(new Error(`still running after 60 s:\n${out}\n${err}`)), 60_000).unref();
    });
    const exitedAt = Date.now();
    assert.equal(code, 1, out + err);
    assert.equal(err, "");
    const lines = out.trim().split("\n").map((l) => JSON.parse(l) as { level: string; time: string; msg: string; err?: { message: string; code?: string } });
    const fatal = lines.filter((l) => l.level === "fatal");
    assert.equal(fatal.length, 1, out);
    assert.equal(fatal[0]!.msg, "compute-bridge could not start");
    assert.equal(fatal[0]!.err?.code, "EADDRINUSE");
    assert.match(fatal[0]!.err!.message, new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port}: .*EADDRINUSE`));
    // The line is written when the listen fails and the process exits right after it (within a
    // second; the bound leaves slack for a loaded machine: what it catches is the old hang forever).
    assert.ok(exitedAt - Date.parse(fatal[0]!.time) < 5000, `exited ${exitedAt - Date.parse(fatal[0]!.time)} ms after the fatal line`);
  });

  it("any listen error (EADDRNOTAVAIL here) rejects the start with its code and undoes it: the state_dir is free again", async (t) => {
    const dir = tempDir(t);
    const stateDir = path.join(dir, "state");
    const cfg = writeLocalConfig(dir, { stateDir });
    // 192.0.2.1 (TEST-NET-1) is no address of this machine: bind() fails at once, nothing is contacted.
    writeFileSync(cfg, readFileSync(cfg, "utf8").replace('bind = "127.0.0.1:0"', 'bind = "192.0.2.1:0"'));
    await assert.rejects(startDaemon({ configFile: cfg, logDestination: new LogSink() }), (e: Error & { code?: string }) => {
      assert.equal(e.code, "EADDRNOTAVAIL");
      assert.match(e.message, /^cannot listen on 192\.0\.2\.1:0: /);
      return true;
    });
    assert.equal(existsSync(path.join(stateDir, "daemon.pid")), false, "the state_dir lock was released");
    writeFileSync(cfg, readFileSync(cfg, "utf8").replace('bind = "192.0.2.1:0"', 'bind = "127.0.0.1:0"'));
    const d = await startDaemon({ configFile: cfg, logDestination: new LogSink() });
    t.after(() => d.close());
    assert.equal((await call(d.url, "GET", "/healthz")).status, 200, "the same state_dir starts cleanly afterwards");
  });

  it("SIGHUP reloads the listener token and the log level, logs what needs a restart, and keeps running", async (t) => {
    const dir = tempDir(t);
    const cfg = writeLocalConfig(dir, { stateDir: path.join(dir, "state"), logLevel: "info" });
    const d = await spawnDaemon(cfg);
    t.after(() => d.kill9());
    assert.equal((await call(d.url, "GET", "/v1/provider-card")).status, 200);
    writeFileSync(path.join(dir, "token"), "a-new-token-after-rotation\n");
    writeFileSync(cfg, readFileSync(cfg, "utf8").replace('level = "info"', 'level = "debug"').replace("max_concurrent = 500", "max_concurrent = 7"));
    d.proc.kill("SIGHUP");
    const line = await until(() => d.output().split("\n").find((l) => l.includes('"signal":"SIGHUP"') && l.includes("reloaded")), "the reload log line");
    const r = JSON.parse(line) as { applied: string[]; needs_restart: string[] };
    assert.deepEqual(r.applied, ["listener token", "log level debug"]);
    assert.deepEqual(r.needs_restart, ["backends"]);
    assert.equal((await call(d.url, "GET", "/v1/provider-card", undefined, {}, "a-new-token-after-rotation")).status, 200);
    assert.equal((await call(d.url, "GET", "/v1/provider-card")).status, 401, "the old token stops working");
    // A config that no longer loads: logged, the running one kept.
    writeFileSync(cfg, "this is not toml [");
    d.proc.kill("SIGHUP");
    await until(() => d.output().includes("reload: the config file no longer loads"), "the refused reload");
    assert.equal((await call(d.url, "GET", "/healthz")).status, 200);
    assert.equal(await d.stop(), 0);
  });
});
