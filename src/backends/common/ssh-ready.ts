/**
 * SSH readiness probe shared by the cloud backends: a VM counts as reachable once a TCP
 * connection to its sshd yields an SSH protocol identification line (RFC 4253 section 4.2),
 * e.g. "SSH-2.0-OpenSSH_9.2p1 Debian-2". Nothing is sent to the server and no authentication
 * is attempted; the connection is closed as soon as the banner has been read. Then the VM's
 * host key fingerprint, as its boot script reported it on the serial console (waitForHostKey).
 */
import net from "node:net";
import { abortError, systemClock, type Clock } from "../../util/clock.js";
import { CredentialError } from "../backend.js";
import { parseHostKey } from "./cloud-init.js";
import { absentEvidence, evidenceFromConsole } from "../../attestation/guest.js";
import type { CollectedEvidence, EvidencePlatform } from "../../domain/attestation.js";
import type { ComputeGrant, Envelope } from "../../domain/grant.js";

export interface WaitForSshOptions {
  /** Give up after this long (measured on `clock`). */
  timeoutMs: number;
  /** Pause between attempts. */
  intervalMs: number;
  signal?: AbortSignal;
  clock?: Clock;
  /** Bound on one attempt (connect + banner); default min(10 s, timeoutMs). */
  attemptTimeoutMs?: number;
}

export interface SshReady {
  /** The identification line without its CR LF. */
  banner: string;
  attempts: number;
  /** Time from the first attempt until the banner arrived, on `clock`. */
  elapsedMs: number;
}

export class SshNotReadyError extends Error {
  override name = "SshNotReadyError";
  constructor(
    readonly host: string,
    readonly port: number,
    readonly timeoutMs: number,
    readonly attempts: number,
    readonly lastError: string,
  ) {
    super(`no SSH banner from ${host}:${port} within ${Math.round(timeoutMs / 1000)} s (${attempts} attempt${attempts === 1 ? "" : "s"}; last: ${lastError})`);
  }
}

/** Longest pre-banner text accepted (RFC 4253 allows other lines before the version line). */
const MAX_PREAMBLE_BYTES = 8192;

/** One attempt: connect, read the identification line, close. Rejects with a short reason. */
export function probeSsh(host: string, port: number, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<string> {
  return new Promise<string>((resolve, reject) => {
    if (opts.signal?.aborted) return reject(abortError(opts.signal));
    let buf = "";
    let done = false;
    const socket = net.connect({ host, port });
    const finish = (err: Error | null, banner?: string) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
      socket.destroy();
      if (err) reject(err);
      else resolve(banner!);
    };
    const onAbort = () => finish(abortError(opts.signal!));
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    const timer = setTimeout(() => finish(new Error(buf ? "timed out waiting for the SSH identification line" : "timed out connecting or waiting for the banner")), Math.max(1, opts.timeoutMs));
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => {
      buf += chunk.toString("latin1");
      for (;;) {
        const nl = buf.indexOf("\n");
        if (nl < 0) break;
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (!line.startsWith("SSH-")) continue;
        if (/^SSH-(2\.0|1\.99)-\S/.test(line)) return finish(null, line);
        return finish(new Error(`unsupported SSH protocol version in "${line.slice(0, 64)}"`));
      }
      if (buf.length > MAX_PREAMBLE_BYTES) finish(new Error("no SSH identification line in the first 8 KiB"));
    });
    socket.on("error", (e: NodeJS.ErrnoException) => finish(new Error(e.code ?? e.message)));
    socket.on("close", () => finish(new Error("connection closed before the SSH banner")));
  });
}

/**
 * Retry `probeSsh` every `intervalMs` until a banner arrives or `timeoutMs` passes. Rejects with
 * SshNotReadyError (naming the last failure) on timeout, or with an AbortError on `signal`.
 */
export async function waitForSsh(host: string, port: number, opts: WaitForSshOptions): Promise<SshReady> {
  const clock = opts.clock ?? systemClock;
  const start = clock.now();
  const deadline = start + opts.timeoutMs;
  const perAttempt = opts.attemptTimeoutMs ?? Math.min(10_000, opts.timeoutMs);
  let attempts = 0;
  let last = "no attempt made";
  for (;;) {
    if (opts.signal?.aborted) throw abortError(opts.signal);
    attempts++;
    try {
      const remaining = Math.max(1, deadline - clock.now());
      const banner = await probeSsh(host, port, { timeoutMs: Math.min(perAttempt, remaining), ...(opts.signal ? { signal: opts.signal } : {}) });
      return { banner, attempts, elapsedMs: clock.now() - start };
    } catch (e) {
      if (opts.signal?.aborted) throw abortError(opts.signal);
      last = e instanceof Error ? e.message : String(e);
    }
    const remaining = deadline - clock.now();
    if (remaining <= 0) throw new SshNotReadyError(host, port, opts.timeoutMs, attempts, last);
    await clock.sleep(Math.min(opts.intervalMs, remaining), opts.signal);
  }
}

