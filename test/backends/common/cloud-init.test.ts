/**
 * Executes the rendered boot script for real (dash and bash), with stand-ins only for what a VM
 * has: the serial console (a file), poweroff (a script that records the call), the root prefix
 * and the login user's home (temp dirs). Images come from an http server on 127.0.0.1.
 */
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import {
  BootScriptError,
  exitMarker,
  failMarker,
  hostKeyMarker,
  parseHostKey,
  parseMarker,
  renderBootScript,
  type BootScriptOptions,
} from "../../../src/backends/common/cloud-init.js";
import type { Envelope } from "../../../src/domain/index.js";
import { tempDir } from "../../helpers/tmp.js";

const KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3xV7Ey1nWqA0R2cYw5l0dR3bq8JfQZ0wq6w3qkQ5b grant@test";
const SHELLS = ["/bin/sh", "/bin/bash"];

/** Writes every argument and the full environment (NUL-separated) into $HOME, then exits 7. */
const PROBE = `#!/bin/sh
printf '%s\\0' "$@" > "$HOME/args0"
env -0 > "$HOME/env0"
exit 7
`;

let server: http.Server;
let base = "";
const files = new Map<string, Buffer>();

function serve(name: string, content: Buffer | string): { url: string; sha256: string } {
  const buf = Buffer.isBuffer(content) ? content : Buffer.from(content);
  files.set(`/${name}`, buf);
  return { url: `${base}/${name}`, sha256: createHash("sha256").update(buf).digest("hex") };
}

function tarball(dir: string, name: string, entries: Record<string, string>, gzip: boolean): Buffer {
  const src = path.join(dir, `${name}.src`);
  mkdirSync(src, { recursive: true });
  for (const [f, body] of Object.entries(entries)) {
    writeFileSync(path.join(src, f), body);
    chmodSync(path.join(src, f), 0o755);
  }
  const out = path.join(dir, `${name}.tar${gzip ? ".gz" : ""}`);
  execFileSync("tar", [gzip ? "-czf" : "-cf", out, "-C", src, "."]);
  return readFileSync(out);
}

interface Run {
  console: string;
  poweredOff: boolean;
  rc: number | null;
  root: string;
  home: string;
  work: string;
}

/** Run the script like cloud-init would, with the VM-only paths pointed at the temp dir. */
async function runScript(dir: string, script: string, shell = "/bin/sh", env: Record<string, string> = {}): Promise<Run> {
  const root = path.join(dir, "root");
  const home = path.join(dir, "home");
  const consoleFile = path.join(dir, "console");
  const poweroff = path.join(dir, "poweroff");
  mkdirSync(root, { recursive: true });
  writeFileSync(poweroff, `#!/bin/sh\necho off >> ${JSON.stringify(path.join(dir, "powered-off"))}\n`);
  chmodSync(poweroff, 0o755);
  const file = path.join(dir, "user-data");
  writeFileSync(file, script, { mode: 0o700 });
  const rc = await new Promise<number | null>((resolve, reject) => {
    const child = spawn(shell, [file], {
      cwd: dir,
      stdio: ["ignore", "ignore", "pipe"],
      env: {
        CB_CONSOLE: consoleFile,
        CB_POWEROFF: poweroff,
        CB_ROOT: root,
        CB_HOME: home,
        // No host key unless a test makes one (never the test machine's own /etc/ssh).
        CB_SSH_HOST_KEY: path.join(dir, "no-host-key.pub"),
        PATH: process.env.PATH ?? "/usr/bin:/bin",
        ...env,
      },
    });
    child.stderr.resume();
    child.on("error", reject);
    child.on("close", resolve);
  });
  return {
    console: existsSync(consoleFile) ? readFileSync(consoleFile, "utf8") : "",
    poweredOff: existsSync(path.join(dir, "powered-off")),
    rc,
    root,
    home,
    work: path.join(root, "var/lib/compute-bridge/work"),
  };
}

function opts(envelope: Envelope, over: Partial<BootScriptOptions> = {}): BootScriptOptions {
  return { requestId: "req-1", envelope, sshUser: "ec2-user", ...over };
}

function nulList(file: string): string[] {
  const s = readFileSync(file, "utf8");
  return s === "" ? [] : s.slice(0, -1).split("\0");
}

