/**
 * Executes the shared image download function (common/fetch-script.ts) for real, in dash and bash,
 * against HTTP servers on 127.0.0.1 that misbehave: it must end on its own limits every time.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, statSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { CURL_FETCH } from "../../../src/backends/common/fetch-script.js";
import { until } from "../../helpers/http.js";
import { tempDir } from "../../helpers/tmp.js";
import { loopbackServer } from "../../helpers/http-server.js";

const SHELLS = ["/bin/sh", "/bin/bash"];

const server = loopbackServer;

interface Result {
  rc: number | null;
  why: string;
  ms: number;
}

/**
 * Run `cb_curl URL OUT MAX DEADLINE IDLE [HEARTBEAT]` and print `cb_curl_why` of its status. With
 * `closeStdoutAfterMs`, the script's stdout (a pipe) is closed by the reader as sshd does when the
 * bridge closes the channel.
 */
function runCurl(t: { after(fn: () => unknown): void }, shell: string, dir: string, args: string[], closeStdoutAfterMs?: number): Promise<Result> {
  const script = path.join(dir, "fetch.sh");
  writeFileSync(script, `${CURL_FETCH}cb_curl_pid=\ntrap '[ -n "$cb_curl_pid" ] && kill "$cb_curl_pid" 2>/dev/null' EXIT\ntrap 'exit 141' PIPE\ncb_curl "$@"; rc=$?\necho "$rc $(cb_curl_why $rc)" >&2\nexit $rc\n`);
  const started = Date.now();
  const child = spawn(shell, [script, ...args], { cwd: dir, stdio: ["ignore", "pipe", "pipe"], detached: true });
  t.after(() => {
    try {
      process.kill(-child.pid!, "SIGKILL");
    } catch {
      /* gone */
    }
  });
  let err = "";
  child.stderr!.on("data", (d: Buffer) => (err += d.toString()));
  if (closeStdoutAfterMs === undefined) child.stdout!.resume();
  else setTimeout(() => child.stdout!.destroy(), closeStdoutAfterMs);
  return new Promise((resolve) => child.on("close", (rc) => resolve({ rc, why: err.trim(), ms: Date.now() - started })));
}

const nowS = () => Math.floor(Date.now() / 1000);

describe("cb_curl (the image download of every rendered script), executed", { timeout: 120_000 }, () => {
  for (const shell of SHELLS) {
    it(`${shell}: a server that accepts and never answers: ends by the deadline, status 28`, async (t) => {
      const dir = tempDir(t);
      const srv = await server(t, () => {});
      const deadline = nowS() + 2;
      const r = await runCurl(t, shell, dir, [`${srv.url}/img`, path.join(dir, "out"), "1000000", String(deadline), "600"]);
      assert.equal(r.rc, 28, r.why);
      assert.match(r.why, /timed out/);
      assert.ok(Date.now() / 1000 < deadline + 3, `ended ${Date.now() / 1000 - deadline} s after the deadline`);
    });

    it(`${shell}: an endless body without a length is cut off while streaming near the size cap`, async (t) => {
      const dir = tempDir(t);
      const chunk = Buffer.alloc(64 * 1024, 1);
      const srv = await server(t, (_req, res) => {
        res.writeHead(200);
        const pump = () => {
          while (!res.destroyed && res.write(chunk));
          if (!res.destroyed) res.once("drain", pump);
        };
        pump();
      });
      const out = path.join(dir, "out");
      const max = 1024 * 1024;
      const r = await runCurl(t, shell, dir, [`${srv.url}/img`, out, String(max), String(nowS() + 60), "600"]);
      assert.ok(r.rc === 153 || r.rc === 63, `stopped by the size limit: ${r.why}`);
      assert.match(r.why, /larger than the limit/);
      assert.ok(statSync(out).size <= 2 * max + 2048, `the file stayed near the cap (${statSync(out).size} bytes)`);
    });

    it(`${shell}: HTTP errors, redirects to other schemes and refused connections: a status and a message naming no address`, async (t) => {
      const dir = tempDir(t);
      const srv = await server(t, (req, res) => {
        if (req.url === "/file") res.writeHead(302, { location: "file:///etc/passwd" }).end();
        else res.writeHead(404).end();
      });
      const deadline = String(nowS() + 30);
      const out = path.join(dir, "out");
      const notFound = await runCurl(t, shell, dir, [`${srv.url}/nope`, out, "1000", deadline, "5"]);
      assert.equal(notFound.rc, 22);
      const toFile = await runCurl(t, shell, dir, [`${srv.url}/file`, out, "1000", deadline, "5"]);
      assert.equal(toFile.rc, 1, toFile.why);
      assert.equal(existsSync(out) && statSync(out).size > 0, false, "nothing from the redirect target");
      const refused = await runCurl(t, shell, dir, ["http://127.0.0.1:1/img", out, "1000", deadline, "5"]);
      assert.equal(refused.rc, 7);
      for (const r of [notFound, toFile, refused]) assert.doesNotMatch(r.why, /127\.0\.0\.1|:1\b|port/, r.why);
    });

    it(`${shell}: with a heartbeat, a closed stdout (the SSH channel gone) stops the fetch at once`, async (t) => {
      const dir = tempDir(t);
      const srv = await server(t, () => {});
      const r = await runCurl(t, shell, dir, [`${srv.url}/img`, path.join(dir, "out"), "1000000", String(nowS() + 600), "600", "heartbeat"], 1500);
      assert.equal(r.rc, 141, r.why);
      assert.ok(r.ms < 6000, `${r.ms} ms`);
      await until(() => srv.sockets.size === 0, "curl to be gone (its connection closed)", 5000);
    });
  }

  it("a body that stalls: the idle timeout ends it (every attempt; curl measures speed over ~5 s windows)", async (t) => {
    const dir = tempDir(t);
    const srv = await server(t, (_req, res) => {
      res.writeHead(200, { "content-length": "100000" });
      res.write("partial");
    });
    const r = await runCurl(t, "/bin/sh", dir, [`${srv.url}/img`, path.join(dir, "out"), "1000000", String(nowS() + 60), "1"]);
    assert.equal(r.rc, 28, r.why);
    assert.ok(r.ms < 40_000, `${r.ms} ms: three attempts of about 1 + 6 s`);
  });
});