/**
 * Thrown by a console reader whose console will never show the report (EC2's latest console
 * output on an instance type without Nitro, say): waitForHostKey stops at once.
 */
export class ConsoleUnavailableError extends Error {
  override name = "ConsoleUnavailableError";
}

export interface HostKeyWaitOptions {
  /** Keep reading the console this long (on `clock`) for the guest's report; 0 reads it once. */
  timeoutMs: number;
  intervalMs: number;
  signal?: AbortSignal;
  clock?: Clock;
}

export interface HostKeyFound {
  /** `SHA256:...` as `ssh-keygen -lf` prints it, or null. */
  fingerprint: string | null;
  /** Why there is none (for the log), when fingerprint is null. */
  missing: string | null;
}

/**
 * Read a VM's serial console (`read`, through the cloud's API, which only the VM writes to) until
 * its boot script reports the SSH host key (cloud-init.ts, COMPUTE-BRIDGE-HOSTKEY). Never fails
 * the grant: a guest without an ed25519 key, a console that lags past `timeoutMs` or cannot be
 * read gives fingerprint null and the reason. Read errors are retried until `timeoutMs`, except
 * ConsoleUnavailableError and CredentialError, which end the wait at once. Rejects only with an
 * AbortError on `signal`.
 */
export async function waitForHostKey(read: () => Promise<string>, requestId: string, opts: HostKeyWaitOptions): Promise<HostKeyFound> {
  const r = await waitForConsole(read, (text) => parseHostKey(text, requestId), opts, "an SSH host key");
  if ("missing" in r) return { fingerprint: null, missing: r.missing };
  return { fingerprint: r.value.fingerprint, missing: r.value.fingerprint ? null : "the guest reported no ed25519 SSH host key" };
}

/**
 * Read the console until `parse` finds what the guest reports (non-null), `what` naming it in the
 * reason when it does not come. Read errors are retried until `timeoutMs`, except
 * ConsoleUnavailableError and CredentialError, which end the wait at once. Rejects only with an
 * AbortError on `signal`.
 */
export async function waitForConsole<T>(read: () => Promise<string>, parse: (text: string) => T | null, opts: HostKeyWaitOptions, what: string): Promise<{ value: T } | { missing: string }> {
  const clock = opts.clock ?? systemClock;
  const deadline = clock.now() + opts.timeoutMs;
  let lastError: string | null = null;
  for (;;) {
    if (opts.signal?.aborted) throw abortError(opts.signal);
    try {
      const found = parse(await read());
      if (found !== null) return { value: found };
      lastError = null;
    } catch (e) {
      if (opts.signal?.aborted) throw abortError(opts.signal);
      lastError = e instanceof Error ? e.message : String(e);
      // Neither a console that has none nor a refusal of the bridge's credentials or permissions
      // (GetConsoleOutput missing from the IAM policy, say) heals within the wait.
      if (e instanceof ConsoleUnavailableError || e instanceof CredentialError) return { missing: `the serial console cannot be read: ${lastError.slice(0, 300)}` };
    }
    const remaining = deadline - clock.now();
    if (remaining <= 0)
      return {
        missing: lastError
          ? `the serial console could not be read: ${lastError.slice(0, 300)}`
          : `the guest reported no ${what.replace(/^an? /, "")} on its serial console within ${Math.round(opts.timeoutMs / 1000)} s`,
      };
    await clock.sleep(Math.min(opts.intervalMs, remaining), opts.signal);
  }
}

/**
 * A TDX grant's attestation evidence from the guest's console (src/attestation/guest.ts), read
 * after its host key report: present, absent with the guest's reason, or absent because the
 * console did not show it within `timeoutMs` (0: read once, for a guest that already stopped).
 * Null for a grant that did not ask for TDX. Never fails the grant.
 */
export async function guestEvidence(read: () => Promise<string>, platform: EvidencePlatform, grant: ComputeGrant, envelope: Envelope, opts: HostKeyWaitOptions): Promise<CollectedEvidence | null> {
  if (!grant.tdx_required) return null;
  const nonce = envelope.attestation_nonce;
  if (!nonce) return absentEvidence(platform, null, "no attestation nonce reached the backend");
  const r = await waitForConsole(read, (text) => evidenceFromConsole(platform, grant.request_id, nonce, text), opts, "attestation evidence");
  return "value" in r ? r.value : absentEvidence(platform, nonce, r.missing);
}