/** The exit code of req-1's marker, which must also carry the workload's CPU time. */
function exitOf(consoleText: string): number | null {
  const m = parseMarker(consoleText, "req-1");
  if (!m || !("exitCode" in m)) return null;
  assert.ok(m.cpuSeconds !== null && m.cpuSeconds >= 0, `cpu time in the marker: ${consoleText}`);
  return m.exitCode;
}

describe("boot script (cloud-init user data), executed", () => {
  before(async () => {
    server = http.createServer((req, res) => {
      const body = files.get(new URL(req.url ?? "/", "http://x").pathname);
      if (!body) {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { "content-length": body.length }).end(body);
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(() => new Promise<void>((r) => server.close(() => r())));

  for (const shell of SHELLS) {
    it(`${shell}: verified executable runs with its args and env; exit code marker; key installed; powers off`, async (t) => {
      const dir = tempDir(t);
      const img = serve(`probe-${path.basename(shell)}`, PROBE);
      const run = await runScript(
        dir,
        renderBootScript(opts({ image: { ...img, format: "bundle" }, command: ["./workload", "plain", "two words"], env: { GREETING: "hello" }, ssh_public_key: KEY })),
        shell,
      );
      assert.equal(run.rc, 0);
      assert.deepEqual(exitOf(run.console), 7);
      assert.match(run.console, /^COMPUTE-BRIDGE-EXIT req-1 7 cpu=\d+\.\d{3}$/m);
      assert.ok(run.poweredOff, "poweroff was called");
      assert.deepEqual(nulList(path.join(run.work, "args0")), ["plain", "two words"]);
      const env = nulList(path.join(run.work, "env0"));
      assert.ok(env.includes("GREETING=hello"));
      assert.ok(env.includes(`HOME=${run.work}`));
      assert.ok(env.includes("LANG=C.UTF-8"));
      assert.ok(!env.some((e) => e.startsWith("CB_")), "the workload gets a clean environment");
      assert.equal(readFileSync(path.join(run.home, ".ssh/authorized_keys"), "utf8"), `${KEY}\n`);
      // This "VM" has no ed25519 host key: the report says so, and the bridge stops looking.
      assert.match(run.console, /^COMPUTE-BRIDGE-HOSTKEY req-1 none$/m);
      assert.deepEqual(parseHostKey(run.console, "req-1"), { fingerprint: null });
    });
  }

  it("reports the SSH host key's fingerprint before anything from the image runs; a workload's own report does not count", async (t) => {
    const dir = tempDir(t);
    const hostKey = path.join(dir, "ssh_host_ed25519_key");
    execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "", "-f", hostKey]);
    const expected = execFileSync("ssh-keygen", ["-E", "sha256", "-lf", `${hostKey}.pub`], { encoding: "utf8" }).split(" ")[1]!;
    assert.match(expected, /^SHA256:[A-Za-z0-9+/]{43}$/);
    const consoleFile = path.join(dir, "console");
    const forged = hostKeyMarker("req-1", `SHA256:${"F".repeat(43)}`);
    const img = serve("forger", `#!/bin/sh\nprintf '%s\\n' ${JSON.stringify(forged)} >>"$CONSOLE"\nexit 0\n`);
    const run = await runScript(dir, renderBootScript(opts({ image: { ...img, format: "bundle" }, env: { CONSOLE: consoleFile } })), "/bin/sh", { CB_SSH_HOST_KEY: `${hostKey}.pub` });
    assert.equal(exitOf(run.console), 0);
    const lines = run.console.split("\n");
    const reported = lines.indexOf(hostKeyMarker("req-1", expected));
    assert.ok(reported >= 0, run.console);
    assert.ok(reported < lines.indexOf("compute-bridge: fetching the image"), "reported before the image is fetched");
    assert.ok(lines.indexOf(forged) > reported, "the workload did write its own report");
    assert.deepEqual(parseHostKey(run.console, "req-1"), { fingerprint: expected });
  });

  it("reports the workload's own CPU time: a busy loop counts, the download and unpack before it do not", async (t) => {
    const dir = tempDir(t);
    const cpuOf = async (name: string, body: string, padMiB = 0) => {
      const sub = path.join(dir, name);
      mkdirSync(sub);
      // Padding after `exit` makes the download, the sha256 check and the install cost CPU too.
      const img = serve(name, Buffer.concat([Buffer.from(`#!/bin/sh\n${body}\nexit 0\n#`), Buffer.alloc(padMiB * 1024 * 1024, "x")]));
      const run = await runScript(sub, renderBootScript(opts({ image: { ...img, format: "bundle" } })));
      const m = parseMarker(run.console, "req-1");
      assert.ok(m && "exitCode" in m && m.exitCode === 0 && m.cpuSeconds !== null, run.console);
      return m.cpuSeconds;
    };
    const busy = await cpuOf("busy", "i=0; while [ $i -lt 300000 ]; do i=$((i + 1)); done");
    const idle = await cpuOf("idle", "sleep 0.3", 64);
    assert.ok(busy > 0.1, `busy loop: ${busy} s`);
    assert.ok(idle < 0.05, `sleep: ${idle} s`);
  });

  it("a tar.gz bundle runs ./run by default; a plain tar too", async (t) => {
    const dir = tempDir(t);
    for (const gzip of [true, false]) {
      const sub = path.join(dir, gzip ? "gz" : "tar");
      mkdirSync(sub);
      const img = serve(`bundle-${gzip}`, tarball(sub, "b", { run: `#!/bin/sh\necho "$MSG" > data.out\nexit ${gzip ? 3 : 4}\n`, "data.txt": "x" }, gzip));
      const run = await runScript(sub, renderBootScript(opts({ image: { ...img, format: "bundle" }, env: { MSG: "bundled" } })));
      assert.equal(exitOf(run.console), gzip ? 3 : 4);
      assert.equal(readFileSync(path.join(run.work, "data.out"), "utf8"), "bundled\n");
      assert.ok(existsSync(path.join(run.work, "data.txt")));
    }
  });

  for (const shell of SHELLS) {
    it(`${shell}: sha256 mismatch -> FAIL marker, nothing from the image runs, powers off`, async (t) => {
      const dir = tempDir(t);
      const canary = path.join(dir, "canary");
      const img = serve(`evil-${path.basename(shell)}`, `#!/bin/sh\ntouch ${canary}\n`);
      const run = await runScript(dir, renderBootScript(opts({ image: { url: img.url, sha256: "ab".repeat(32), format: "bundle" }, ssh_public_key: KEY })), shell);
      assert.deepEqual(parseMarker(run.console, "req-1"), { failure: { kind: "image_verification", message: "image sha256 mismatch: nothing was run" } });
      assert.doesNotMatch(run.console, /COMPUTE-BRIDGE-EXIT/);
      assert.equal(existsSync(canary), false, "the unverified image never ran");
      assert.equal(existsSync(path.join(run.work, "workload")), false, "nor was it installed");
      assert.equal(existsSync(path.join(run.root, "var/lib/compute-bridge/image.part")), false, "the bad download is removed");
      assert.ok(run.poweredOff);
    });
  }

  it("a second boot never runs the workload again", async (t) => {
    const dir = tempDir(t);
    const img = serve("once", "#!/bin/sh\necho ran >> \"$HOME/../../ran\"\nexit 0\n");
    const script = renderBootScript(opts({ image: { ...img, format: "bundle" } }));
    const first = await runScript(dir, script);
    assert.equal(exitOf(first.console), 0);
    rmSync(path.join(dir, "powered-off"), { force: true });
    const second = await runScript(dir, script);
    const m = parseMarker(second.console, "req-1");
    assert.ok(m && "failure" in m && m.failure.kind === "setup", JSON.stringify(m));
    assert.ok(second.poweredOff);
    assert.equal(readFileSync(path.join(first.root, "var/lib/ran"), "utf8"), "ran\n", "the workload ran exactly once");
  });

  it("a download failure reports COMPUTE-BRIDGE-FAIL fetch", async (t) => {
    const dir = tempDir(t);
    const run = await runScript(dir, renderBootScript(opts({ image: { url: `${base}/missing`, sha256: "cd".repeat(32), format: "bundle" } })));
    assert.deepEqual(parseMarker(run.console, "req-1"), { failure: { kind: "fetch", message: "downloading the image failed: the image server answered with an HTTP error" } });
    assert.ok(run.poweredOff);
  });

  it("an image over the size limit is refused", async (t) => {
    const dir = tempDir(t);
    const img = serve("big", Buffer.alloc(4096, 1));
    const run = await runScript(dir, renderBootScript(opts({ image: { ...img, format: "bundle" } }, { maxImageBytes: 1024 })));
    const m = parseMarker(run.console, "req-1");
    assert.ok(m && "failure" in m && m.failure.kind === "fetch", run.console);
  });

  it("hostile values in env, command args, URL and request-derived fields never execute", async (t) => {
    const dir = tempDir(t);
    const canaries = [1, 2, 3, 4, 5, 6, 7, 8].map((i) => path.join(dir, `canary${i}`));
    const hostile = [
      `'; touch ${canaries[0]}; '`,
      `$(touch ${canaries[1]})`,
      `\`touch ${canaries[2]}\``,
      `x\ntouch ${canaries[3]}\n`,
      `"; touch ${canaries[4]}; "`,
      `\\'$(touch ${canaries[5]})\\'`,
      `a;b|c&d>e<f`,
      `--help`,
      `$HOME ~ * ? [a] ${"{"}x,y}`,
    ];
    const env: Record<string, string> = {};
    hostile.forEach((v, i) => (env[`H${i}`] = v));
    const img = serve("probe-hostile", PROBE);
    // The URL path is served; the hostile parts live in the query, which the server ignores.
    const url = `${img.url}?q='$(touch ${canaries[6]})'&r=\`touch ${canaries[7]}\`;x`;
    const script = renderBootScript(opts({ image: { url, sha256: img.sha256, format: "bundle" }, command: ["./workload", ...hostile], env, ssh_public_key: KEY }));
    for (const shell of SHELLS) {
      const sub = path.join(dir, path.basename(shell));
      mkdirSync(sub);
      const run = await runScript(sub, script, shell);
      assert.equal(exitOf(run.console), 7, run.console);
      for (const c of canaries) assert.equal(existsSync(c), false, `${c} must not exist (${shell})`);
      assert.deepEqual(nulList(path.join(run.work, "args0")), hostile, "every argument arrives verbatim");
      const got = nulList(path.join(run.work, "env0"));
      hostile.forEach((v, i) => assert.ok(got.includes(`H${i}=${v}`), `env H${i} verbatim`));
    }
    // A newline inside the URL: curl refuses it or fetches it; either way nothing executes.
    const sub = path.join(dir, "nl");
    mkdirSync(sub);
    const nl = await runScript(sub, renderBootScript(opts({ image: { url: `${img.url}?a=1\ntouch ${canaries[0]}`, sha256: img.sha256, format: "bundle" } })));
    assert.notEqual(parseMarker(nl.console, "req-1"), null);
    assert.equal(existsSync(canaries[0]!), false);
  });

  it("valid_to: a workload still running at the deadline is stopped and reported as expired", async (t) => {
    const dir = tempDir(t);
    const img = serve("sleeper", "#!/bin/sh\nsleep 30\n");
    const started = Date.now();
    const run = await runScript(dir, renderBootScript(opts({ image: { ...img, format: "bundle" } }, { deadlineEpochSeconds: Math.ceil(Date.now() / 1000) + 1 })));
    assert.ok(Date.now() - started < 15_000, "stopped at the deadline, not after the sleep");
    assert.deepEqual(parseMarker(run.console, "req-1"), { failure: { kind: "expired", message: "valid_to reached: the workload was stopped" } });

    const sub = path.join(dir, "late");
    mkdirSync(sub);
    const late = await runScript(sub, renderBootScript(opts({ image: { ...img, format: "bundle" } }, { deadlineEpochSeconds: Math.floor(Date.now() / 1000) - 5 })));
    assert.equal((parseMarker(late.console, "req-1") as { failure: { kind: string } }).failure.kind, "expired");
  });

  it("is deterministic and refuses what it cannot run safely", () => {
    const env: Envelope = { image: { url: "https://example.invalid/i", sha256: "ef".repeat(32), format: "bundle" }, env: { A: "1" }, ssh_public_key: KEY };
    assert.equal(renderBootScript(opts(env, { deadlineEpochSeconds: 1e9 })), renderBootScript(opts(env, { deadlineEpochSeconds: 1e9 })));
    const bad: [string, BootScriptOptions][] = [
      ["disk", opts({ ...env, image: { ...env.image, format: "disk" } })],
      ["file url", opts({ ...env, image: { ...env.image, url: "file:///etc/shadow" } })],
      ["env name", opts({ ...env, env: { "A;touch x": "1" } })],
      ["key newline", opts({ ...env, ssh_public_key: `${KEY}\nssh-ed25519 AAAA evil` })],
      ["request id", opts(env, { requestId: "a b" })],
      ["user", opts(env, { sshUser: "root;x" })],
      ["sha", opts({ ...env, image: { ...env.image, sha256: "zz" } })],
    ];
    for (const [what, o] of bad) assert.throws(() => renderBootScript(o), BootScriptError, what);
  });
});

describe("parseMarker", () => {
  it("finds the last marker for the request, tolerating prefixes and CRLF", () => {
    const text = [
      "[    1.234] cloud-init[812]: compute-bridge: boot script for r-1 started",
      `${exitMarker("r-1", 0)}`, // e.g. printed by the workload itself
      `${exitMarker("other", 9)}`,
      `[   99.000] cloud-init[812]: ${exitMarker("r-1", 42)}\r`,
      "reboot: Power down",
    ].join("\n");
    assert.deepEqual(parseMarker(text, "r-1"), { exitCode: 42, cpuSeconds: null });
    assert.deepEqual(parseMarker(text, "other"), { exitCode: 9, cpuSeconds: null });
    assert.deepEqual(parseMarker(`${text}\n${exitMarker("r-1", 3, 12.5)}`, "r-1"), { exitCode: 3, cpuSeconds: 12.5 });
    assert.deepEqual(parseMarker("COMPUTE-BRIDGE-EXIT r-1 0 cpu=0.000", "r-1"), { exitCode: 0, cpuSeconds: 0 });
    assert.equal(parseMarker(text, "r-2"), null);
    assert.equal(parseMarker("", "r-1"), null);
  });

  it("takes the first host key report for the request; anything but a fingerprint there is none", () => {
    const fp = `SHA256:${"a1+/".repeat(10)}abc`;
    const text = [`[  5.1] cloud-init[812]: ${hostKeyMarker("other", `SHA256:${"b".repeat(43)}`)}`, `[  5.2] cloud-init[812]: ${hostKeyMarker("r-1", fp)}\r`, hostKeyMarker("r-1", `SHA256:${"c".repeat(43)}`)].join("\n");
    assert.deepEqual(parseHostKey(text, "r-1"), { fingerprint: fp });
    assert.deepEqual(parseHostKey(text, "other"), { fingerprint: `SHA256:${"b".repeat(43)}` });
    assert.equal(parseHostKey(text, "r-2"), null);
    assert.equal(parseHostKey("", "r-1"), null);
    assert.deepEqual(parseHostKey(hostKeyMarker("r-1", null), "r-1"), { fingerprint: null });
    for (const bad of ["SHA256:short", `MD5:${"a".repeat(43)}`, `SHA256:${"a".repeat(43)};rm`])
      assert.deepEqual(parseHostKey(`COMPUTE-BRIDGE-HOSTKEY r-1 ${bad}\n${hostKeyMarker("r-1", fp)}`, "r-1"), { fingerprint: null }, bad);
    // Exit markers are not host key reports, nor the other way round.
    assert.equal(parseHostKey(exitMarker("r-1", 0), "r-1"), null);
    assert.equal(parseMarker(hostKeyMarker("r-1", fp), "r-1"), null);
  });

  it("parses failures and ignores malformed markers", () => {
    assert.deepEqual(parseMarker(failMarker("r-1", "image_verification", "image sha256 mismatch: nothing was run"), "r-1"), {
      failure: { kind: "image_verification", message: "image sha256 mismatch: nothing was run" },
    });
    for (const line of ["COMPUTE-BRIDGE-EXIT r-1", "COMPUTE-BRIDGE-EXIT r-1 abc", "COMPUTE-BRIDGE-EXIT r-1 256", "COMPUTE-BRIDGE-EXIT r-1 1 extra", "COMPUTE-BRIDGE-EXIT r-1 1 cpu=-1", "COMPUTE-BRIDGE-EXIT r-1 1 cpu=1e9", "COMPUTE-BRIDGE-EXIT r-1 1 cpu=1 more", "XCOMPUTE-BRIDGE-EXIT r-1 1", "COMPUTE-BRIDGE-FAIL r-1 Bad-Kind m"])
      assert.equal(parseMarker(line, "r-1"), null, line);
    const ctl = parseMarker("COMPUTE-BRIDGE-FAIL r-1 fetch bad \u0007bell", "r-1");
    assert.deepEqual(ctl, { failure: { kind: "fetch", message: "bad ?bell" } });
  });
});
