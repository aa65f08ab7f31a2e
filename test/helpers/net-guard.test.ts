import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { describe, it } from "node:test";
import { connectTarget } from "./net-guard.js";

describe("network guard", () => {
  it("sees the real target of every connect() form", () => {
    assert.equal(connectTarget([{ host: "203.0.113.7", port: 80, path: null }]), "203.0.113.7", "http passes path: null for TCP");
    assert.equal(connectTarget([[{ host: "metadata.google.internal", port: 80 }, () => undefined]]), "metadata.google.internal", "net.connect's normalized array");
    assert.equal(connectTarget([{ path: "/run/x.sock" }]), "unix");
    assert.equal(connectTarget([443, "169.254.169.254"]), "169.254.169.254");
    assert.equal(connectTarget([{ port: 80 }]), "localhost");
  });

  it("refuses http, fetch and net to anything but loopback, and lets loopback through", async () => {
    // In a child process: the guard patches net.Socket for the whole process.
    const script = `
      import { installNetworkGuard } from ${JSON.stringify(new URL("./net-guard.ts", import.meta.url).href)};
      import http from "node:http";
      import net from "node:net";
      const refused = installNetworkGuard();
      const outcome = async (f) => { try { await f(); return "connected"; } catch (e) { return String(e.message).includes("test network guard") ? "refused" : "other:" + e.message; } };
      const server = net.createServer((s) => s.end()).listen(0, "127.0.0.1");
      await new Promise((r) => server.once("listening", r));
      const port = server.address().port;
      const r = {
        http: await outcome(() => new Promise((res, rej) => http.get("http://192.0.2.1/", res).on("error", rej))),
        fetch: await outcome(() => fetch("http://169.254.169.254/latest/meta-data/").catch((e) => { throw e.cause ?? e; })),
        net: await outcome(() => new Promise((res, rej) => net.connect(22, "10.0.0.1", res).on("error", rej))),
        loopback: await outcome(() => new Promise((res, rej) => net.connect(port, "127.0.0.1", res).on("error", rej))),
      };
      server.close();
      console.log(JSON.stringify({ r, refused }));
    `;
    const out = await new Promise<string>((resolve, reject) =>
      execFile(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], { timeout: 30_000 }, (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout))),
    );
    const { r, refused } = JSON.parse(out) as { r: Record<string, string>; refused: string[] };
    assert.deepEqual(r, { http: "refused", fetch: "refused", net: "refused", loopback: "connected" });
    assert.deepEqual(refused, ["192.0.2.1", "169.254.169.254", "10.0.0.1"]);
  });
});
