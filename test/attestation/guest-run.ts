/**
 * Runs the guest's evidence step for real (the cloud boot script or the bare-metal credential
 * script) in a temp dir, with stand-ins for what only a TD has:
 * - configfs-tsm: a directory `tsm/cb-<request_id>/` holding provider "tdx_guest", generation and
 *   a fixed outblob (a real TDX quote); the script's mkdir -p finds the entry as the kernel would
 *   have made it, its write to inblob stays there for the test to read;
 * - Azure: tpm2-tools stand-ins (a bin dir) and an IMDS on 127.0.0.1.
 * Tests kill what they start: the script runs under execFile with a timeout.
 */
import { execFile, execFileSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { promisify } from "node:util";

const execFileAsync = promisify(execFile);

export const GCE_QUOTE = readFileSync(new URL("./vectors/go-tdx-guest_cos-113-tdx-quote.dat", import.meta.url)).subarray(0, 4935);

/** A fresh ed25519 host key in `dir`; returns its .pub path and fingerprint. */
export function makeHostKey(dir: string): { pub: string; fingerprint: string } {
  const key = path.join(dir, "ssh_host_ed25519_key");
  if (!existsSync(key)) execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "", "-f", key]);
  const fingerprint = execFileSync("ssh-keygen", ["-E", "sha256", "-lf", `${key}.pub`], { encoding: "utf8" }).split(" ")[1]!;
  return { pub: `${key}.pub`, fingerprint };
}

/** The stand-in configfs-tsm report directory with one pre-made entry for `requestId`. */
export function fakeTsm(dir: string, requestId: string, o: { provider?: string; outblob?: Buffer } = {}): { root: string; entry: string } {
  const root = path.join(dir, "tsm");
  const entry = path.join(root, `cb-${requestId}`);
  mkdirSync(entry, { recursive: true });
  writeFileSync(path.join(entry, "provider"), `${o.provider ?? "tdx_guest"}\n`);
  writeFileSync(path.join(entry, "generation"), "1\n");
  writeFileSync(path.join(entry, "inblob"), "");
  writeFileSync(path.join(entry, "outblob"), o.outblob ?? GCE_QUOTE);
  return { root, entry };
}

/** tpm2-tools stand-ins: record their arguments; nvread writes `hclReport`, quote writes fixed blobs. */
export function fakeTpm2(dir: string, hclReport: Buffer): string {
  const bin = path.join(dir, "tpm2");
  mkdirSync(bin, { recursive: true });
  writeFileSync(path.join(dir, "hcl_report.bin"), hclReport);
  const tool = (name: string, body: string) => {
    writeFileSync(path.join(bin, name), `#!/bin/sh\nprintf '%s\\n' "$*" >> ${JSON.stringify(path.join(dir, "tpm2.log"))}\n${body}\n`);
    chmodSync(path.join(bin, name), 0o755);
  };
  tool("tpm2_nvundefine", "exit 0");
  tool("tpm2_nvdefine", "exit 0");
  // -i FILE: keep what was written to NV 0x01400002.
  tool("tpm2_nvwrite", `while [ $# -gt 0 ]; do [ "$1" = -i ] && cp "$2" ${JSON.stringify(path.join(dir, "nv_user_data.bin"))}; shift; done`);
  tool("tpm2_nvread", `while [ $# -gt 0 ]; do [ "$1" = -o ] && cp ${JSON.stringify(path.join(dir, "hcl_report.bin"))} "$2"; shift; done`);
  tool("tpm2_quote", `while [ $# -gt 0 ]; do case $1 in -m) printf 'TPMS_ATTEST' > "$2" ;; -s) printf 'TPMT_SIGNATURE' > "$2" ;; esac; shift; done`);
  return bin;
}

/** The script file and environment for one run in `dir` (console, state, poweroff stand-in). */
function prepare(dir: string, script: string, env: Record<string, string>): { file: string; consoleFile: string; env: Record<string, string> } {
  mkdirSync(path.join(dir, "root"), { recursive: true });
  const file = path.join(dir, "script.sh");
  writeFileSync(file, script, { mode: 0o700 });
  const poweroff = path.join(dir, "poweroff");
  writeFileSync(poweroff, "#!/bin/sh\nexit 0\n");
  chmodSync(poweroff, 0o755);
  const consoleFile = path.join(dir, "console");
  return {
    file,
    consoleFile,
    env: {
      CB_CONSOLE: consoleFile,
      CB_POWEROFF: poweroff,
      CB_ROOT: path.join(dir, "root"),
      CB_HOME: path.join(dir, "home"),
      CB_STATE: path.join(dir, "state"),
      CB_SSH_HOST_KEY: path.join(dir, "no-host-key.pub"),
      PATH: process.env.PATH ?? "/usr/bin:/bin",
      ...env,
    },
  };
}

const consoleOf = (f: string) => (existsSync(f) ? readFileSync(f, "utf8") : "");

/** Run a script with /bin/sh (dash), console and state in `dir`; returns the console text. */
export async function runGuestScript(dir: string, script: string, env: Record<string, string>): Promise<string> {
  const p = prepare(dir, script, env);
  await execFileAsync("/bin/sh", [p.file], { cwd: dir, timeout: 60_000, killSignal: "SIGKILL", env: p.env }).catch((e: { killed?: boolean }) => {
    if (e.killed) throw e;
  });
  return consoleOf(p.consoleFile);
}

/**
 * The same, synchronously: for a fake's boot hook, which must answer at once. The script must not
 * need this process's event loop (no image or IMDS served from here).
 */
export function runGuestScriptSync(dir: string, script: string, env: Record<string, string>): string {
  const p = prepare(dir, script, env);
  try {
    execFileSync("/bin/sh", [p.file], { cwd: dir, timeout: 60_000, killSignal: "SIGKILL", env: p.env, stdio: "ignore" });
  } catch (e) {
    if ((e as { signal?: string }).signal === "SIGKILL") throw e;
  }
  return consoleOf(p.consoleFile);
}
